"""Folders written whole or not at all: every file nbpeft saves goes through :func:`atomic_folder`.

The files are written into a hidden folder beside the destination (``.<name>.<pid>.partial``),
which then takes the destination's place in one rename. A process killed while writing
leaves the destination as it was; the hidden folder it leaves behind is removed by the next
save to the same place. Replacing an existing folder swaps the two in one step
(``renameat2(RENAME_EXCHANGE)`` on Linux), so a reader sees the old folder or the new one,
never a mixture and never nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError

PARTIAL = ".partial"


def check_free(path: str | Path, overwrite: bool, fn: str) -> None:
    """The one overwrite rule: an existing, non-empty ``path`` is refused unless ``overwrite=True``."""
    path = Path(path)
    if overwrite or not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    what = "is a file" if path.is_file() else "already exists and is not empty"
    raise ConfigError(f"{fn}(): {path} {what}; choose another path or pass overwrite=True")


def check_exists(path: str | Path, fn: str, what: str) -> Path:
    """``path`` itself, or a one-line ConfigError saying it does not exist (``what`` says what belongs there)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{fn}(): {path} does not exist; give the path of {what}")
    return path


@contextlib.contextmanager
def atomic_folder(path: str | Path, overwrite: bool = False, keep_others: bool = False) -> Iterator[Path]:
    """Yield an empty folder to write into; when the block ends without error it becomes ``path``.

    An existing non-empty ``path`` is replaced only with ``overwrite=True`` (the whole folder:
    nothing of the old one survives) or ``keep_others=True``: then the old folder's entries the
    block did not write are carried into the new one (hard links where the file system allows)
    before the swap. On error the destination is untouched and the partial folder removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(path)
    partial = path.parent / f".{path.name}.{os.getpid()}{PARTIAL}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
        _fsync_tree(partial)
        empty = path.is_dir() and not path.is_symlink() and not any(path.iterdir())
        if not path.exists() or empty:
            os.replace(partial, path)  # an empty folder is replaced in the same rename
            return
        if keep_others and path.is_dir():
            _carry_over(path, partial)
        elif not overwrite:
            raise ConfigError(f"{path} already exists and is not empty; choose another path or pass overwrite=True")
        _swap(partial, path)
    finally:
        _remove(partial)  # after a swap it holds the old folder


def _carry_over(old: Path, new: Path) -> None:
    for entry in old.iterdir():
        target = new / entry.name
        if target.exists() or entry.name.endswith(PARTIAL):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def _swap(new: Path, path: Path) -> None:
    """Put ``new`` at ``path`` and the old ``path`` at ``new``, in one step where the system can."""
    if _exchange(new, path):
        return
    # no atomic exchange here: two renames, the old folder set aside first
    aside = path.parent / f".{path.name}.{os.getpid()}.old{PARTIAL}"
    os.replace(path, aside)
    os.replace(new, path)
    os.replace(aside, new)


def _exchange(a: Path, b: Path) -> bool:
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if os.name == "posix" else None
    if renameat2 is None:
        return False
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # a file system or kernel without it
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_tree(folder: Path) -> None:
    """Flush the written files to disk before the rename makes them visible (a crash keeps whole files)."""
    for root, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _remove_abandoned(path: Path) -> None:
    """Partial folders beside ``path`` left by a process that was killed while saving."""
    for partial in path.parent.glob(f".{path.name}.*{PARTIAL}"):
        pid = partial.name[len(path.name) + 2:].split(".")[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if partial.name.endswith(".old" + PARTIAL) and not path.exists():
            os.replace(partial, path)  # killed between the two renames of _swap: the old folder goes back
        else:
            _remove(partial)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def visible(folder: Path) -> bool:
    """False for the hidden partial folders of an unfinished save: readers skip them."""
    return not folder.name.startswith(".")
