"""MTLoRA: shared and task-specific pairs, per-task gradients, merge of the shared part."""
from __future__ import annotations

import pytest
import torch

from harness.lowrank import LowRankLinear
from harness.train import Trainer
from helpers import (apply_method, batch, changed, collate, rows, snapshot, task_rows, tiny_bert,
                     tiny_multitask)
from methods.mtlora import TaskLowRank


def _randomise(model, seed: int = 5) -> None:
    """Every B non-zero (B = 0 at init would make outputs and A's gradients trivially equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B") or ".B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _mtlora(heads=None, **params):
    return apply_method(tiny_multitask(heads or {"a": 2, "b": 1}), "mtlora", {"r": 4, **params})


def test_structure_shared_everywhere_task_pairs_on_the_last_block():
    model, ctx, _ = _mtlora()
    shared = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    specific = [n for n, m in model.named_modules() if isinstance(m, TaskLowRank)]
    assert len(shared) == 2 * 6  # 2 blocks x (query, key, value, attention out, intermediate, output)
    assert len(specific) == 6 and all(n.startswith("bert.encoder.layer.1.") for n in specific)
    layer = model.get_submodule(specific[0])
    assert sorted(layer.A) == ["a", "b"] and layer.r == 4 and layer.scale == 4.0
    assert layer.layer.scale == pytest.approx(4.0)  # the shared pair's fixed scale, not alpha / r
    assert ctx.extras["task_specific_params"] == 2 * sum(
        4 * (m.in_features + m.out_features) for n, m in model.named_modules()
        if isinstance(m, LowRankLinear) and n.startswith("bert.encoder.layer.1."))
    with pytest.raises(ValueError, match="task_layers must be between 1 and the 2 blocks"):
        _mtlora(task_layers=3)


def test_a_task_pair_gets_gradient_only_from_its_own_tasks_batches():
    model, ctx, _ = _mtlora()
    _randomise(model)
    model.train()
    specific = [m for m in model.modules() if isinstance(m, TaskLowRank)]
    for task, other in (("a", "b"), ("b", "a")):
        model.zero_grad(set_to_none=True)
        ctx.current_task = task  # as the core does before every forward
        b = batch(num_labels=2)
        if task == "b":
            b["labels"] = b["labels"].float()
        model(**b, task=task).loss.backward()
        for m in specific:
            assert m.A[task].grad is not None and m.A[task].grad.abs().sum() > 0
            assert m.B[task].grad is not None and m.B[task].grad.abs().sum() > 0
            assert m.A[other].grad is None and m.B[other].grad is None
            assert m.layer.B.grad.abs().sum() > 0  # the shared pair serves every task


def test_training_on_one_tasks_batches_leaves_the_other_pair_alone():
    model, ctx, pm = _mtlora()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = snapshot(model)
    data = [r for r in task_rows({"a": 2, "b": 1}, n=16) if r["task"] == "a"]
    model.train()
    Trainer(model, pm, ctx, data, collate).fit()
    moved = changed(before, model)
    assert moved <= trainable
    assert any(".B.a" in n for n in moved) and any(n.endswith("layer.B") for n in moved)
    assert not any(".A.b" in n or ".B.b" in n or n.startswith("heads.b.") for n in moved)


@pytest.mark.parametrize("task_layers", [1, 2])
def test_merged_shared_part_predicts_what_the_adapted_model_did_per_task(task_layers):
    model, ctx, pm = _mtlora({"a": 2, "b": 3}, task_layers=task_layers)
    _randomise(model)
    model.eval()
    b = batch()
    adapted = {}
    with torch.no_grad():
        for t in ("a", "b"):
            ctx.current_task = t
            adapted[t] = model(**b, task=t).logits
    merged = pm.hook.merge(model=model, ctx=ctx)
    assert not [n for n, m in merged.named_modules() if isinstance(m, LowRankLinear)]
    assert sum(isinstance(m, TaskLowRank) for m in merged.modules()) == 6 * task_layers
    assert "kept separate" in ctx.extras["merge"]
    with torch.no_grad():
        for t in ("a", "b"):
            ctx.current_task = t
            torch.testing.assert_close(merged(**b, task=t).logits, adapted[t], rtol=1e-5, atol=1e-5)


def test_a_batch_without_a_known_task_is_refused():
    model, ctx, _ = _mtlora()
    ctx.current_task = None
    with pytest.raises(ValueError, match="needs the batch's task"):
        model(**batch(), task="a")
    ctx.current_task = "zzz"
    with pytest.raises(ValueError, match="no task-specific pair for task 'zzz'"):
        model(**batch(), task="a")


def test_single_task_run_has_one_pair_and_merges():
    model, ctx, pm = apply_method(tiny_bert(), "mtlora", {"r": 4})
    specific = [m for m in model.modules() if isinstance(m, TaskLowRank)]
    assert specific and all(list(m.A) == ["task"] for m in specific)
    model.train()
    Trainer(model, pm, ctx, rows(16), collate).fit()  # ctx.current_task stays None: the one pair
    assert ctx.current_task is None
    model.eval()
    b = batch()
    with torch.no_grad():
        adapted = model(**b).logits
        merged = pm.hook.merge(model=model, ctx=ctx)
        torch.testing.assert_close(merged(**b).logits, adapted, rtol=1e-5, atol=1e-5)
