"""JupyterLab in a real browser: 04's review view and 01's curation view, driven by Playwright on Debian's Chromium.

A finished tiny run is built (01's real split of the sample data; fixture answers and judgments for cycle 0,
see reviewrun.py). JupyterLab starts on 127.0.0.1 with a token at the project root; 04's own cells (parameters,
config, and the whole "Review answers side by side" section) run in its kernel with interactive=True. The
test pages with a button and with the keyboard, filters, searches, flags a reference and checks that
review.json changed; then 01 runs in JupyterLab, must drop the flagged reference, and its curation view is
driven (filter, search, unsaved-edit warning, reject). Screenshots go to outputs/browser/.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from reviewrun import BASES, make_reviewed_run

from llamaduo_nb.coverage import load_decisions
from llamaduo_nb.jsonio import read_jsonl
from llamaduo_nb.review import load_review
from llamaduo_nb.runner import PROJECT_ROOT

CHROMIUM = os.environ.get("LLAMADUO_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = PROJECT_ROOT / "outputs" / "browser"
WAIT_MS = 90_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Chromium not found: install Debian's chromium (`apt-get install -y chromium`; .ci/run does "
        "this as root) or point LLAMADUO_CHROMIUM at a Chromium binary",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_notebook(stage: str, values: dict, out: Path, *, review_only: bool = False) -> Path:
    """The committed notebook with an injected parameters cell (as Papermill injects it, unexecuted).

    review_only keeps 04's title, parameters and config cells and its review section: the judging cells
    would call the judge model, which this test replaces by fixture judgments.
    """
    nb = nbformat.read(PROJECT_ROOT / "notebooks" / f"{stage}.ipynb", as_version=4)
    tagged = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items()))
    cells = [*nb.cells[: tagged + 1], injected, *nb.cells[tagged + 1 :]]
    if review_only:
        start = next(i for i, c in enumerate(cells) if c.source.startswith("## Review answers side by side"))
        cells = [*cells[: tagged + 3], *cells[start:]]
    nb.cells = cells
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return out


@pytest.fixture
def lab(tmp_path):
    """JupyterLab on 127.0.0.1 at the project root (as `make lab` starts it), with a token; stopped after."""
    port, token = free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
    }
    # no "Jupyter news?" toast over the widgets
    notification = (
        tmp_path / "lab-settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    )
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    log = open(tmp_path / "jupyterlab.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={PROJECT_ROOT}",
            *(["--allow-root"] if os.geteuid() == 0 else []),  # CI containers run as root
        ],  # fmt: skip
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"JupyterLab did not start: {(tmp_path / 'jupyterlab.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield base, token
    finally:
        stop(server)
        log.close()


def stop(server: subprocess.Popen) -> None:
    """Stop the JupyterLab this test started (its own process group: the server and its kernels)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield browser.pages[0] if browser.pages else browser.new_page()
        finally:
            browser.close()


def open_and_run_all(page, base: str, token: str, notebook: Path) -> None:
    # ?reset: a fresh workspace holding only this notebook (no tab of an earlier notebook is restored)
    page.goto(f"{base}/lab/tree/{notebook.relative_to(PROJECT_ROOT).as_posix()}?reset&token={token}")
    page.wait_for_selector(".jp-Notebook", timeout=WAIT_MS)
    # the status bar names the notebook's kernel once it runs: the project kernel, found without a dialog
    page.locator("#jp-main-statusbar", has_text="Python (llamaduo-nb) | Idle").wait_for(timeout=WAIT_MS)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def shot(view, name: str) -> None:
    """A screenshot of one view (an element screenshot scrolls it into sight first)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    view.screenshot(path=str(SHOTS / f"{name}.png"))


def wait_for(predicate, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_review_and_curation_views_in_jupyterlab(tmp_path, lab, page):
    from playwright.sync_api import expect

    base, token = lab
    # generous waits: a shared CI machine can be slow, and nothing here is a speed claim
    expect.set_options(timeout=30_000)
    page.set_default_timeout(WAIT_MS)
    layout = make_reviewed_run(tmp_path / "outputs" / "browser-run")
    run_dir = os.path.relpath(layout.root, PROJECT_ROOT)  # project-relative, as a user types it
    work = SHOTS / "notebooks"
    shutil.rmtree(work, ignore_errors=True)
    review_nb = stage_notebook(
        "04_evaluate", {"run_dir": run_dir, "cycle": 0, "interactive": True}, work / "04_review.ipynb",
        review_only=True,
    )  # fmt: skip
    coverage_nb = stage_notebook(
        "01_coverage", {"run_dir": run_dir, "interactive": True}, work / "01_curation.ipynb"
    )

    # ---- 04: the review view
    open_and_run_all(page, base, token, review_nb)
    view = page.locator(".llamaduo-review")
    expect(view).to_be_visible(timeout=WAIT_MS)
    position = view.locator(".llamaduo-position")
    expect(position).to_have_text(f"1/{len(BASES)}", timeout=WAIT_MS)
    expect(view.locator(".llamaduo-candidate")).to_have_count(3)  # K=2 student samples + 1 baseline
    shot(view, "04_review_first")
    view.locator("button", has_text="next ▶").click()
    expect(position).to_have_text(f"2/{len(BASES)}")
    card = view.locator(".llamaduo-review-card")
    card.hover()
    page.keyboard.press("j")
    expect(position).to_have_text(f"3/{len(BASES)}")
    page.keyboard.press("k")
    expect(position).to_have_text(f"2/{len(BASES)}")

    below = sum(b < 70 for b in BASES)
    view.locator(".widget-dropdown", has_text="model").locator("select").select_option(label="student")
    view.locator(".widget-checkbox", has_text="below ζ").locator("input").check()
    expect(position).to_have_text(f"2/{below}")  # the shown prompt (2nd, below ζ) stays shown
    expect(view.locator(".llamaduo-candidate")).to_have_count(2)
    shot(view, "04_review_below_zeta")
    view.locator(".widget-checkbox", has_text="below ζ").locator("input").uncheck()
    view.locator(".widget-dropdown", has_text="model").locator("select").select_option(label="(all)")
    expect(position).to_have_text(f"2/{len(BASES)}")
    test_rows = read_jsonl(layout.test_file)
    target = test_rows[3]
    view.locator("input[placeholder^='search']").fill(target["id"])
    expect(position).to_have_text("1/1")
    expect(view.locator(".llamaduo-review-item code").first).to_have_text(target["id"])

    assert not layout.review_file.exists()
    view.locator("button", has_text="reference is bad").click()
    saved = wait_for(lambda: layout.review_file.is_file() and load_review(layout.review_file), "review.json")
    assert saved[target["id"]]["bad_reference"] is True and saved[target["id"]]["cycle"] == 0
    expect(view.locator(".llamaduo-counts")).to_contain_text("1 bad references")
    shot(view, "04_review_flagged")

    # ---- 01 run again in JupyterLab: the flagged reference is dropped; then its curation view
    before = json.loads(layout.coverage_report.read_text())
    open_and_run_all(page, base, token, coverage_nb)
    curation = page.locator(".llamaduo-curation")
    try:
        expect(curation).to_be_visible(timeout=WAIT_MS)
    except AssertionError:
        page.screenshot(path=str(SHOTS / "failure.png"))
        raise
    ids = {r["id"] for r in read_jsonl(layout.test_file)}
    assert ids == {r["id"] for r in test_rows} - {target["id"]}
    report = json.loads(layout.coverage_report.read_text())
    assert report["review"]["references_dropped"] == 1 and report["test"] == before["test"] - 1
    shot(curation, "01_curation_first")

    category = target["category"]
    curation.locator(".widget-dropdown", has_text="category").locator("select").select_option(label=category)
    expect(curation.locator(".widget-html", has_text="decision:").first).to_contain_text(category)
    curation.locator("input[placeholder^='search']").fill("zzz-matches-nothing")
    expect(curation.locator(".widget-html", has_text="no row matches")).to_be_visible()
    curation.locator("input[placeholder^='search']").fill("")
    shown = curation.locator(".widget-html", has_text="decision:").first.locator("code").inner_text()
    curation.locator(".widget-textarea textarea").nth(1).fill("a half-typed edit")
    expect(curation.locator(".llamaduo-unsaved")).to_be_visible()
    curation.locator("button", has_text="next ▶").click()
    expect(curation.locator(".llamaduo-warning")).to_be_visible()
    shot(curation, "01_curation_unsaved_warning")
    curation.locator("button", has_text="Reject").click()
    decisions = wait_for(lambda: load_decisions(layout.curation_file), "curation.json")
    assert decisions == {shown: {"action": "reject"}}
    shot(curation, "01_curation_rejected")
