"""`harness compare`: regressions of a results folder against a baseline.

Rules on synthetic records (fast); and the point of it on real runs: a method broken on purpose
(its learning rate zeroed), trained on real SST-2 with the smoke profile, fails the comparison with
a real smoke baseline (`records_factory.real_smoke_matrix`), which passes against itself.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.compare import compare, load_tolerances
from records_factory import fake_record, harness_cli, real_smoke_matrix, write


def run_compare(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["compare", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def pair(tmp_path: Path, base: list[dict], cur: list[dict]) -> tuple[Path, Path]:
    return write(tmp_path / "base", *base), write(tmp_path / "cur", *cur)


def test_identical_results_pass(tmp_path, capsys):
    recs = [fake_record("lora"), fake_record("bitfit", acc=0.75, step_ms=80)]
    b, c = pair(tmp_path, recs, recs)
    code, out, _ = run_compare(capsys, c, "--baseline", b)
    assert code == 0, out
    assert "No regressions." in out and "| lora" in out and "| bitfit" in out


def test_metric_drop_beyond_tolerance_fails_within_passes(tmp_path, capsys):
    b, c = pair(tmp_path, [fake_record("lora", acc=0.80)], [fake_record("lora", acc=0.65)])
    code, out, _ = run_compare(capsys, c, "--baseline", b)
    assert code == 1
    assert "REGRESSIONS (1)" in out and "lora on glue/sst2: sst2 acc fell 80.00 -> 65.00 (-15.00 points" in out
    b, c = pair(tmp_path / "2", [fake_record("lora", acc=0.80)], [fake_record("lora", acc=0.70)])
    assert run_compare(capsys, c, "--baseline", b)[0] == 0  # 10 points: within the default 12


def test_per_task_rule_and_tolerance_file(tmp_path, capsys):
    # RTE is near chance in smoke: 15 points is within its rule (20), not within a stricter file's.
    b, c = pair(tmp_path, [fake_record("lora", "glue/rte", acc=0.60)], [fake_record("lora", "glue/rte", acc=0.45)])
    assert run_compare(capsys, c, "--baseline", b)[0] == 0
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump({"metric_drop_points": 2.0, "rules": [{"task": "glue/*", "method": "lora",
                                                                           "metric_drop_points": 3}]}))
    code, out, _ = run_compare(capsys, c, "--baseline", b, "--tolerances", strict)
    assert code == 1 and "tolerance 3" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("metric_drop: 3\n")
    code, _, err = run_compare(capsys, c, "--baseline", b, "--tolerances", bad)
    assert code == 2 and "unknown key 'metric_drop'" in err


def test_default_tolerances_load():
    tol = load_tolerances()
    assert tol.reference_method == "lora"
    assert tol.for_run("lora", "glue/sst2")["metric_drop_points"] == 12.0
    assert tol.for_run("bitfit", "glue/rte")["metric_drop_points"] == 20.0


def test_multi_metric_and_lower_is_better(tmp_path, capsys):
    base = [fake_record("lora", "glue/mrpc", acc={"accuracy": 0.70, "f1": 0.80}),
            fake_record("lora", "instruction/x", acc={"rougeL": 0.3, "perplexity": 10.0})]
    cur = [fake_record("lora", "glue/mrpc", acc={"accuracy": 0.71, "f1": 0.55}),
           fake_record("lora", "instruction/x", acc={"rougeL": 0.3, "perplexity": 12.0})]
    b, c = pair(tmp_path, base, cur)
    code, out, _ = run_compare(capsys, c, "--baseline", b)
    assert code == 1
    assert "mrpc f1 fell 80.00 -> 55.00" in out and "mrpc acc" not in out.split("REGRESSIONS")[1]
    assert "x ppl rose 10 -> 12 (+20%" in out


def test_memory_rise(tmp_path, capsys):
    b, c = pair(tmp_path, [fake_record("lora", peak_mib=1000)], [fake_record("lora", peak_mib=1300)])
    code, out, _ = run_compare(capsys, c, "--baseline", b)
    assert code == 1 and "peak memory rose 1000 -> 1300 MiB (+30%" in out
    # +30% of a small figure: under the absolute floor (64 MiB), not a regression
    b, c = pair(tmp_path / "2", [fake_record("lora", peak_mib=100)], [fake_record("lora", peak_mib=130)])
    assert run_compare(capsys, c, "--baseline", b)[0] == 0


def test_relative_speed_cancels_machine_speed(tmp_path, capsys):
    base = [fake_record("lora", step_ms=100), fake_record("dora", step_ms=150)]
    # A machine 3x slower: both slower, the ratio holds.
    slow_machine = [fake_record("lora", step_ms=300), fake_record("dora", step_ms=450)]
    b, c = pair(tmp_path, base, slow_machine)
    code, out, _ = run_compare(capsys, c, "--baseline", b)
    assert code == 0, out
    assert "0.67 -> 0.67 (+0%)" in out
    # The method itself 2.5x slower against the reference on the same machine: a regression.
    dora_slower = [fake_record("lora", step_ms=100), fake_record("dora", step_ms=375)]
    b, c = pair(tmp_path / "2", base, dora_slower)
    code, out, _ = run_compare(capsys, c, "--baseline", b)
    assert code == 1 and "dora on glue/sst2: relative speed vs lora fell 0.67x -> 0.27x (-60%" in out
    # Against another reference (--reference dora), lora got faster: nothing fell.
    code, out, _ = run_compare(capsys, c, "--baseline", b, "--reference", "dora")
    assert code == 0 and "speed vs dora" in out and "1.50 -> 3.75 (+150%)" in out


def test_failed_run_missing_runs_and_require_all(tmp_path, capsys):
    base = [fake_record("lora"), fake_record("bitfit"), fake_record("lora", "glue/rte")]
    cur = [fake_record("lora", status="failed", reason="RuntimeError: NaN loss"), fake_record("vera")]
    b, c = pair(tmp_path, base, cur)
    code, out, _ = run_compare(capsys, c, "--baseline", b)
    assert code == 1
    assert "lora on glue/sst2: status ok -> failed (RuntimeError: NaN loss)" in out
    assert "bitfit on glue/sst2: in the baseline, not in the current results" in out.split("Notes:")[1]
    assert "vera on glue/sst2: new (not in the baseline)" in out
    # --tasks narrows both sides; --require-all makes a missing baseline run a regression.
    cur = [fake_record("lora")]
    b, c = pair(tmp_path / "2", base, cur)
    assert run_compare(capsys, c, "--baseline", b, "--tasks", "glue/sst2")[0] == 0
    code, out, _ = run_compare(capsys, c, "--baseline", b, "--tasks", "glue/sst2", "--require-all")
    assert code == 1 and "bitfit on glue/sst2: in the baseline, not in the current results" in out.split("REGRESSIONS")[1]
    assert "glue/rte" not in out


def test_config_change_is_said_not_failed(tmp_path, capsys):
    b, c = pair(tmp_path, [fake_record("lora", lr=5e-3)], [fake_record("lora", lr=1e-3)])
    code, out, _ = run_compare(capsys, c, "--baseline", b)
    assert code == 0
    assert "lora on glue/sst2: config differs from the baseline's: train.lr 0.005 -> 0.001" in out


def test_report_folder_unreadable_records_and_bad_input(tmp_path, capsys):
    recs = [fake_record("lora")]
    b = write(tmp_path / "baseline" / "runs", *recs).parent  # a report folder: records in runs/
    c = write(tmp_path / "cur", *recs)
    assert run_compare(capsys, c, "--baseline", b)[0] == 0
    (c / "glue-rte__lora__0000000000.json").write_text('{"schema_version": 1, "run_id": "x", "met')
    code, out, _ = run_compare(capsys, c, "--baseline", b)
    assert code == 1 and "Unreadable records:" in out
    assert "glue-rte__lora__0000000000.json: corrupt or truncated run record" in out
    code, _, err = run_compare(capsys, tmp_path / "nowhere", "--baseline", b)
    assert code == 2 and "no such folder" in err
    other = write(tmp_path / "other", fake_record("lora", profile="quick"))
    code, _, err = run_compare(capsys, other, "--baseline", b)
    assert code == 2 and "matches a baseline run" in err


def test_compare_api_returns_rows(tmp_path):
    b = write(tmp_path / "b", fake_record("lora"), fake_record("full", step_ms=300))
    res = compare(b, b)
    rows = {r["method"]: r for r in res.rows}
    assert res.ok and [r["verdict"] for r in res.rows] == ["ok", "ok"]
    assert rows["full"]["speed vs lora"] == "0.33 -> 0.33 (+0%)" and rows["lora"]["speed vs lora"] == "reference"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("HARNESS_DATA_DIR"),
                    reason="HARNESS_DATA_DIR not set (tox and .ci/run set it)")
def test_method_broken_on_purpose_fails_against_a_real_baseline(tmp_path):
    """LoRA with its learning rate zeroed, really trained on SST-2 (smoke profile), against a real
    smoke baseline of the same matrix: its accuracy falls to the untrained model's and `harness
    compare` exits 1 naming it; the baseline against itself passes."""
    baseline = real_smoke_matrix()
    out = tmp_path / "runs"
    run = harness_cli("run", "--methods", "lora", "--task", "glue/sst2", "--profile", "smoke",
                      "--set", "lora.lr=0", "--output-dir", out, "--no-progress", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    for rec in baseline.glob("*.json"):  # the rest of the matrix, unbroken
        if "__lora__" not in rec.name:
            shutil.copy(rec, out)
    cmp = harness_cli("compare", out, "--baseline", baseline, cwd=tmp_path)
    assert cmp.returncode == 1, cmp.stdout + cmp.stderr
    regressions = cmp.stdout.split("REGRESSIONS (1):")[1]
    assert "lora on glue/sst2: sst2 acc fell" in regressions, cmp.stdout
    assert "train.lr 0.005 -> 0" in cmp.stdout  # the cause, named in the notes
    print(cmp.stdout)
    ok = harness_cli("compare", baseline, "--baseline", baseline.parent, cwd=tmp_path)
    assert ok.returncode == 0 and "No regressions." in ok.stdout, ok.stdout + ok.stderr


def test_speed_is_not_compared_from_a_busy_machine(tmp_path, capsys):
    def busy(rec, load):
        rec["host"].update(load_avg_1m_start=load, load_avg_1m_end=load)
        return rec

    base = [busy(fake_record("lora", step_ms=100), 6.2), busy(fake_record("dora", step_ms=150), 1.0)]
    cur = [busy(fake_record("lora", step_ms=100), 1.0), busy(fake_record("dora", step_ms=600), 1.0)]
    b, c = pair(tmp_path, base, cur)
    code, out, _ = run_compare(capsys, c, "--baseline", b)
    assert code == 0, out  # 4x slower, but the baseline's reference ran on a busy machine
    assert "(not compared)" in out
    assert "dora on glue/sst2: baseline lora: load 6.2 on 2 CPUs" in out
    off = tmp_path / "off.yaml"
    off.write_text("busy_load_per_cpu: 0\n")
    code, out, _ = run_compare(capsys, c, "--baseline", b, "--tolerances", off)
    assert code == 1 and "relative speed vs lora fell" in out


def test_speed_is_not_compared_across_thread_counts(tmp_path, capsys):
    base = [fake_record("lora", step_ms=100), fake_record("dora", step_ms=150)]
    cur = [fake_record("lora", step_ms=100), fake_record("dora", step_ms=600)]
    for r in cur:
        r["host"]["torch_threads"] = 1
    b, c = pair(tmp_path, base, cur)
    code, out, _ = run_compare(capsys, c, "--baseline", b)
    assert code == 0 and "dora on glue/sst2: torch threads 2 in the baseline, 1 now" in out
