"""The package's import graph is a ladder: no cycles, no upward arrows, no private names across modules.

Every ``import`` statement of every module counts, at module level or inside a function.
Importing ``a.b.c`` also imports the package ``a.b`` (its ``__init__`` runs first), so that
counts as an arrow to ``a.b`` too; the root package ``nbpeft`` is the exception (every
import of the package runs it).
"""

from __future__ import annotations

import ast
from fnmatch import fnmatch
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nbpeft"

# The ladder, bottom first: a module may import modules of its own rung or of a lower one.
# A module takes the rung of its most specific pattern; every module is named by one (no catch-all).
LAYERS: list[tuple[str, list[str], str]] = [
    ("foundation", ["nbpeft.errors", "nbpeft.layers", "nbpeft.methods.base", "nbpeft.nf4", "nbpeft._nf4_triton"],
     "the error type, the adapter layer contract and wrapper chain, the method registry, NF4 storage"),
    ("model knowledge", ["nbpeft.architectures", "nbpeft.targeting"],
     "the table of model families by role; how targets select modules"),
    ("method plugins", ["nbpeft.methods", "nbpeft.methods.*"],
     "one module per method; the core hands them what they need, they never import it"),
    ("core", ["nbpeft.core"],
     "attach, detach, merge, set_adapter, the model's adapter record"),
    ("data", ["nbpeft.data", "nbpeft.data.*", "nbpeft.datasets"],
     "training data in: sources, conversations, batches and packing, the example view, new tokens; bundled sets"),
    ("models", ["nbpeft.models"],
     "load a model and its tokenizer"),
    ("adapters", ["nbpeft.adapters", "nbpeft.adapters.*"],
     "attached adapters counted, methods compared, adapters combined"),
    ("formats", ["nbpeft.formats", "nbpeft.formats.*"],
     "adapters out: the PEFT folder, merged checkpoints, GGUF, checks per serving program"),
    ("training", ["nbpeft.training", "nbpeft.training.*"],
     "options, the loop, events, display, checkpoints, memory, precision, loss and attention, processes, jobs"),
    ("inference", ["nbpeft.inference", "nbpeft.inference.*"],
     "generation, and adapters answering the same prompts side by side"),
    ("public API", ["nbpeft"],
     "the package root: re-exports the API"),
    ("front-ends", ["nbpeft.frontend", "nbpeft.magics", "nbpeft.magics.*", "nbpeft.widgets", "nbpeft.widgets.*"],
     "IPython magics and ipywidgets panels, and their shared text module nbpeft.frontend"),
]
# Front-ends side by side: each may import nbpeft.frontend, never the other.
FORBIDDEN = [("nbpeft.magics", "nbpeft.widgets"), ("nbpeft.widgets", "nbpeft.magics")]
# The root's extension entry points (``%load_ext nbpeft``, ``nbpeft.panel``) load a front-end on demand.
# A preference lab shows itself as the lab's widgets, loaded the first time a notebook displays it.
ENTRY_POINTS = [("nbpeft", "nbpeft.magics"), ("nbpeft", "nbpeft.widgets"),
                ("nbpeft.inference.preferences", "nbpeft.widgets")]
# Known violations still being removed (none now).
ALLOWANCE: list[tuple[str, str]] = []


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _in(edge: tuple[str, str], pairs: list[tuple[str, str]]) -> bool:
    return any(_under(edge[0], a) and _under(edge[1], b) for a, b in pairs)


def module_files() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = module_files()


def layer_of(module: str) -> int:
    best: tuple[int, int] | None = None  # (specificity, layer index)
    for index, (_, patterns, _) in enumerate(LAYERS):
        for pattern in patterns:
            if fnmatch(module, pattern):
                specificity = len(pattern) + (1000 if "*" not in pattern else 0)
                if best is None or specificity > best[0]:
                    best = (specificity, index)
    assert best is not None, f"{module} is in no layer; add it to LAYERS"
    return best[1]


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def imports(module: str) -> list[tuple[str, set[str], int]]:
    """(imported module, names taken from it, line) for every import of an nbpeft module."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, set(), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(module).split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names = {alias.name for alias in node.names}
            submodules = {n for n in names if f"{source}.{n}" in MODULES}
            found += [(f"{source}.{n}", set(), node.lineno) for n in submodules]
            if names - submodules:
                found.append((source, names - submodules, node.lineno))
    return [(target, names, line) for target, names, line in found if _under(target, "nbpeft")]


def discovered(module: str) -> list[str]:
    """Submodules a package imports by discovery (``pkgutil.iter_modules``: the method plugins), unseen by ast."""
    path = MODULES[module]
    if path.name != "__init__.py" or "iter_modules" not in path.read_text():
        return []
    return [m for m in MODULES if m.rpartition(".")[0] == module]


def edges() -> dict[tuple[str, str], int]:
    """(importer, imported) -> line, with the packages each import runs, entry points left out."""
    out: dict[tuple[str, str], int] = {}
    for module in MODULES:
        for plugin in discovered(module):
            out.setdefault((module, plugin), 0)
        for target, _, line in imports(module):
            parts = target.split(".")
            # the packages between the root and the target (not the importer's own), then the target
            above = [".".join(parts[:depth]) for depth in range(2, len(parts))]
            for imported in [p for p in above if not _under(module, p)] + [target]:
                entry_point = any(module == a and _under(imported, b) for a, b in ENTRY_POINTS)
                if imported in MODULES and imported != module and not entry_point:
                    out.setdefault((module, imported), line)
    return out


EDGES = edges()


def test_every_module_is_in_a_layer() -> None:
    assert "nbpeft.core" in MODULES and "nbpeft.methods.lora" in MODULES
    for module in MODULES:
        layer_of(module)


def test_no_import_cycle() -> None:
    graph: dict[str, list[str]] = {m: [] for m in MODULES}
    for (a, b) in EDGES:
        if not _in((a, b), ALLOWANCE):
            graph[a].append(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for nxt in graph[module]:
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_no_upward_import() -> None:
    wrong = []
    for (a, b), line in sorted(EDGES.items()):
        if _in((a, b), ALLOWANCE):
            continue
        if layer_of(b) > layer_of(a):
            wrong.append(f"{MODULES[a].name}:{line} {a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})")
        elif _in((a, b), FORBIDDEN):
            wrong.append(f"{MODULES[a].name}:{line} {a} imports {b}: front-ends share nbpeft.frontend, never each other")
    assert not wrong, "\n".join(wrong)


def test_plugins_never_import_the_core() -> None:
    plugins = [a for (a, b) in EDGES if _under(a, "nbpeft.methods") and b == "nbpeft.core"]
    assert not plugins


def test_no_private_name_across_modules() -> None:
    """``from X import _name`` and ``X._name`` on an imported nbpeft module: share a public name instead."""
    wrong = []
    for module, path in MODULES.items():
        bound: dict[str, str] = {}  # local name -> nbpeft module
        tree = ast.parse(path.read_text())
        for target, names, line in imports(module):
            private = sorted(n for n in names if n.startswith("_") and not n.startswith("__"))
            wrong += [f"{path.name}:{line} from {target} import {n}" for n in private]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = _package_of(module).split(".")
                source = ".".join(base[: len(base) - (node.level - 1)] + ([node.module] if node.module else []))
                for alias in node.names:
                    if f"{source}.{alias.name}" in MODULES:
                        bound[alias.asname or alias.name] = f"{source}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if _under(alias.name, "nbpeft") and alias.asname:
                        bound[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                wrong.append(f"{path.name}:{node.lineno} {bound[node.value.id]}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def test_the_checks_catch_what_they_claim() -> None:
    """The layer table puts a plugin below the core and front-ends on top: an upward arrow is visible."""
    assert layer_of("nbpeft.methods.lora") < layer_of("nbpeft.core") < layer_of("nbpeft.formats.peft_folder") < layer_of("nbpeft")
    assert layer_of("nbpeft.methods.base") < layer_of("nbpeft.targeting") < layer_of("nbpeft.methods")
    assert layer_of("nbpeft") < layer_of("nbpeft.magics") == layer_of("nbpeft.widgets.attach") == layer_of("nbpeft.frontend")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("nbpeft.some_new_module")  # no catch-all rung: a new top-level module must be placed
    assert _in(("nbpeft.widgets.attach", "nbpeft.magics"), FORBIDDEN)
    assert ("nbpeft.formats.peft_folder", "nbpeft.core") in EDGES
    # the implicit package import: importing nbpeft.methods.base runs nbpeft/methods/__init__.py
    assert ("nbpeft.core", "nbpeft.methods") in EDGES
    # a function-level import counts, and so does the discovery of the plugins
    assert ("nbpeft.training.loop", "nbpeft.training.display") in EDGES
    assert ("nbpeft.methods", "nbpeft.methods.lora") in EDGES


def test_the_package_root_shadows_no_submodule() -> None:
    """``nbpeft.<name>`` is the submodule wherever a submodule of that name exists (``nbpeft.methods`` is callable)."""
    import importlib
    import pkgutil

    import nbpeft

    for info in pkgutil.iter_modules(nbpeft.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"nbpeft.{info.name}")
        assert getattr(nbpeft, info.name, module) is module, f"nbpeft.{info.name} is shadowed"
    assert [m.name for m in nbpeft.methods()] == [m.name for m in nbpeft.methods.base.methods()]


def test_moved_modules_still_import_from_their_old_paths() -> None:
    import importlib
    import sys

    import nbpeft

    for old, new in nbpeft.MOVED.items():
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
            moved = importlib.import_module(old)
        target = importlib.import_module(new)
        public = [n for n in vars(target) if not n.startswith("_")]
        assert public and all(getattr(moved, n) is getattr(target, n) for n in public)
    from nbpeft.events import Listener  # the README's old spelling

    assert Listener is importlib.import_module("nbpeft.training.events").Listener
