"""The multitask suite: heads, batches, mixing, the loop's current task, registry, report, methods."""
from __future__ import annotations

import math
import os
from collections import Counter

import numpy as np
import pytest
import torch

from harness.hookspecs import hookimpl
from harness.train import Trainer, batches
from helpers import (apply_method, batch, changed, collate, snapshot, task_rows,
                     tiny_multitask)
from tasks.base import seeded_subset
from tasks.multitask import MixingSampler, TaskExample, mixing_probabilities


def _pooled(model, b):
    return model.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).pooler_output


def test_batches_route_to_their_head():
    model = tiny_multitask({"a": 2, "b": 3, "c": 1})
    b = batch(n=4)
    with torch.no_grad():
        pooled = _pooled(model, b)
        for t, width in (("a", 2), ("b", 3), ("c", 1)):
            logits = model(**b, task=t).logits
            assert logits.shape == (4, width)
            torch.testing.assert_close(logits, model.heads[t].classifier(pooled))
        before = model(**b, task="a").logits
        model.heads["b"].classifier.weight.add_(1.0)  # another task's head: no effect on a
        torch.testing.assert_close(model(**b, task="a").logits, before)


def test_losses_per_head_kind_and_missing_task():
    model = tiny_multitask({"cls": 2, "reg": 1})
    b = batch(n=4)
    with torch.no_grad():
        out = model(**b, task="cls")
        assert float(out.loss) == pytest.approx(float(torch.nn.functional.cross_entropy(out.logits, b["labels"])))
        target = torch.tensor([0.5, 1.0, 2.0, 3.0])
        out = model(**{**b, "labels": target}, task="reg")
        assert float(out.loss) == pytest.approx(float(((out.logits.squeeze(-1) - target) ** 2).mean()))
    with pytest.raises(ValueError, match="needs task="):
        model(**b)
    with pytest.raises(ValueError, match="unknown task 'zzz'"):
        model(**b, task="zzz")


def test_mixing_probabilities_formula():
    sizes = {"a": 100, "b": 300, "c": 600}
    assert mixing_probabilities(sizes, "proportional", 2.0) == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6})
    root = {t: math.sqrt(n) for t, n in sizes.items()}
    assert mixing_probabilities(sizes, "temperature", 2.0) == \
        pytest.approx({t: v / sum(root.values()) for t, v in root.items()})
    assert mixing_probabilities(sizes, "temperature", 1.0) == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6})
    assert mixing_probabilities(sizes, "uniform", 2.0) == pytest.approx({t: 1 / 3 for t in sizes})
    with pytest.raises(ValueError, match="mixing must be one of"):
        mixing_probabilities(sizes, "round-robin", 2.0)
    with pytest.raises(ValueError, match="temperature must be a positive"):
        mixing_probabilities(sizes, "temperature", 0)


@pytest.mark.parametrize("mixing,temperature", [("proportional", 1.0), ("temperature", 3.0)])
def test_sampler_draws_match_the_formula(mixing, temperature):
    sizes = {"a": 40, "b": 160, "c": 800}
    start, groups = 0, {}
    for t, n in sizes.items():
        groups[t], start = list(range(start, start + n)), start + n
    probs = mixing_probabilities(sizes, mixing, temperature)
    sampler = MixingSampler(groups, 4, probs, torch.Generator().manual_seed(0))
    assert len(sampler) == 10 + 40 + 200
    owner = {i: t for t, ix in groups.items() for i in ix}
    counts: Counter = Counter()
    for _ in range(40):  # 10,000 draws: the standard error of a share is below 0.005
        for b in sampler:
            assert len(b) == 4 and len({owner[i] for i in b}) == 1
            counts[owner[b[0]]] += 1
    total = sum(counts.values())
    for t, p in probs.items():
        assert counts[t] / total == pytest.approx(p, abs=0.015), (t, counts)


def test_sampler_draws_a_member_without_replacement_until_used_up():
    groups = {"a": list(range(10)), "b": list(range(10, 30))}
    sampler = MixingSampler(groups, 5, {"a": 0.5, "b": 0.5}, torch.Generator().manual_seed(1))
    seen: dict[str, list[int]] = {"a": [], "b": []}
    for b in sampler:
        seen["a" if b[0] < 10 else "b"].extend(b)
    for t, drawn in seen.items():  # every full pass over a member is a permutation of its rows
        n = len(groups[t])
        for k in range(len(drawn) // n):
            assert sorted(drawn[k * n:(k + 1) * n]) == groups[t]


def test_eval_batches_never_span_two_tasks():
    rows = task_rows({"a": 2, "b": 1}, n=5)
    out = list(batches(rows, collate, 4))
    assert [(b["task"], len(b["labels"])) for b in out] == [("a", 4), ("a", 1), ("b", 4), ("b", 1)]
    assert out[2]["labels"].dtype == torch.float32  # the regression member's targets


def test_subset_caps_each_member_as_its_single_task_run():
    from tasks import get_task

    suite = get_task("multitask/sst2+rte")
    a = [TaskExample(f"s{i}", None, i % 2, task="sst2") for i in range(50)]
    b = [TaskExample(f"r{i}", "x", i % 2, task="rte") for i in range(8)]
    picked = suite.subset(a + b, 10, seed=42)
    assert picked == seeded_subset(a, 10, 42) + b  # rte has fewer than 10: all of it


class _Spy:
    """Records, at every training forward, what the loop set on the context and the batch's task."""

    def __init__(self):
        self.seen: list[tuple[str | None, str]] = []

    @hookimpl
    def extra_loss(self, model, batch, outputs, ctx):
        self.seen.append((ctx.current_task, batch["task"]))


@pytest.mark.parametrize("method", ["lora", "full", "prompt_tuning"])
def test_methods_train_on_the_multitask_model(method):
    """The loop sets ctx.current_task from each batch; shared adapters and every head train."""
    spy = _Spy()
    params = {"num_virtual_tokens": 4, "init": "random"} if method == "prompt_tuning" else {}
    model, ctx, pm = apply_method(tiny_multitask({"a": 2, "b": 1}), method, params, observers=[spy],
                                  batch_size=4, lr=1e-2, warmup_ratio=0.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = snapshot(model)
    model.train()
    Trainer(model, pm, ctx, task_rows({"a": 2, "b": 1}, n=16), collate).fit()
    assert {t for t, _ in spy.seen} == {"a", "b"} and all(t == b for t, b in spy.seen)
    moved = changed(before, model)
    assert moved <= trainable
    assert any(n.startswith("heads.a.") for n in moved) and any(n.startswith("heads.b.") for n in moved)
    if method != "full":
        assert any(not n.startswith("heads.") for n in moved), "the shared method parameters did not train"


def test_lora_merge_keeps_every_head():
    model, ctx, pm = apply_method(tiny_multitask({"a": 2, "b": 1}), "lora")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    b = batch()
    adapted = {t: model(**b, task=t).logits for t in ("a", "b")}
    merged = pm.hook.merge(model=model, ctx=ctx)
    for t in ("a", "b"):
        torch.testing.assert_close(merged(**b, task=t).logits, adapted[t], rtol=1e-5, atol=1e-5)


def test_merge_check_rows_cover_every_task():
    from harness.run import _check_rows

    rows = task_rows({"a": 2, "b": 3}, n=10)
    picked = _check_rows(rows, 3)
    assert [r["task"] for r in picked] == ["a"] * 3 + ["b"] * 3
    single = [{k: v for k, v in r.items() if k != "task"} for r in rows]
    assert _check_rows(single, 4) == single[:4]


def test_registry_builds_suites_on_demand_and_refuses_bad_ones():
    from harness.config import resolve
    from harness.plugins import get_method
    from tasks import UnknownTaskError, expand, get_task

    assert expand("multitask") == ["multitask/sst2+rte+mrpc"]
    assert expand("multitask/cola+stsb") == ["multitask/cola+stsb"]
    suite = get_task("multitask/cola+stsb")
    assert suite.task_names == ["cola", "stsb"] and suite.tasks["stsb"].is_regression
    with pytest.raises(UnknownTaskError, match="short names"):
        expand("multitask/sst2+nope")
    with pytest.raises(UnknownTaskError, match="named twice"):
        expand("multitask/rte+rte")
    config = resolve("lora", "multitask/sst2+rte", get_method("lora").defaults, "smoke",
                     {"mixing": "temperature", "temperature": 3})
    assert config.task_params == {"mixing": "temperature", "temperature": 3}
    with pytest.raises(ValueError, match="mixing must be one of"):
        get_task("multitask/sst2+rte", {"mixing": "bogus"})


def test_suite_metrics_and_score():
    from tasks import get_task

    suite = get_task("multitask/sst2+mrpc")
    metrics = {"glue/sst2/accuracy": 0.8, "glue/mrpc/f1": 0.9, "glue/mrpc/accuracy": 0.7}
    assert suite.score(metrics) == pytest.approx((0.8 + 0.8) / 2)
    assert np.array_equal(suite.predictions(torch.tensor([[0.1, 0.9], [2.0, 1.0]])), [1, 0])
    assert np.allclose(suite.predictions(torch.tensor([[0.25], [1.5]])), [0.25, 1.5])


def test_report_puts_single_task_figures_beside_the_suite():
    from harness.report import multitask_frames, runs_frame, summary_frame

    def record(task, metrics, score, method="lora"):
        return {"method": method, "task": task, "profile": "smoke", "status": "ok", "metrics": metrics,
                "score": score, "params": {"method": 10, "head": 2, "share": 0.01},
                "memory": {"peak_bytes": 2**20}, "finished_at": "2024"}

    records = [record("multitask/sst2+mrpc", {"glue/sst2/accuracy": 0.8, "glue/mrpc/f1": 0.9,
                                              "glue/mrpc/accuracy": 0.7}, 0.8),
               record("glue/sst2", {"accuracy": 0.85}, 0.85),
               record("glue/mrpc", {"f1": 0.8, "accuracy": 0.6}, 0.7)]
    runs = runs_frame(records)
    table = multitask_frames(runs)["multitask/sst2+mrpc"]
    mt, single = table.iloc[0], table.iloc[1]
    assert (mt["setting"], single["setting"]) == ("multitask", "single-task")
    assert (mt["sst2 acc"], mt["mrpc f1"], mt["avg score"]) == (80.0, 90.0, 80.0)
    assert (single["sst2 acc"], single["mrpc f1"], single["avg score"]) == (85.0, 80.0, 77.5)
    assert single["method params"] == 20  # one model per task
    summary = summary_frame(runs)
    assert summary.loc["lora", "multitask:sst2 acc"] == 80.0 and summary.loc["lora", "sst2 acc"] == 85.0


def test_report_takes_single_task_figures_from_another_folder(tmp_path):
    """`harness report --single-task-dir`: single-task records kept elsewhere (a leaderboard's
    folder) fill the single-task rows, and appear in no other table."""
    import json
    import subprocess
    import sys

    def record(task, metrics, score, rid):
        return {"schema_version": 1, "run_id": rid, "method": "lora", "task": task, "profile": "smoke",
                "status": "ok", "metrics": metrics, "score": score,
                "params": {"method": 10, "head": 2, "share": 0.01}, "memory": {"peak_bytes": 2**20},
                "finished_at": "2024"}

    suite, singles = tmp_path / "suite", tmp_path / "singles"
    suite.mkdir(), singles.mkdir()
    (suite / "a.json").write_text(json.dumps(record("multitask/sst2+rte", {"glue/sst2/accuracy": 0.8,
                                                    "glue/rte/accuracy": 0.6}, 0.7, "a")))
    (singles / "b.json").write_text(json.dumps(record("glue/sst2", {"accuracy": 0.9}, 0.9, "b")))
    (singles / "c.json").write_text(json.dumps(record("glue/rte", {"accuracy": 0.5}, 0.5, "c")))
    out = subprocess.run([sys.executable, "-m", "harness", "report", "--output-dir", str(suite),
                          "--report-dir", str(tmp_path / "rep"), "--single-task-dir", str(singles)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = (tmp_path / "rep" / "summary.md").read_text()
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in summary.splitlines()
            if line.startswith("| lora")]
    assert [r[1:5] for r in rows if r[1] in ("multitask", "single-task")] == [
        ["multitask", "80", "60", "70"], ["single-task", "90", "50", "70"]]  # sst2, rte, avg
    runs_csv = (tmp_path / "rep" / "runs.csv").read_text().splitlines()
    assert len(runs_csv) == 2 and ",multitask/sst2+rte," in runs_csv[1]  # only the suite's run
    bad = subprocess.run([sys.executable, "-m", "harness", "report", "--output-dir", str(suite),
                          "--single-task-dir", str(tmp_path / "nowhere")], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "no such folder" in bad.stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("HARNESS_DATA_DIR"), reason="HARNESS_DATA_DIR not set")
def test_a_real_multitask_run_records_per_task_metrics(tmp_path):
    """MiniLM on sst2+stsb (a regression member), a few steps: the whole run path, merge check."""
    from harness.config import TrainConfig, RunConfig
    from harness.run import execute

    config = RunConfig(method="lora", task="multitask/sst2+stsb", output_dir=str(tmp_path), device="cpu",
                       train=TrainConfig(max_train_samples=16, max_eval_samples=12, batch_size=8,
                                         eval_batch_size=8, max_length=32, merge_check_samples=4,
                                         lr=5e-3))
    record = execute(config)
    assert record["status"] == "ok", record.get("reason")
    assert set(record["metrics"]) == {"glue/sst2/accuracy", "glue/stsb/pearson", "glue/stsb/spearman"}
    assert record["eval_samples"] == {"dev": 24} and record["train_samples"] == 32
    assert record["merge"]["samples"] == 8 and record["merge"]["max_abs_diff"] < 1e-3
    assert record["params"]["head"] == (384 * 2 + 2) + (384 + 1)  # one head per task
