"""JupyterLab in a real browser: 04's review view and 01's curation view, driven by Playwright on Debian's Chromium.

A finished tiny run is built (01's real split of the sample data; fixture answers and judgments for cycle 0,
see reviewrun.py). JupyterLab starts on 127.0.0.1 with a token at the project root; 04's own cells (parameters,
config, and the whole "Review answers side by side" section) run in its kernel with interactive=True. The
test checks layout facts of the review view at 1,600 x 1,000 (a label prompt's card, six candidates and its
decision buttons inside the first viewport; no horizontal scroll; chips of the deciding judge), pages with a
button and with the keyboard, filters, searches, flags a reference and checks that review.json changed; then
01 runs in JupyterLab, must drop the flagged reference and show it as dropped by review, and its curation
view is driven (filter, search, unsaved-edit warning, reject). Last, the committed gallery (docs/demo) is
rendered as HTML at GitHub's width. Screenshots go to outputs/browser/; the measured card height is printed
and written to outputs/browser/layout.json.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
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
from reviewrun import BASES, JUDGE, SERVICE, make_reviewed_run

from llamaduo_nb import evaluate, gallery, summary
from llamaduo_nb.config import load_config
from llamaduo_nb.coverage import load_decisions
from llamaduo_nb.jsonio import read_jsonl, write_json
from llamaduo_nb.notebook import resolve_project_paths
from llamaduo_nb.review import load_review
from llamaduo_nb.runner import PROJECT_ROOT, RunState

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
VIEWPORT = {"width": 1600, "height": 1000}
GITHUB_WIDTH_PX = 1012  # GitHub's widest README column (minus its padding: the tables' room)

# scrollable elements that scroll sideways, from `el` up to the document (the notebook's own scroller too)
SIDEWAYS_JS = """el => {
  const bad = [];
  for (let n = el; n; n = n.parentElement) {
    const s = getComputedStyle(n);
    if (n.scrollWidth > n.clientWidth + 1 && ['auto', 'scroll'].includes(s.overflowX))
      bad.push(`${n.tagName}.${n.className}: ${n.scrollWidth} > ${n.clientWidth}`);
  }
  const d = document.scrollingElement;
  if (d.scrollWidth > window.innerWidth + 1) bad.push(`document: ${d.scrollWidth} > ${window.innerWidth}`);
  return bad;
}"""

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


@pytest.fixture(autouse=True)
def shots_folder_to_ourselves():
    """outputs/browser/ is the checkout's one screenshot folder: two test runs of a checkout take turns at it
    (one pytest-xdist session runs this test on one worker; a second session waits here)."""
    SHOTS.parent.mkdir(parents=True, exist_ok=True)
    with open(SHOTS.parent / ".browser.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


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
            viewport=VIEWPORT,
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


def box(locator) -> dict:
    found = locator.bounding_box()
    assert found is not None, f"{locator} is not rendered"
    return found


def render_gallery(page, readme: Path, out: Path) -> dict:
    """The gallery README as HTML at GitHub's README width (tables with GitHub's cell padding); returns the
    widths of the page's column and of its widest table."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(readme.read_text(encoding="utf-8"))
    out.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><base href='{readme.parent.as_uri()}/'><style>"
        f"body{{font:16px/1.5 -apple-system,'Segoe UI',sans-serif;max-width:{GITHUB_WIDTH_PX - 64}px;"
        "margin:0 auto;padding:32px} table{border-collapse:collapse;display:block;overflow:auto;max-width:100%}"
        "td,th{border:1px solid #d0d7de;padding:6px 13px} img{max-width:100%}</style></head>"
        f"<body>{body}</body></html>",
        encoding="utf-8",
    )
    page.goto(out.as_uri())
    page.wait_for_load_state("load")
    widths = page.evaluate(
        "() => { const b = document.body, cs = getComputedStyle(b);"
        " return {column: b.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight),"
        " tables: [...document.querySelectorAll('table')].map(t => t.scrollWidth)}; }"
    )
    page.screenshot(path=str(out.with_suffix(".png")), full_page=True)
    return widths


def fresh_gallery(layout, out: Path) -> Path:
    """`make docs` on the fixture run, as this code writes it: metrics, Table 1 (the base student and the
    service LLM from baselines/), summary.md and Fig. 2, then the gallery. Returns its README."""
    cfg = resolve_project_paths(load_config(layout.params_file))
    judged = [j for j in read_jsonl(layout.judgments_file(0)) if "model" not in j]
    write_json(layout.metrics_file(0), evaluate.compute_metrics(judged, cfg.evaluate, 0, n_boot=100))
    models = {
        evaluate.BASE_MODEL: ("base", read_jsonl(layout.baseline_judgments_file("base_student"))),
        "cycle 0": ("local", judged),
        SERVICE: ("service", read_jsonl(layout.baseline_judgments_file(SERVICE))),
    }
    long = evaluate.table1_long(models, cfg.evaluate, n_boot=100)
    evaluate.write_table1(long, cfg.evaluate.zetas, layout.table1_csv(0), layout.table1_md(0))
    summary.write_summary(cfg, layout, RunState(stop_reason="a browser-test fixture", timings={"total": 0.0}))
    gallery.build_gallery(layout.root, out)
    return out / "README.md"


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
    layout = make_reviewed_run(tmp_path / "outputs" / "browser-run", demo_like=True)
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
    # a label prompt (the first test prompt is a Classification one), six candidates side by side
    first = read_jsonl(layout.test_file)[0]
    assert first["category"] == "Classification" and len(first["response"].split()) <= 4
    candidates = view.locator(".llamaduo-candidate")
    expect(candidates).to_have_count(6)  # student, base student, service LLM: K = 2 each
    tops = {round(box(candidates.nth(i))["y"]) for i in range(6)}
    assert len(tops) == 2, f"six candidates should sit in two rows (one per sample), got tops {tops}"
    # chips of the deciding judge (the demo's evaluate.decision_judges, passed by 04) on every answer
    deciding = view.locator(".llamaduo-chip[data-judge='rougeL']")
    expect(deciding).to_have_count(6)
    assert all("ld-ok" in c or "ld-low" in c for c in deciding.evaluate_all("cs => cs.map(c => c.className)"))
    judge_select = view.locator(".widget-dropdown", has_text="judge").locator("select")
    chosen = judge_select.evaluate("s => s.options[s.selectedIndex].text").replace("\xa0", " ")
    assert chosen == "deciding judges (rougeL)"

    # the card and its decision buttons inside the first viewport, once the view's top is at the top
    view.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(300)
    card = view.locator(".llamaduo-review-card")
    bad_button = view.locator("button", has_text="reference is bad")
    card_box, button_box = box(card), box(bad_button)
    facts = {
        "viewport": VIEWPORT,
        "view_top_px": round(box(view)["y"]),
        "card_top_px": round(card_box["y"]),
        "card_height_px": round(card_box["height"]),
        "card_bottom_px": round(card_box["y"] + card_box["height"]),
        "card_width_px": round(card_box["width"]),
        "buttons_top_px": round(button_box["y"]),
    }
    print("review view layout at 1600 x 1000:", facts)
    SHOTS.mkdir(parents=True, exist_ok=True)
    (SHOTS / "layout.json").write_text(json.dumps(facts, indent=1))
    page.screenshot(path=str(SHOTS / "04_review_viewport.png"))
    assert card_box["y"] >= 0 and facts["card_bottom_px"] <= VIEWPORT["height"], facts
    assert 0 <= button_box["y"] and button_box["y"] + button_box["height"] <= VIEWPORT["height"], facts
    assert view.evaluate(SIDEWAYS_JS) == [], "the review view scrolls sideways"
    shot(view, "04_review_first")

    # a pressed decision looks pressed; the chip's rationale and the other judges unfold on a click
    other = view.locator(".ld-more summary").first
    other.click()
    expect(view.locator(f".llamaduo-chip[data-judge='{JUDGE}']").first).to_be_visible()
    view.locator(".ld-more[open] .ld-why summary").first.click()
    expect(view.locator(".ld-rationale").first).to_contain_text("judged against the reference")
    shot(view, "04_review_unfolded")
    view.locator("button", has_text="next ▶").click()
    expect(position).to_have_text(f"2/{len(BASES)}")
    view.locator(".llamaduo-review-item").hover()  # keys act over the answers (not the decision bar)
    page.keyboard.press("j")
    expect(position).to_have_text(f"3/{len(BASES)}")
    page.keyboard.press("k")
    expect(position).to_have_text(f"2/{len(BASES)}")

    below = sum(b < 70 for b in BASES)
    view.locator(".widget-dropdown", has_text="model").locator("select").select_option(label="student")
    view.locator(".widget-checkbox", has_text="below ζ").locator("input").check()
    expect(position).to_have_text(f"2/{below}")  # the shown prompt (2nd, below ζ) stays shown
    expect(view.locator(".llamaduo-candidate")).to_have_count(2)  # the student's two samples
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
    pressed = view.locator("button", has_text="reference is bad")
    expect(pressed).to_contain_text("✔")
    expect(pressed).to_have_class(re.compile("mod-danger"))
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
    assert report["reviewed_rows"][target["id"]]["state"] == "dropped"
    shot(curation, "01_curation_first")
    # the dropped row shows as such, with the cycle whose review dropped it
    curation.locator(".widget-dropdown", has_text="state").locator("select").select_option(
        label="dropped by review"
    )
    expect(curation.locator(".llamaduo-review-state")).to_contain_text("reference marked bad in cycle 0")
    expect(curation.locator(".widget-html", has_text="decision:").first.locator("code")).to_have_text(
        target["id"]
    )
    shot(curation, "01_curation_dropped_by_review")
    curation.locator(".widget-dropdown", has_text="state").locator("select").select_option(label="(all)")

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

    # ---- the gallery as a reader sees it on GitHub: this code's tables fit the column, none scrolls sideways
    readme = fresh_gallery(layout, tmp_path / "docs")
    widths = render_gallery(page, readme, SHOTS / "gallery.html")
    print("gallery column and table widths:", widths)
    assert widths["tables"] and max(widths["tables"]) <= widths["column"], widths
    # and the committed one (docs/demo, from the last `make docs`), for comparison
    committed = render_gallery(
        page, PROJECT_ROOT / "docs" / "demo" / "README.md", SHOTS / "gallery_committed.html"
    )
    print("committed gallery column and table widths:", committed)
