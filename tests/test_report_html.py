"""report.html: the page's data agrees with results.parquet and with independent computations, data
is escaped (a hostile id is text, never markup or script), and a real headless Chromium opening the
file:// page sees the table's numbers, k loaded thumbnails per query, working filters, the map's
hover frames, confusion matrices, training curves and no console error."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import confusion_matrix

from polyp_ssl.eval import report_html_data as data
from polyp_ssl.eval.report import main as report_main
from polyp_ssl.eval.report_html import CurvesView, PageData, SubjectView
from polyp_ssl.eval.report_html_render import render_page
from polyp_ssl.eval.report_html_thumbs import read_thumbs
from tests.embed_factory import make_ckpt, make_tiny_root

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HOSTILE = '</script><script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">&amp;"\'\u2028'


def _write_metrics(run: Path, steps: int = 12) -> None:
    d = run / "logs" / "version_0"
    d.mkdir(parents=True)
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "train/loss_step", "train/lr"])
        for s in range(steps):
            w.writerow([s // 4, s, 5.0 / (1 + s), 1e-3 * 0.9**s])


def _report(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polyp_ssl", "report", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def page_run(tmp_path_factory):
    """`polyp-ssl report` as a user runs it (a subprocess, report.html by default): a run folder with
    a checkpoint and CSV logs, and the descriptor baseline, on a tiny ingested root."""
    base = tmp_path_factory.mktemp("report_html")
    root = make_tiny_root(base / "root")
    run_dir = base / "runs" / "tiny"
    (run_dir / "checkpoints").mkdir(parents=True)
    make_ckpt(run_dir / "checkpoints" / "last.ckpt")
    _write_metrics(run_dir)
    out = base / "out"
    common = [str(run_dir), "--dataset_root", str(root), "--probe_fragment_length", "2", "--baselines"]
    proc = _report([*common, "descriptor", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"page: {out / 'report.html'}" in proc.stdout
    return root, run_dir, out, common


# ------------------------------------------------------------------ the page's data, no browser


class _Cells(HTMLParser):
    """Every results/difference table cell's data attributes and shown text."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[dict] = []
        self.label: str | None = None
        self.cur: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-label" in a:
            self.label = a["data-label"]
        if tag == "td" and "data-kind" in a:
            self.cur = {**a, "label": self.label, "text": ""}

    def handle_endtag(self, tag):
        if tag == "td" and self.cur is not None:
            self.cells.append(self.cur)
            self.cur = None

    def handle_data(self, text):
        if self.cur is not None:
            self.cur["text"] += text


def _page_cells(path: Path) -> list[dict]:
    p = _Cells()
    p.feed(path.read_text(encoding="utf-8"))
    return p.cells


def test_table_cells_equal_results_parquet(page_run):
    _, _, out, _ = page_run
    rows = pq.read_table(out / "results.parquet").to_pylist()
    cells = _page_cells(out / "report.html")
    values = {(c["label"], c["data-task"], c["data-metric"]): c for c in cells if c["data-kind"] == "value"}
    diffs = {(c["label"], c["data-task"], c["data-metric"]): c for c in cells if c["data-kind"] == "diff"}
    assert len(values) == len(rows) and len(rows) >= 18
    md = (out / "report.md").read_text()
    for r in rows:
        c = values[(r["checkpoint"], r["task"], r["metric"])]
        assert float(c["data-value"]) == r["value"]  # repr round-trips: exactly the file's float
        assert float(c["data-low"]) == r["value_ci_low"] and float(c["data-high"]) == r["value_ci_high"]
        shown = " ".join(c["text"].replace(" (!)", "").split())
        assert shown in md  # the same cell text as report.md's table
        if r["diff_vs_baseline"] is not None:
            d = diffs[(r["checkpoint"], r["task"], r["metric"])]
            assert float(d["data-value"]) == r["diff_vs_baseline"]
            assert (float(d["data-low"]), float(d["data-high"])) == (r["diff_ci_low"], r["diff_ci_high"])
    assert len(diffs) == sum(r["diff_vs_baseline"] is not None for r in rows) > 0


def test_page_is_self_contained(page_run):
    _, _, out, _ = page_run
    text = (out / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert "@import" not in text and "url(http" not in text
    page = json.loads(re.search(r'id="report-data">(.*?)</script>', text, re.S).group(1))
    assert page["images"] and all(
        v["mid"].startswith("data:image/jpeg;base64,") for v in page["images"].values()
    )
    assert len(text.encode()) < 5 * 2**20


@pytest.mark.slow  # a second report run (about 30 s on 2 busy cores)
def test_no_html_keeps_report_md_and_results(page_run, tmp_path):
    """--no-html: no page; report.md and results.parquet as with the page (but for the time and command)."""
    _, _, out, common = page_run
    other = tmp_path / "plain"
    proc = _report([*common, "descriptor", "--out", str(other), "--no-html"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (other / "report.html").exists() and "page:" not in proc.stdout

    def lines(p: Path) -> list[str]:  # but for the time, the command and the tasks' seconds
        keep = [x for x in p.read_text().splitlines() if not x.startswith(("- created:", "- command:"))]
        return [re.sub(r"\(\d+\.\d s\)$", "(s)", x) for x in keep]

    with_page = lines(out / "report.md")
    assert lines(other / "report.md") == [x.replace(str(out), str(other)) for x in with_page]
    a, b = (pq.read_table(p / "results.parquet").drop(["created", "time_s"]) for p in (out, other))
    assert a.equals(b)


def test_gallery_queries_match_an_independent_ranking():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 8))
    ids = [f"p{i % 7}" for i in range(30)]
    rows = data.gallery_queries(x, ids, n_queries=10, k=4)
    assert len(rows) == 10
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for r in rows:
        q = r["q"]
        sims = unit @ unit[q]
        others = sorted((i for i in range(30) if i != q), key=lambda i: (-sims[i], i))
        assert [t for t, _, _ in r["top"]] == others[:4]
        assert [ok for _, _, ok in r["top"]] == [ids[i] == ids[q] for i in others[:4]]
        assert np.allclose([s for _, s, _ in r["top"]], sims[others[:4]], atol=1e-4)
        assert r["first_hit"] == 1 + next(j for j, i in enumerate(others) if ids[i] == ids[q])
    # bounded: never more queries than asked, only queries with a positive
    assert len(data.gallery_queries(x, ids, n_queries=3)) == 3
    assert data.gallery_queries(x, [f"u{i}" for i in range(30)]) == []


def test_reid_operating_point_against_brute_force():
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(6, 5))
    ids = [f"p{i % 6}" for i in range(40)]
    x = centres[[i % 6 for i in range(40)]] + 0.9 * rng.normal(size=(40, 5))
    op = data.reid_operating_point(x, ids, max_fpr=0.1, per_group=5)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    pairs = [(a, b, float(unit[a] @ unit[b]), ids[a] == ids[b]) for a in range(40) for b in range(a + 1, 40)]
    t = op["threshold"]
    neg = [s for _, _, s, same in pairs if not same]
    pos = [s for _, _, s, same in pairs if same]
    fp = sum(s > t + 1e-9 for s in neg)
    assert fp / len(neg) <= 0.1 and op["counts"]["false positives"] == fp
    # the next lower negative score would pass the allowed FPR: t is the lowest such threshold
    assert sum(s >= t - 1e-9 for s in neg) / len(neg) > 0.1
    assert op["counts"]["true positives"] == sum(s > t + 1e-9 for s in pos)
    assert op["n_positive"] == len(pos) and sum(op["counts"].values()) == len(pairs)
    fps = op["pairs"]["false positives"]
    assert [s for _, _, s in fps] == sorted((s for _, _, s in fps), reverse=True) and len(fps) <= 5
    assert all(ids[a] != ids[b] and s > t - 1e-4 for a, b, s in fps)  # shown to 4 decimals
    assert all(ids[a] == ids[b] and s <= t + 1e-4 for a, b, s in op["pairs"]["false negatives"])


def test_confusion_and_map_points():
    yt, yp = [0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 1, 0]
    c = data.confusion(yt, yp, data.SIZE_CLASSES)
    assert c["counts"] == confusion_matrix(yt, yp).tolist() and c["classes"] == ["<= 5 mm", "> 5 mm"]
    assert data.confusion([1, 1], [1, 1], data.HISTOLOGY_CLASSES)["counts"] == [[0, 0], [0, 2]]
    xy = np.array([[0.0, 0.0], [10.0, 2.0], [5.0, 1.0]])
    pts = data.map_points(xy)
    assert [p[0] for p in pts] == [0, 1, 2]
    assert min(p[1] for p in pts) == 0.0 and max(p[1] for p in pts) == 1.0  # one scale, the longer axis
    assert len(data.map_points(np.zeros((5000, 2)) + np.arange(5000)[:, None], max_points=600)) == 600


def test_script_json_cannot_end_its_element():
    obj = {"id": HOSTILE, "list": ["<!--", "-->", "</SCRIPT >", "a&b"]}
    text = data.script_json(obj)
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == obj
    assert data.esc(HOSTILE).count("<") == 0 and "&quot;" in data.esc('"')


def test_read_thumbs_bounded_and_missing(page_run):
    root, _, _, _ = page_run
    tids = [r["tracklet_id"] for r in pq.read_table(root / "catalog" / "tracklets.parquet").to_pylist()][:3]
    got = read_thumbs(root, [*tids, "no-such#0"], scale=3.0)
    assert set(got.images) == set(tids) and list(got.missing) == ["no-such#0"]
    assert all(len(v["frames"]) == 4 for v in got.images.values())


# ------------------------------------------------------------------ the page in a real browser


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        why = (
            "needs Debian's chromium and chromedriver at /usr/bin (apt-get install chromium chromium-driver)"
        )
        if os.environ.get("CI"):  # CI installs them (make browser): missing there is a failure, not a skip
            pytest.fail(f"CI is set but the browser is missing: {why}")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1800",
    ):
        opts.add_argument(arg)
    opts.binary_location = str(CHROMIUM)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _open(driver, path: Path) -> None:
    driver.get_log("browser")  # only this page's messages are read after
    driver.get(path.resolve().as_uri())


def _errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def _visible_queries(driver) -> list:
    return [q for q in driver.find_elements("css selector", "#retrieval .query") if q.is_displayed()]


def test_page_in_chromium(page_run, browser):
    _, _, out, _ = page_run
    d = browser
    _open(d, out / "report.html")
    rows = pq.read_table(out / "results.parquet").to_pylist()
    for r in rows:
        row = f'#results-table tr[data-label="{r["checkpoint"]}"]'
        sel = f'{row} td[data-task="{r["task"]}"][data-metric="{r["metric"]}"]'
        cell = d.find_element("css selector", sel)
        assert float(cell.get_attribute("data-value")) == r["value"]
        shown = cell.find_element("css selector", ".v").text.replace(" (!)", "")
        assert float(shown) == pytest.approx(
            (1 if r["metric"] == "fragmentation_rate" else 100) * r["value"], abs=0.051
        )
    # the gallery: k loaded thumbnails per shown query (the first encoder's), plus the query's own
    queries = _visible_queries(d)
    assert queries
    for q in queries:
        imgs = q.find_elements("css selector", "figure:not(.query-thumb) img")
        assert len(imgs) == data.TOP_K
        assert all(
            d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) > 0 for i in imgs
        )
        borders = {i.value_of_css_property("border-top-color") for i in imgs}
        assert borders <= {"rgba(26, 158, 58, 1)", "rgba(214, 39, 40, 1)"}
    total = len(queries)
    # filters: a video, then correctness, then a search that matches nothing
    video = d.find_element("id", "q-video")
    first_video = video.find_elements("css selector", "option")[1].get_attribute("value")
    d.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('change'))",
        video,
        first_video,
    )
    shown = _visible_queries(d)
    assert 0 < len(shown) < total and {q.get_attribute("data-video") for q in shown} == {first_video}
    assert d.find_element("id", "q-count").text == f"showing {len(shown)} of {total} queries"
    d.execute_script("arguments[0].value = ''; arguments[0].dispatchEvent(new Event('change'))", video)
    correct = d.find_element("id", "q-correct")
    d.execute_script(
        "arguments[0].value = 'top1-wrong'; arguments[0].dispatchEvent(new Event('change'))", correct
    )
    wrong = _visible_queries(d)
    assert all(q.get_attribute("data-top1") == "0" for q in wrong) and len(wrong) <= total
    d.execute_script("arguments[0].value = ''; arguments[0].dispatchEvent(new Event('change'))", correct)
    d.find_element("id", "q-search").send_keys("no such polyp")
    assert _visible_queries(d) == []
    d.find_element("id", "q-search").clear()
    d.execute_script("document.getElementById('q-search').dispatchEvent(new Event('input'))")
    assert len(_visible_queries(d)) == total
    _check_map_hover(d)
    _check_subject_switch(d)
    assert d.find_elements("css selector", "table.confusion[data-task=size]")
    polylines = d.find_elements("css selector", "svg.curve polyline")
    assert {p.get_attribute("data-metric") for p in polylines} == {"train/loss", "train/lr"}
    assert len(polylines[0].get_attribute("points").split()) == 12
    d.execute_script("window.scrollTo(0, 0)")
    d.save_screenshot("/tmp/report_html.png")
    assert _errors(d) == []


def _check_map_hover(d) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    svg = next(s for s in d.find_elements("css selector", "svg.map") if s.is_displayed())
    dots = svg.find_elements("css selector", "circle")
    assert len(dots) >= 3
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", svg)
    ActionChains(d).move_to_element(dots[0]).perform()
    tip = d.find_element("id", "tip")
    assert tip.is_displayed()
    frames = tip.find_elements("css selector", "img")
    assert len(frames) == 4
    assert all(d.execute_script("return arguments[0].naturalWidth", f) > 0 for f in frames)
    polyp = dots[0].get_attribute("data-p")
    lit = svg.find_elements("css selector", "circle.hl")
    assert lit and all(c.get_attribute("data-p") == polyp for c in lit)
    d.save_screenshot("/tmp/report_html_map.png")


def _check_subject_switch(d) -> None:
    picker = d.find_element("id", "subject")
    labels = [o.get_attribute("value") for o in picker.find_elements("css selector", "option")]
    assert len(labels) == 2
    d.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('change'))",
        picker,
        labels[1],
    )
    blocks = [b for b in d.find_elements("css selector", "#retrieval .subject-block") if b.is_displayed()]
    assert [b.get_attribute("data-subject") for b in blocks] == [labels[1]]
    d.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('change'))",
        picker,
        labels[0],
    )


def _hostile_page(tmp_path: Path) -> Path:
    """A page whose every data string is hostile: labels, tracklet, video and polyp ids."""
    tracklets = [[f"{HOSTILE}#{i}", f"v{HOSTILE}", f"p{i % 2}{HOSTILE}"] for i in range(4)]
    table = data.results_table(
        [{"checkpoint": HOSTILE, "task": "retrieval", "metric": "mAP", "value": 0.5, "kind": HOSTILE}],
        [("retrieval", "mAP")],
    )
    view = SubjectView(
        HOSTILE,
        gallery=[{"q": 0, "top": [[2, 0.9, True], [1, 0.5, False]], "first_hit": 1}],
        projection={"method": "pca", "points": [[i, i / 3, i / 3] for i in range(4)], "n": 4},
        confusions={"size": data.confusion([0, 1], [0, 0], {0: HOSTILE, 1: "b"})},
    )
    curves = [CurvesView(HOSTILE, data.curve_panels({"train/loss": ([0, 1], [2.0, 1.0])}))]
    page = PageData({HOSTILE: HOSTILE}, table, [view], tracklets, {}, {HOSTILE: HOSTILE}, curves, [HOSTILE])
    path = tmp_path / "hostile.html"
    path.write_text(render_page(page), encoding="utf-8")
    return path


def test_hostile_ids_stay_text(tmp_path):
    text = _hostile_page(tmp_path).read_text(encoding="utf-8")
    assert text.count("<script") == 2  # the page's own data and script elements, no other
    assert "<script>window.__pwned" not in text
    assert "<img src=x" not in text and 'onerror="' not in text


def test_hostile_ids_in_chromium(tmp_path, browser):
    path = _hostile_page(tmp_path)
    _open(browser, path)
    assert browser.execute_script("return window.__pwned === undefined")
    assert browser.find_elements("css selector", "img[src=x]") == []
    assert HOSTILE.split("\u2028")[0] in browser.find_element("tag name", "body").text
    assert browser.find_element("css selector", "#results-table tbody th").text.startswith("</script>")
    svg = browser.find_element("css selector", "svg.map")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", svg)
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).move_to_element(svg.find_elements("css selector", "circle")[1]).perform()
    assert "</script>" in browser.find_element("id", "tip").text
    assert browser.execute_script("return window.__pwned === undefined")
    assert _errors(browser) == []


@pytest.mark.slow  # four more encoders embedded (about 25 s on 2 busy cores)
def test_pooled_over_seeds_in_report_md_and_page(page_run, tmp_path):
    """Two runs of one method (config.yaml equal but the seed), each with its own step-0 weights:
    report.md and the page give the mean of the two seeds' paired differences (results.parquet)
    with a two-level interval around it; one run: none."""
    root, _, out, _ = page_run
    assert "Pooled over seeds" not in (out / "report.md").read_text()
    assert 'id="pooled-table"' not in (out / "report.html").read_text()
    runs = []
    for seed in (0, 1):
        run = tmp_path / "runs" / f"arm_s{seed}"
        (run / "checkpoints").mkdir(parents=True)
        make_ckpt(run / "checkpoints" / "last.ckpt", seed=10 + seed)
        make_ckpt(run / "checkpoints" / "init.ckpt", seed=20 + seed)
        (run / "config.yaml").write_text(
            f"seed: {seed}\nexp_name: arm_s{seed}\nsampler: temporaltemperaturebag\n"
        )
        runs.append(str(run))
    pooled_out = tmp_path / "pooled"
    argv = [*runs, "--dataset_root", str(root), "--tasks", "retrieval", "--baselines", "init"]
    argv += [
        "--out",
        str(pooled_out),
        "--ci_resamples",
        "300",
        "--projection",
        "pca",
        "--gallery_queries",
        "1",
    ]
    assert report_main(argv) == 0  # in this process: the command line is tested by page_run
    rows = pq.read_table(pooled_out / "results.parquet").to_pylist()
    diffs = [
        r["diff_vs_baseline"] for r in rows if r["metric"] == "mAP" and r["diff_vs_baseline"] is not None
    ]
    assert len(diffs) == 2
    md = (pooled_out / "report.md").read_text()
    assert "## Pooled over seeds" in md and "| arm | each seed's initialisation | 0, 1 |" in md
    cell = next(
        c
        for c in _page_cells(pooled_out / "report.html")
        if c["data-kind"] == "pooled" and c["data-metric"] == "mAP"
    )
    est, low, high = (float(cell[k]) for k in ("data-value", "data-low", "data-high"))
    assert est == pytest.approx(np.mean(diffs), abs=1e-12) and low <= est <= high
    assert " ".join(cell["text"].split()) in md
