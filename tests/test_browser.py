"""The panel in a real browser: JupyterLab runs notebooks/04_widgets.ipynb, the panel renders,
changing r in the page changes the preview, Attach leaves no red error line behind, Stop ends a
training run while it is running, Show example renders an example in the Train tab, and the
Adapters tab keeps its buttons on one row under a table whose heads sit over their columns, with
its Export rows below; the Runs tab lists the kernel's runs and plots them; in the Answers tab the
preference lab opens over three samples of the trained adapter, a click picks one, and a cell run
in the kernel finds the pairs in ``prefs``. Each tab is photographed and the pictures checked too.

Needs the ``browser`` extra (jupyterlab, playwright) and a Chromium binary (Debian's
``chromium`` package; another path through NBPEFT_CHROMIUM). Without them the test is skipped
with a message that says what to install. The screenshots go to artifacts/browser_*.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "04_widgets.ipynb"
ARTIFACTS = ROOT / "artifacts"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def chromium_path() -> str | None:
    candidates = [os.environ.get("NBPEFT_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                  shutil.which("chromium-browser")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (the kernels a Jupyter server started, in their own sessions)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(os.getpgid(pid), sig)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on 127.0.0.1 with a copy of the notebook; always stopped afterwards."""
    pytest.importorskip("jupyterlab", reason="the browser test needs jupyterlab: pip install -e '.[browser]'")
    pytest.importorskip("playwright", reason="the browser test needs playwright: pip install -e '.[browser]'")
    if chromium_path() is None:
        pytest.skip("the browser test needs Chromium: apt-get install -y chromium (or set NBPEFT_CHROMIUM)")
    home = tmp_path_factory.mktemp("lab")
    (home / "work").mkdir()
    shutil.copy(NOTEBOOK, home / "work" / NOTEBOOK.name)  # the page saves into the copy, never the repo
    port, token = free_port(), os.urandom(12).hex()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces")}
    news = home / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={home / 'work'}", "--LabApp.news_url=", "--ServerApp.open_browser=False"]
    if os.geteuid() == 0:  # containers often run as root
        command.append("--allow-root")
    log = open(home / "server.log", "wb")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    kernels: set[int] = set()
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("JupyterLab did not start:\n" + (home / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield {"url": url, "token": token, "log": home / "server.log", "kernels": kernels, "server": server}
    finally:
        kernels.update(children(server.pid))
        try:  # shut the kernels down through the server first, then stop everything that is left
            request = urllib.request.Request(f"{url}/api/kernels?token={token}")
            with urllib.request.urlopen(request, timeout=5) as response:
                for kernel in json.load(response):
                    urllib.request.urlopen(urllib.request.Request(
                        f"{url}/api/kernels/{kernel['id']}?token={token}", method="DELETE"), timeout=10)
        except OSError:
            pass
        kill_group(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            kill_group(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        for pid in kernels:
            kill_group(pid, signal.SIGKILL)
        log.close()


def start_kernel(page, timeout_s: float = 120) -> None:
    """Wait until the notebook's kernel is idle, accepting the kernel dialog JupyterLab sometimes opens."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dialog = page.locator(".jp-Dialog .jp-mod-accept")
        if dialog.count() and dialog.first.is_visible():
            dialog.first.click()
        elif page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count():
            page.wait_for_timeout(1000)  # a dialog may still open right after the page settles
            if not page.locator(".jp-Dialog").count():
                return
        page.wait_for_timeout(250)
    raise TimeoutError("the notebook's kernel did not start")


def preview_number(text: str) -> int:
    found = re.search(r"would train ([\d,]+) trainable", text)
    assert found, text
    return int(found[1].replace(",", ""))


def red_pixels(png: Path) -> int:
    """Pixels in the panel's error red (#b00020), the colour of every error line."""
    from PIL import Image

    image = Image.open(png).convert("RGB")
    return sum(1 for r, g, b in image.getdata() if abs(r - 0xB0) < 24 and g < 40 and abs(b - 0x20) < 32)


# For each column head: the x where its text starts and ends, and the same for the first cell below it.
HEAD_AND_CELL_TEXT = """table => {
  const span = el => { const r = document.createRange(); r.selectNodeContents(el); const b = r.getBoundingClientRect();
                       return [b.left, b.right, b.height, getComputedStyle(el).textAlign]; };
  const heads = [...table.querySelectorAll('th')], cells = [...table.querySelectorAll('tr')[1].querySelectorAll('td')];
  return heads.map((th, i) => ({head: th.textContent, th: span(th), td: span(cells[i])}));
}"""


def test_panel_in_jupyterlab(lab):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{lab['url']}/lab/tree/{NOTEBOOK.name}?token={lab['token']}")
            page.locator(".jp-Notebook").first.wait_for(timeout=120_000)
            start_kernel(page)
            lab["kernels"].update(children(lab["server"].pid))

            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
            panel = page.locator(".nbpeft-panel").first
            panel.wait_for(timeout=90_000)
            lab["kernels"].update(children(lab["server"].pid))
            # the notebook's last cell lists the methods: every cell ran
            expect(page.get_by_text("Bottleneck adapters").first).to_be_visible(timeout=400_000)

            panel.locator(".lm-TabBar-tab", has_text="Attach").click()
            preview = panel.locator(".nbpeft-preview")
            expect(preview).to_contain_text("already attached", timeout=30_000)  # the notebook attached 'default'
            name = panel.locator(".nbpeft-name input")
            name.fill("extra")
            name.press("Enter")
            expect(preview).to_contain_text("would train", timeout=30_000)
            before = preview_number(preview.inner_text())
            r = panel.locator(".nbpeft-opt-r input")
            r.fill("32")
            r.press("Enter")
            expect(preview).to_contain_text("1,843,200", timeout=30_000)  # 32 · (576+576 + 576+192) · 30 layers
            after = preview_number(preview.inner_text())
            assert before == 8 * 1920 * 30 and after == 32 * 1920 * 30
            panel.screenshot(path=str(ARTIFACTS / "browser_panel.png"))

            # an invalid choice: a red line, Attach disabled (and the picture shows the red: the check below sees it)
            r.fill("0")
            r.press("Enter")
            expect(preview).to_contain_text("r=0 must be a positive integer", timeout=30_000)
            attach = panel.locator(".nbpeft-attach")
            expect(attach).to_be_disabled()
            panel.screenshot(path=str(ARTIFACTS / "browser_attach_invalid.png"))
            assert red_pixels(ARTIFACTS / "browser_attach_invalid.png") > 20
            r.fill("32")
            r.press("Enter")
            expect(attach).to_be_enabled(timeout=30_000)
            targets_help = panel.locator(".nbpeft-targets-help")
            expect(targets_help).to_contain_text("2 selected: q_proj, v_proj")  # as the notebook chose them
            options = panel.locator(".nbpeft-targets select option")
            offered = {o.split()[0] for o in options.all_inner_texts()}  # the 7 linears and the embedding
            assert options.count() == 8 and "embed_tokens" in offered and not {"lm_head", "norm"} & offered
            panel.locator(".nbpeft-targets select").select_option(label=["q_proj ×30", "k_proj ×30", "v_proj ×30"])
            expect(targets_help).to_contain_text("3 selected: q_proj, k_proj, v_proj", timeout=30_000)
            attach.click()
            message = panel.locator(".nbpeft-message")
            expect(message).to_contain_text("Adapter 'extra'", timeout=30_000)
            expect(preview).to_contain_text("already attached", timeout=30_000)  # the note that follows the model
            panel.screenshot(path=str(ARTIFACTS / "browser_attach.png"))
            red_lines = panel.locator(".nbpeft-preview span[style*='#b00020'], .nbpeft-message span[style*='#b00020']")
            assert red_lines.count() == 0  # no stale error line, in the page...
            assert red_pixels(ARTIFACTS / "browser_attach.png") == 0  # ...nor in the picture

            # Stop while a run is going: the kernel handles the click during training
            panel.locator(".lm-TabBar-tab", has_text="Train").click()
            steps = panel.locator(".nbpeft-train-steps input")
            steps.fill("500")
            steps.press("Enter")
            panel.locator(".nbpeft-train-start").click()
            status = panel.locator(".nbpeft-train-status")
            expect(status).to_contain_text(re.compile(r"step [1-9]\d*/500"), timeout=120_000)
            panel.locator(".nbpeft-train-stop").click()
            expect(status).to_contain_text("stopped after step", timeout=120_000)
            stopped_at = int(re.search(r"stopped after step (\d+) of 500", status.inner_text())[1])
            assert 1 <= stopped_at < 20
            panel.locator(".nbpeft-train-show-example").click()
            example = panel.locator(".nbpeft-train-example .nbpeft-example")
            expect(example).to_contain_text("row 0 (prompt-response)", timeout=30_000)
            expect(example).to_contain_text("under the loss")
            panel.screenshot(path=str(ARTIFACTS / "browser_train.png"))

            panel.locator(".lm-TabBar-tab", has_text="Adapters").click()
            table = panel.locator(".nbpeft-adapters table")
            expect(table).to_contain_text("extra", timeout=30_000)
            for part in ("export-format", "export-path", "export", "check", "to-lora"):
                expect(panel.locator(f".nbpeft-adapters-{part}")).to_be_visible()
            panel.screenshot(path=str(ARTIFACTS / "browser_adapters.png"))
            row = panel.locator(".nbpeft-adapters-buttons button")
            assert row.count() == 5 and any("Disable all" in t for t in row.all_inner_texts())
            boxes = [row.nth(i).bounding_box() for i in range(5)]
            assert max(b["y"] for b in boxes) - min(b["y"] for b in boxes) < 2, boxes  # one row
            assert max(b["x"] + b["width"] for b in boxes) <= panel.bounding_box()["x"] + panel.bounding_box()["width"]
            for column in table.evaluate(HEAD_AND_CELL_TEXT):
                (th_left, th_right, th_height, th_align), (td_left, td_right, td_height, td_align) = column["th"], column["td"]
                assert th_align == td_align, column
                edge = (th_left, td_left) if th_align == "left" else (th_right, td_right)
                assert abs(edge[0] - edge[1]) < 2, column  # the head's text lines up with its column's
                assert th_height < 1.5 * td_height, column  # one line: not squashed into two

            # Runs: the runs this kernel trained (the notebook's and the stopped one) are listed and plotted
            panel.locator(".lm-TabBar-tab", has_text="Runs").click()
            panel.locator(".nbpeft-runs-refresh").click()
            runs_table = panel.locator(".nbpeft-runs-table table")
            expect(runs_table).to_contain_text("stopped", timeout=30_000)
            expect(runs_table).to_contain_text("finished")
            panel.locator(".nbpeft-runs-plot-button").click()
            expect(panel.locator(".nbpeft-runs-plot")).to_be_visible(timeout=30_000)
            panel.screenshot(path=str(ARTIFACTS / "browser_runs.png"))

            # Answers: the preference lab over three samples of the trained adapter; a click records pairs
            panel.locator(".lm-TabBar-tab", has_text="Answers").click()
            panel.locator(".nbpeft-answers-prompts textarea").fill("What is your favourite food?")
            panel.locator(".nbpeft-answers-adapters select").select_option(label=["default"])
            for part, value in (("samples", "3"), ("temperature", "1.5"), ("max-new-tokens", "8")):
                box = panel.locator(f".nbpeft-answers-{part} input")
                box.fill(value)
                box.press("Enter")
            panel.locator(".nbpeft-answers-collect").click()
            picks = panel.locator(".nbpeft-lab-pick")
            expect(picks).to_have_count(3, timeout=120_000)
            picks.first.click()
            expect(panel.locator(".nbpeft-lab-progress")).to_contain_text("1 of 1 judged", timeout=30_000)
            message = panel.locator(".nbpeft-lab-message")
            expect(message).to_contain_text("pairs so far", timeout=30_000)
            recorded = int(re.search(r"(\d+) pairs so far", message.inner_text())[1])
            assert 1 <= recorded <= 2, recorded  # the first sample over each other one that differs from it
            panel.screenshot(path=str(ARTIFACTS / "browser_lab.png"))
            page.locator(".jp-Notebook .jp-Cell .jp-InputArea-prompt").last.click()
            page.keyboard.press("Escape")
            page.keyboard.press("b")  # a new cell below the last one
            page.keyboard.press("Enter")
            page.keyboard.type("print('pairs in the kernel:', len(prefs), prefs[0]['prompt'])")
            page.keyboard.press("Shift+Enter")
            expect(page.get_by_text(f"pairs in the kernel: {recorded} What is your favourite food?")).to_be_visible(
                timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "browser_notebook.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "browser_failure.png"))
            raise
        finally:
            browser.close()
