"""End to end through the command line, on the real MiniLM and the shared GLUE files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("HARNESS_DATA_DIR"),
                                 reason="HARNESS_DATA_DIR not set (tox and .ci/run set it)")]

TINY = ["--set", "max_train_samples=48", "--set", "max_eval_samples=40", "--set", "max_length=48",
        "--set", "batch_size=16", "--no-progress"]


def harness(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def records(out: Path) -> dict[tuple[str, str], dict]:
    recs = [json.loads(p.read_text()) for p in out.glob("*.json")]
    return {(r["method"], r["task"]): r for r in recs}


def test_matrix_runs_records_resumes_and_isolates_failures(tmp_path):
    out = tmp_path / "runs"
    r = harness("run", "--methods", "lora,nosuch", "--task", "glue/rte,glue/stsb", "--profile", "smoke",
                "--output-dir", str(out), "--save", *TINY, cwd=tmp_path)
    assert r.returncode == 1, r.stderr  # one method unknown: recorded, others ran, non-zero exit
    recs = records(out)
    assert set(recs) == {("lora", "glue/rte"), ("lora", "glue/stsb"),
                         ("nosuch", "glue/rte"), ("nosuch", "glue/stsb")}
    ok = recs[("lora", "glue/rte")]
    assert ok["status"] == "ok", ok.get("reason")
    assert set(ok["metrics"]) == {"accuracy"} and 0 <= ok["metrics"]["accuracy"] <= 1
    assert set(recs[("lora", "glue/stsb")]["metrics"]) == {"pearson", "spearman"}
    assert ok["params"]["method"] > 0 and ok["params"]["head"] > 0
    assert ok["memory"]["peak_bytes"] > ok["memory"]["optimizer_state_bytes"] > 0
    assert ok["throughput"]["samples"] == 48 and ok["throughput"]["tokens_per_s"] > 0
    assert ok["merge"]["ok"] and ok["merge"]["max_abs_diff"] < 1e-3
    assert ok["schema_version"] == 1 and ok["versions"]["torch"]
    bad = recs[("nosuch", "glue/rte")]
    assert bad["status"] == "failed" and "unknown method 'nosuch'" in bad["reason"]
    # the table is printed, with the failure marked
    assert "| lora" in r.stdout and "failed" in r.stdout and "rte acc" in r.stdout

    # --save: a plain Hugging Face model that loads without this package's code
    saved = Path(ok["saved_model"])
    check = subprocess.run([sys.executable, "-c", (
        "import sys; sys.modules['harness'] = None; sys.modules['methods'] = None\n"
        "from transformers import AutoModelForSequenceClassification as A, AutoTokenizer as T\n"
        f"m = A.from_pretrained({str(saved)!r}); t = T.from_pretrained({str(saved)!r})\n"
        "names = [n for n, _ in m.named_parameters()]\n"
        "assert not any(n.endswith(('.A', '.B')) for n in names), names\n"
        "print(m(**t(['a test'], return_tensors='pt')).logits.shape)")],
        capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    assert "torch.Size([1, 2])" in check.stdout

    # same config again: finished runs are skipped, failed ones retried (and fail again)
    again = harness("run", "--methods", "lora", "--task", "glue/rte", "--profile", "smoke",
                    "--output-dir", str(out), *TINY, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already done" in again.stderr

    rep = harness("report", "--output-dir", str(out), cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr
    md = (tmp_path / "summary.md").read_text()
    assert "rte acc" in md and "stsb pearson" in md and "nosuch" in md
    assert (tmp_path / "runs.csv").read_text().count("\n") == 5


def test_bad_input_gives_one_line_errors(tmp_path):
    r = harness("run", "--methods", "lora", "--task", "nosuch", "--output-dir", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2
    assert "unknown task 'nosuch'" in r.stderr and "glue/rte" in r.stderr
    r = harness("run", "--methods", "lora", "--task", "glue/rte", "--set", "bogus=1", cwd=tmp_path)
    assert r.returncode == 2 and "bogus" in r.stderr
    r = harness("run", "--methods", "lora", "--task", "glue/rte", "--profile", "nope", cwd=tmp_path)
    assert r.returncode == 2 and "unknown profile 'nope'" in r.stderr

    r = harness("run", "--methods", "lora", "--task", "glue/rte", "--model", str(tmp_path / "missing"),
                "--output-dir", str(tmp_path / "runs"), *TINY, cwd=tmp_path)
    assert r.returncode == 1
    (rec,) = records(tmp_path / "runs").values()
    assert rec["status"] == "failed" and "cannot load model" in rec["reason"]


def test_nan_loss_is_a_recorded_failure_on_real_data(tmp_path):
    import torch

    from harness.config import resolve
    from harness.hookspecs import hookimpl
    from harness.plugins import get_method
    from harness.run import run_and_record

    class Poison:  # an observer whose extra loss is NaN: the loop must stop and say why
        @hookimpl
        def extra_loss(self, model, batch, outputs, ctx):
            return torch.tensor(float("nan"))

    config = resolve("lora", "glue/rte", get_method("lora").defaults, "smoke",
                     {"max_train_samples": 32, "max_eval_samples": 16, "max_length": 32},
                     output_dir=str(tmp_path))
    record = run_and_record(config, [Poison()])
    assert record["status"] == "failed" and "NonFiniteLoss" in record["reason"]
    assert "lower the learning rate" in record["reason"]
    assert (tmp_path / f"{record['run_id']}.json").exists()
