"""Fixed memory budgets: sizes, the tensor counter and its breakdown, the fit search, records."""
from __future__ import annotations

import dataclasses
import gc
from typing import Any

import numpy as np
import pytest
import torch

from harness.budget import FIT_TOLERANCE, DoesNotFit, chosen_train, fit_to_budget, measure, micro_batches, probe_rows
from harness.config import ConfigError, RunConfig, TrainConfig, resolve
from harness.memory import (BREAKDOWN_SLACK_BYTES, BREAKDOWN_TOLERANCE, TensorMemory,
                            breakdown_matches, parameter_bytes, parse_size)
from harness.models import LoadedModel
from harness.train import Trainer
from helpers import apply_method, collate, rows, tiny_bert
from tasks.base import Example, Task
from tasks.registry import register_task


# -- sizes ------------------------------------------------------------------------------------
def test_parse_size_binary_and_decimal_units():
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("1500MiB") == 1500 * 1024**2
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5 GiB") == int(1.5 * 1024**3)
    assert parse_size("512M") == 512 * 10**6
    assert parse_size(4096) == 4096
    assert parse_size(None) is None and parse_size("none") is None
    for bad in ("2 apples", "GiB", "-1GiB", "0", True):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_a_bad_budget_is_a_config_error_and_no_budget_keeps_run_ids():
    with pytest.raises(ConfigError, match="memory_budget"):
        resolve("lora", "glue/rte", {}, "smoke", {"memory_budget": "lots"})
    a = RunConfig(method="lora", task="glue/rte")
    b = RunConfig(method="lora", task="glue/rte", train=TrainConfig(memory_budget="1GiB"))
    c = RunConfig(method="lora", task="glue/rte", train=TrainConfig(memory_budget="2GiB"))
    assert "memory_budget" not in a.identity()["train"]  # records without a budget keep their ids
    assert len({a.run_id(), b.run_id(), c.run_id()}) == 3


def test_micro_batches_keep_the_effective_batch():
    assert micro_batches(16) == [16, 8, 4, 2, 1]
    assert micro_batches(12) == [12, 6, 3, 1]
    assert micro_batches(1) == [1]
    t = chosen_train(TrainConfig(batch_size=12, grad_accum=2), 3)
    assert (t.batch_size, t.grad_accum) == (3, 8)


def test_probe_rows_are_the_longest():
    rs = rows(20)
    picked = probe_rows(rs, 4)
    assert sorted(len(r["input_ids"]) for r in picked) == sorted(len(r["input_ids"]) for r in rs)[-4:]
    assert len(probe_rows(rs[:2], 5)) == 5  # repeated when there are too few


# -- the counter and its breakdown --------------------------------------------------------------
def _allocator_peak(prof) -> int:
    """Peak of bytes allocated (and not yet freed) inside the profiled window: the CPU
    allocator's own account, independent of the dispatch-mode counter."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


@pytest.mark.parametrize("method", ["full", "lora"])
def test_breakdown_adds_up_to_the_allocator_peak_and_weights_are_the_parameters(method):
    from torch.profiler import ProfilerActivity, profile

    model, ctx, pm = apply_method(tiny_bert(), method, batch_size=8, grad_accum=2, max_steps=2,
                                  lr=1e-3, warmup_ratio=0.0)
    model.train()
    data = rows(32)
    # Garbage of earlier tests freed inside the window would be reported by the profiler with
    # sizes from an earlier profiling session (its size table outlives sessions): collect it now.
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = Trainer(model, pm, ctx, data, collate, track_memory=True).fit()
    tm = out["tensor_memory"]
    bd = tm["breakdown"]
    assert sum(bd.values()) == tm["peak_bytes"]
    # Independent: the allocator saw what was allocated in the window; the counter's peak above
    # what was live at its start must agree within the stated tolerance.
    alloc = _allocator_peak(prof)
    counted = tm["peak_bytes"] - tm["start_bytes"]
    assert abs(counted - alloc) <= BREAKDOWN_TOLERANCE * tm["peak_bytes"] + BREAKDOWN_SLACK_BYTES
    assert abs(counted - alloc) <= 0.02 * counted  # in fact much closer than the slack
    assert breakdown_matches(bd, tm["start_bytes"] + alloc)
    # The weights' share is exactly the model's parameter bytes, split by what trains.
    pb = parameter_bytes(model)
    assert bd["frozen_weights"] + bd["trainable_weights"] == pb["frozen"] + pb["trainable"]
    assert bd["trainable_weights"] == pb["trainable"] and bd["frozen_weights"] == pb["frozen"]
    assert bd["buffers"] == pb["buffers"]
    # AdamW: two moments per trainable element (+ a step counter per tensor), live at the peak.
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert 2 * pb["trainable"] <= bd["optimizer_state"] <= 2 * pb["trainable"] + 8 * n_trainable
    assert 0 < bd["gradients"] <= pb["trainable"]
    assert bd["activations"] > 0
    if method == "lora":
        assert pb["frozen"] > 0 and pb["trainable"] < pb["frozen"] / 2


def test_the_counter_sees_frees():
    """A tensor made and dropped inside the window counts towards the peak, not the end."""
    model = torch.nn.Linear(4, 4)
    with TensorMemory(model, "cpu") as tm:
        big = torch.zeros(1000, 1000)
        del big
        small = torch.ones(10)
    assert tm.peak - tm.start_bytes >= 4 * 10**6
    assert tm.total - tm.start_bytes == small.untyped_storage().nbytes()
    assert tm.breakdown()["activations"] >= 4 * 10**6


# -- a synthetic registered task, so that the whole run path runs without data files ------------
VOCAB = 4000


class MemoryToyTask(Task):
    """Token 7 in the text decides the label. A BERT whose weights dominate its activations
    (large vocabulary, short rows), so full fine-tuning's state is several times LoRA's."""
    name = "memtoy/cls"
    group = "memtoy"
    num_labels = 2
    default_model = "tiny"
    width = 128
    layers = 2

    def load(self, split: str, data_dir: str | None = None) -> list[Example]:
        g = np.random.default_rng(0 if split == "train" else 1)
        out = []
        for _ in range(64 if split == "train" else 16):
            n = int(g.integers(4, 14))
            ids = g.integers(8, VOCAB, n).tolist()
            label = int(g.random() < 0.5)
            if label:
                ids[int(g.integers(0, n))] = 7
            out.append(Example(" ".join(map(str, ids)), None, label))
        return out

    def availability(self, data_dir: str | None = None) -> str | None:
        return None

    def build_model(self, name: str) -> LoadedModel:
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=self.width, num_hidden_layers=self.layers,
                         num_attention_heads=2, intermediate_size=2 * self.width,
                         max_position_embeddings=128, num_labels=2, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
        return LoadedModel(BertForSequenceClassification(cfg), None, "bert", ["classifier"], "toy")

    def encode(self, tokenizer: Any, examples: list[Example], max_length: int) -> list[dict[str, Any]]:
        return [{"input_ids": [int(t) for t in e.text_a.split()][:max_length],
                 "attention_mask": [1] * min(max_length, len(e.text_a.split())),
                 "labels": int(e.label)} for e in examples]

    def collator(self, tokenizer: Any):
        return collate

    def compute_metrics(self, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return {"accuracy": float((preds == labels).mean())}


class LongRowsTask(MemoryToyTask):
    """Small weights, long rows: activations dominate, so the micro-batch decides the peak."""
    name = "memtoy/long"
    width = 32

    def load(self, split: str, data_dir: str | None = None) -> list[Example]:
        g = np.random.default_rng(2)
        return [Example(" ".join(map(str, g.integers(8, 100, 60).tolist())), None, i % 2)
                for i in range(32 if split == "train" else 8)]


register_task(MemoryToyTask)
register_task(LongRowsTask)


def config(method: str, task: str = "memtoy/cls", budget: Any = None, **train: Any) -> RunConfig:
    from harness.plugins import get_method

    kw = dict(batch_size=8, epochs=1, lr=1e-3, warmup_ratio=0.0, max_length=64,
              eval_batch_size=16, merge_check_samples=4, memory_budget=budget)
    kw.update(train)
    return RunConfig(method=method, task=task, device="cpu", train=TrainConfig(**kw),
                     method_params=dict(get_method(method).defaults))


def _prepare(c: RunConfig):
    from harness.run import prepare

    return prepare(c)


def test_tight_budget_lora_runs_full_does_not_fit_and_others_are_kept(tmp_path):
    from harness.records import read_records
    from harness.report import failures, memory_chart, runs_frame, summary_frame, to_markdown
    from harness.run import run_and_record

    # The budget sits between LoRA's measured need and what full fine-tuning's state alone takes
    # (weights + gradients + two AdamW moments = 4x the parameter bytes): measured, not assumed.
    lora = measure(config("lora"), 8, False, _prepare)
    full = measure(config("full"), 1, False, _prepare)
    weights = full["breakdown"]["trainable_weights"]
    assert lora["peak_bytes"] < 2 * weights < 4 * weights < full["peak_bytes"]
    budget = 2 * weights
    out = str(tmp_path / "runs")
    recs = {}
    for method in ("full", "lora", "bitfit"):
        c = dataclasses.replace(config(method, budget=budget), output_dir=out)
        recs[method] = run_and_record(c)
    assert recs["full"]["status"] == "does_not_fit", recs["full"].get("reason")
    mem = recs["full"]["memory"]
    assert mem["peak_bytes"] > budget and "needs" in recs["full"]["reason"]
    assert mem["fit"]["stopped"]  # the state alone is over: no smaller micro-batch was tried
    for m in ("lora", "bitfit"):
        r = recs[m]
        assert r["status"] == "ok", r.get("reason")
        assert r["memory"]["peak_bytes"] <= budget and r["memory"]["micro_batch"] == 8
        assert r["memory"]["budget_bytes"] == budget and r["memory"]["checkpointing"] is False
        assert 0 <= r["metrics"]["accuracy"] <= 1
    # The records on disk: all three kept; the table shows the misfit and the budget columns.
    on_disk, problems = read_records(out)
    assert not problems and {r["status"] for r in on_disk} == {"ok", "does_not_fit"}
    runs = runs_frame(on_disk)
    table = summary_frame(runs, ["full", "lora", "bitfit"])
    assert table.loc["full", "cls acc"] == "does not fit"
    assert str(table.loc["full", "peak mem MiB"]).endswith("needed")
    assert table.loc["lora", "micro-batch x accum"] == "8 x 1" and table.loc["lora", "checkpointing"] == "no"
    assert table.loc["lora", "budget MiB"] == round(budget / 2**20, 1)
    assert "does not fit" in to_markdown(table)
    assert failures(runs, does_not_fit=False) == [] and len(failures(runs)) == 1
    png = memory_chart(runs, tmp_path / "memory.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_fits_with_a_smaller_micro_batch_and_training_stays_within_the_budget():
    big = measure(config("full", "memtoy/long"), 8, False, _prepare)
    half = measure(config("full", "memtoy/long"), 4, False, _prepare)
    assert half["peak_bytes"] < big["peak_bytes"]
    budget = (half["peak_bytes"] + big["peak_bytes"]) // 2
    c = config("full", "memtoy/long", budget=budget)
    fit = fit_to_budget(c, _prepare)
    assert [x["micro_batch"] for x in fit["candidates"]] == [8, 4]
    assert (fit["micro_batch"], fit["grad_accum_used"], fit["checkpointing"]) == (4, 2, False)
    assert fit["peak_bytes"] <= budget
    # The real training, counted over every step, keeps to the budget within the stated tolerance.
    p = _prepare(dataclasses.replace(c, train=chosen_train(c.train, fit["micro_batch"])))
    assert (p.ctx.train.batch_size, p.ctx.train.grad_accum) == (4, 2)
    out = Trainer(p.model, p.pm, p.ctx, p.train_rows, p.collate, track_memory=True).fit()
    assert out["throughput"]["steps"] == 4  # 32 rows, effective batch 8
    assert out["tensor_memory"]["peak_bytes"] <= budget * (1 + FIT_TOLERANCE)


def test_checkpointing_only_when_nothing_else_fits_and_a_prefix_refuses_it():
    plain = measure(config("lora", "memtoy/long"), 1, False, _prepare)
    ckpt = measure(config("lora", "memtoy/long"), 1, True, _prepare)
    assert ckpt["peak_bytes"] < plain["peak_bytes"]
    budget = (ckpt["peak_bytes"] + plain["peak_bytes"]) // 2
    fit = fit_to_budget(config("lora", "memtoy/long", budget=budget), _prepare)
    tried = [(x["micro_batch"], x["checkpointing"]) for x in fit["candidates"]]
    assert tried[:4] == [(8, False), (4, False), (2, False), (1, False)]  # every size first
    assert fit["checkpointing"] is True and fit["peak_bytes"] <= budget
    # A key/value prefix refuses checkpointing: just below its micro-batch-1 need, it does not fit.
    need = measure(config("prefix_tuning", "memtoy/long"), 1, False, _prepare)["peak_bytes"]
    with pytest.raises(DoesNotFit) as e:
        fit_to_budget(config("prefix_tuning", "memtoy/long", budget=need - 1), _prepare)
    assert "past_key_values" in str(e.value) and "refused by the method" in str(e.value)
    assert e.value.fit["needed_bytes"] == need
    assert [x["checkpointing"] for x in e.value.fit["candidates"]] == [False] * 4 + [True]


def test_checkpointing_trains_the_same_numbers():
    """The generic switch (Hugging Face, non-reentrant) changes memory, not the training."""
    from harness.budget import enable_checkpointing

    curves = []
    for on in (False, True):
        model, ctx, pm = apply_method(tiny_bert(), "lora", batch_size=8, max_steps=3, lr=1e-2,
                                      warmup_ratio=0.0)
        if on:
            assert enable_checkpointing(model, pm, ctx) is None
            assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
        model.train()
        curves.append(Trainer(model, pm, ctx, rows(24), collate).fit()["loss_curve"])
    assert curves[0] == pytest.approx(curves[1], rel=1e-5)


def test_counting_does_not_change_training():
    """The counter only watches: the same seed gives the same losses and weights with it on."""
    out = []
    for track in (False, True):
        model, ctx, pm = apply_method(tiny_bert(), "lora", batch_size=8, max_steps=3, lr=1e-2,
                                      warmup_ratio=0.0)
        model.train()
        res = Trainer(model, pm, ctx, rows(24), collate, track_memory=track).fit()
        out.append((res["loss_curve"], [p.detach().clone() for p in model.parameters()]))
    assert out[0][0] == out[1][0]
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))
