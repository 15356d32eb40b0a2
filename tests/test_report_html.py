"""`harness report --format html`: the leaderboard page, its Markdown/CSV twins, and how the report
treats records it cannot read. The page of a real smoke matrix (`records_factory.real_smoke_matrix`) is opened in a
real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium): it loads with no
console errors, its tables sort, and its Pareto plots are there.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from harness.cli import main
from harness.leaderboard import leaderboard_frame, pareto_front, relative_step_time, render_html
from harness.records import SCHEMA_VERSION, read_records
from harness.report import runs_frame
from records_factory import fake_record, real_smoke_matrix, write

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


def report(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["report", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


# --- Pareto frontier, relative speed --------------------------------------------------------


def test_pareto_front():
    pts = [(10, 50), (100, 80), (1000, 79), (5, 40), (100, 70), (1e6, 85), (10, 50)]
    assert sorted(pareto_front(pts)) == [0, 1, 3, 5]  # the later (10, 50) tie is not counted twice
    assert pareto_front([]) == []
    assert pareto_front([(1, 1)]) == [0]


def test_relative_step_time_is_per_task_against_the_reference():
    runs = runs_frame([fake_record("lora", step_ms=100), fake_record("full", step_ms=300),
                       fake_record("lora", "glue/rte", step_ms=50), fake_record("full", "glue/rte", step_ms=50),
                       fake_record("bitfit", "glue/mrpc", step_ms=10)])
    rel = dict(zip(zip(runs["method"], runs["task"]), relative_step_time(runs, "lora")))
    assert rel[("full", "glue/sst2")] == pytest.approx(3.0)
    assert rel[("full", "glue/rte")] == pytest.approx(1.0)
    assert rel[("lora", "glue/sst2")] == pytest.approx(1.0)
    assert rel[("bitfit", "glue/mrpc")] != rel[("bitfit", "glue/mrpc")]  # NaN: no lora on mrpc
    lb = leaderboard_frame(runs)
    assert list(lb.columns[:5]) == ["method", "task", "profile", "status", "score"]
    assert "step time x lora" in lb.columns


# --- the page, Markdown and CSV ----------------------------------------------------------------


def synthetic(tmp_path: Path) -> Path:
    return write(tmp_path / "runs",
                 fake_record("lora", acc=0.85, params=73_728, peak_mib=1400, step_ms=100),
                 fake_record("full", acc=0.86, params=22_713_216, peak_mib=1800, step_ms=200),
                 fake_record("bitfit", acc=0.80, params=26_112, peak_mib=1300, step_ms=80),
                 fake_record("vera", acc=0.70, params=7_680, peak_mib=1500, step_ms=110),
                 fake_record("lora", "glue/rte", acc=0.60, params=73_728, peak_mib=1500, step_ms=100),
                 fake_record("full", "glue/rte", acc=0.55, params=22_713_216, peak_mib=1900, step_ms=190),
                 fake_record("bitfit", "glue/rte", status="failed", reason="RuntimeError: NaN loss"),
                 fake_record("vera", "glue/rte", acc=0.52, params=7_680, peak_mib=1450, step_ms=105))


def test_html_page_is_self_contained_with_tables_plots_and_details(tmp_path, capsys):
    runs = synthetic(tmp_path)
    code, out, err = report(capsys, "--output-dir", runs, "--report-dir", tmp_path / "rep", "--format", "html")
    assert code == 0, err
    page = (tmp_path / "rep" / "leaderboard.html").read_text()
    # nothing fetched at view time: no external scripts, styles, images or fonts
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', page)
    assert "<script src" not in page and 'rel="stylesheet"' not in page and "@import" not in page
    assert 'id="summary-table"' in page and 'id="runs-table"' in page
    assert page.count("<svg") == 6  # 2 tasks + the mean over both, for each of the 2 costs
    assert page.count('<details class="run"') == 8
    assert "bitfit on glue/rte: failed: RuntimeError: NaN loss" in page
    # Frontier by parameters on SST-2: vera (fewest), bitfit, lora, full; on memory: bitfit, lora, full
    assert "glue/sst2: vera, bitfit, lora, full" in page
    assert "glue/sst2: bitfit, lora, full" in page
    md = (tmp_path / "rep" / "leaderboard.md").read_text()
    assert "| lora" in md and "glue/rte" in md and "Pareto frontier" in md
    assert "- glue/sst2: vera (70.00, 7.68k params), bitfit (80.00, 26.1k params)" in md
    csv = (tmp_path / "rep" / "leaderboard.csv").read_text().splitlines()
    assert len(csv) == 9 and csv[0].startswith("method,task,profile,status,score")
    # default format: Markdown and CSV, no page
    code, _, _ = report(capsys, "--output-dir", runs, "--report-dir", tmp_path / "md")
    assert code == 0 and (tmp_path / "md" / "leaderboard.md").exists()
    assert not (tmp_path / "md" / "leaderboard.html").exists()


def test_escaping_in_the_page():
    page = render_html([fake_record("<b>x</b>", status="failed", reason="<script>alert(1)</script>")])
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_page_with_no_readable_records_still_lists_the_problem():
    page = render_html([], ["/r/a.json: corrupt or truncated run record (invalid JSON: ...)"])
    assert "(no runs)" in page and 'class="unreadable"' in page and "/r/a.json" in page


# --- records the report cannot read ------------------------------------------------------------


def test_corrupt_truncated_and_newer_records_are_reported_not_dropped(tmp_path, capsys):
    runs = synthetic(tmp_path)
    good = sorted(runs.glob("*.json"))[0]
    (runs / "truncated.json").write_text(good.read_text()[:200])
    (runs / "empty.json").write_text("")
    newer = json.loads(good.read_text()) | {"schema_version": SCHEMA_VERSION + 1, "run_id": "newer"}
    (runs / "newer.json").write_text(json.dumps(newer))
    (runs / "list.json").write_text("[1, 2]")
    no_version = {k: v for k, v in json.loads(good.read_text()).items() if k != "schema_version"}
    (runs / "noversion.json").write_text(json.dumps(no_version))
    (runs / ".tmp-abc.json").write_text('{"half')  # a write in progress: not a record, not a problem
    records, problems = read_records(runs)
    assert len(records) == 8
    by_file = {Path(p.split(": ", 1)[0]).name: p.split(": ", 1)[1] for p in problems}
    assert set(by_file) == {"truncated.json", "empty.json", "newer.json", "list.json", "noversion.json"}
    assert by_file["truncated.json"].startswith("corrupt or truncated run record (invalid JSON")
    assert by_file["empty.json"] == "corrupt run record (empty file)"
    assert by_file["newer.json"] == (f"schema version {SCHEMA_VERSION + 1} is newer than this harness reads "
                                     f"(up to {SCHEMA_VERSION}); upgrade peft-harness to read it")
    assert "not a run record" in by_file["list.json"] and "schema_version None" in by_file["noversion.json"]

    code, out, err = report(capsys, "--output-dir", runs, "--report-dir", tmp_path / "rep", "--format", "html")
    assert code == 1  # reported, and the exit status says so; the tables are still written
    assert "truncated.json: corrupt or truncated" in err and "5 unreadable record(s)" in err
    summary = (tmp_path / "rep" / "summary.md").read_text()
    assert "## Unreadable records" in summary and "newer.json: schema version 2 is newer" in summary
    assert "| lora" in summary
    page = (tmp_path / "rep" / "leaderboard.html").read_text()
    assert page.count('class="unreadable"') == 5 and "truncated.json" in page
    assert "## Unreadable records" in (tmp_path / "rep" / "leaderboard.md").read_text()


# --- the real page in a real browser ------------------------------------------------------------


def _browser_or_skip():
    """A headless Chromium through Selenium; skipped only where there is none, unless
    HARNESS_REQUIRE_BROWSER=1 (.ci/run sets it once chromium is installed) makes that a failure."""
    missing = []
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install selenium)")
    if not CHROMIUM or not CHROMEDRIVER:
        missing.append("chromium and chromedriver (apt-get install chromium chromium-driver)")
    if missing:
        if os.environ.get("HARNESS_REQUIRE_BROWSER") == "1":
            pytest.fail("HARNESS_REQUIRE_BROWSER=1 but missing: " + "; ".join(missing))
        pytest.skip("no headless browser: missing " + "; ".join(missing))
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Selenium Manager would try to download a driver: point it at the system's.
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("HARNESS_DATA_DIR"),
                    reason="HARNESS_DATA_DIR not set (tox and .ci/run set it)")
def test_real_smoke_leaderboard_in_headless_chromium(tmp_path, capsys):
    driver = _browser_or_skip()  # before the runs: no browser, no point in training
    driver.quit()
    data = real_smoke_matrix()
    records, problems = read_records(data)
    assert records and not problems, problems
    ok = [r for r in records if r["status"] == "ok"]
    tasks = list(dict.fromkeys(r["task"] for r in records))
    code, _, err = report(capsys, "--output-dir", data, "--report-dir", tmp_path, "--format", "html")
    assert code == 0, err
    page = tmp_path / "leaderboard.html"

    from selenium.webdriver.common.by import By

    driver = _browser_or_skip()
    try:
        driver.get(page.as_uri())
        assert driver.title == "PEFT leaderboard"
        assert driver.execute_script("return document.readyState") == "complete"
        # no console errors (nor warnings) while loading and while sorting
        def console() -> list[dict]:
            return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]

        assert console() == []

        # the runs table: one row per run; sort by score, descending then ascending
        table = driver.find_element(By.ID, "runs-table")
        heads = [th.text.strip().rstrip("↕↑↓ ").strip() for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
        assert len(table.find_elements(By.CSS_SELECTOR, "tbody tr")) == len(records)
        col = heads.index("score")

        def column(i: int) -> list[str]:
            return [tr.find_elements(By.TAG_NAME, "td")[i].get_attribute("data-v")
                    for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")]

        th = table.find_elements(By.CSS_SELECTOR, "thead th")[col]
        th.click()
        assert th.get_attribute("aria-sort") == "ascending"
        asc = [float(v) for v in column(col) if v]
        assert asc == sorted(asc) and len(asc) == len(ok)
        th.click()
        assert th.get_attribute("aria-sort") == "descending"
        desc = [float(v) for v in column(col) if v]
        assert desc == sorted(desc, reverse=True)
        # text sort on the summary table's method column
        summary = driver.find_element(By.ID, "summary-table")
        summary.find_elements(By.CSS_SELECTOR, "thead th")[0].click()
        names = [tr.find_elements(By.TAG_NAME, "td")[0].text for tr in summary.find_elements(By.CSS_SELECTOR, "tbody tr")]
        assert names == sorted(names, key=str.lower) and set(names) == {r["method"] for r in records}
        assert console() == []

        # the plots: a panel per task (+ the mean when there are several), for both costs,
        # rendered with a size, every measured run a point, the frontier marked
        for key in ("params", "memory"):
            svgs = driver.find_elements(By.CSS_SELECTOR, f"#pareto-{key} svg.pareto")
            assert len(svgs) == len(tasks) + (len(tasks) > 1), key
            for svg in svgs:
                assert svg.size["width"] > 300 and svg.size["height"] > 200
                assert svg.find_elements(By.CSS_SELECTOR, "path.front")
                assert svg.find_elements(By.CSS_SELECTOR, "g.pt.on circle")
            n_points = sum(len(s.find_elements(By.CSS_SELECTOR, "g.pt")) for s in svgs[:len(tasks)])
            expected = sum(1 for r in ok if key == "memory" or r["params"]["method"] > 0)
            assert n_points == expected
        # per-run details open on click and show the config and versions
        details = driver.find_elements(By.CSS_SELECTOR, "details.run")
        assert len(details) == len(records)
        details[0].find_element(By.TAG_NAME, "summary").click()
        assert details[0].get_attribute("open") is not None
        text = details[0].text
        assert "config" in text and "torch" in text and "status" in text
        shot = Path(os.environ.get("HARNESS_SCREENSHOT_DIR", tmp_path)) / "leaderboard.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.set_window_size(1400, driver.execute_script("return document.body.scrollHeight") + 40)
        driver.execute_script("window.scrollTo(0, 0)")
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        assert console() == []
    finally:
        driver.quit()
