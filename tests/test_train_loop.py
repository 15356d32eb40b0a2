"""The one training loop: schedule, accumulation, determinism, hooks, optimizer rebuilds, NaN."""
from __future__ import annotations

import pytest
import torch

from harness.hookspecs import hookimpl
from harness.measure import optimizer_state_bytes
from harness.train import NonFiniteLoss, Trainer, lr_factor
from helpers import apply_method, collate, rows, snapshot, tiny_bert, train


def test_lr_schedule_warmup_then_linear_decay():
    total, warmup = 10, 2
    f = [lr_factor(s, total, warmup) for s in range(total)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[2] == pytest.approx(1.0) and f[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(f[1:], f[2:]))
    assert lr_factor(10, total, warmup) == 0.0


def test_same_seed_same_numbers():
    _, _, _, a = train(tiny_bert(), "lora", n_rows=48, max_steps=10, seed=3)
    _, _, _, b = train(tiny_bert(), "lora", n_rows=48, max_steps=10, seed=3)
    _, _, _, c = train(tiny_bert(), "lora", n_rows=48, max_steps=10, seed=4)
    assert a["loss_curve"] == b["loss_curve"]
    assert a["loss_curve"] != c["loss_curve"]


def test_gradient_accumulation_matches_large_batch():
    """Two micro-batches of 4 with accumulation give the update of one batch of 8 (no dropout)."""
    one = tiny_bert()
    two = tiny_bert()
    kw = dict(n_rows=8, max_steps=1, weight_decay=0.0, max_grad_norm=None)
    one, *_ = train(one, "full", batch_size=8, grad_accum=1, **kw)
    # Same order of rows: the loader shuffles with the same seeded generator.
    two, *_ = train(two, "full", batch_size=4, grad_accum=2, **kw)
    for (n, p), (_, q) in zip(one.named_parameters(), two.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


def test_clipping_bounds_the_update_norm():
    model, ctx, pm = apply_method(tiny_bert(), "full", lr=1.0, max_grad_norm=1e-6, warmup_ratio=0.0,
                                  batch_size=8, max_steps=1, weight_decay=0.0)
    t = Trainer(model, pm, ctx, rows(8), collate)
    seen = {}

    class Probe:
        @hookimpl
        def on_step(self, model, ctx):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            seen["norm"] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    pm.register(Probe())
    t.fit()
    assert seen["norm"] == pytest.approx(1e-6, rel=1e-3)


class Recorder:
    """Observer that checks the documented call order and that grads exist in on_step."""

    def __init__(self):
        self.events = []

    @hookimpl
    def on_train_start(self, model, ctx):
        self.events.append("start")

    @hookimpl
    def extra_loss(self, model, batch, outputs, ctx):
        self.events.append("loss")
        return None

    @hookimpl
    def on_step(self, model, ctx):
        has_grad = any(p.grad is not None for p in model.parameters() if p.requires_grad)
        self.events.append(f"step{ctx.step}:{'grad' if has_grad else 'nograd'}")

    @hookimpl
    def on_train_end(self, model, ctx):
        self.events.append("end")


def test_hook_order_and_gradients_present_in_on_step():
    rec = Recorder()
    train(tiny_bert(), "lora", n_rows=16, max_steps=2, batch_size=4, grad_accum=2, observers=[rec])
    assert rec.events == ["start", "loss", "loss", "step1:grad", "loss", "loss", "step2:grad", "end"]


class ExtraLoss:
    def __init__(self, value):
        self.value = value

    @hookimpl
    def extra_loss(self, model, batch, outputs, ctx):
        return torch.tensor(self.value)


def test_extra_loss_is_added_and_nan_is_caught():
    _, _, _, base = train(tiny_bert(), "lora", n_rows=16, max_steps=2, lr=0.0)
    _, _, _, plus = train(tiny_bert(), "lora", n_rows=16, max_steps=2, lr=0.0, observers=[ExtraLoss(5.0)])
    assert plus["loss_curve"][-1] == pytest.approx(base["loss_curve"][-1] + 5.0, rel=1e-5)
    with pytest.raises(NonFiniteLoss, match="lower the learning rate"):
        train(tiny_bert(), "lora", n_rows=16, max_steps=2, observers=[ExtraLoss(float("nan"))])


class FreezeHalfway:
    """Drops every parameter but the head from the optimizer at step 2, via rebuild."""

    @hookimpl
    def on_step(self, model, ctx):
        if ctx.step == 2:
            ctx.extras["state_before"] = optimizer_state_bytes(ctx.optimizer)
            for name, p in model.named_parameters():
                p.requires_grad_(ctx.is_head(name))
            ctx.rebuild_optimizer()
            ctx.extras["state_after"] = optimizer_state_bytes(ctx.optimizer)


def test_rebuild_optimizer_frees_state_and_frozen_weights_stop():
    model, ctx, pm = apply_method(tiny_bert(), "full", batch_size=4, max_steps=4, lr=1e-2,
                                  warmup_ratio=0.0)
    pm.register(FreezeHalfway())
    trainer = Trainer(model, pm, ctx, rows(16), collate)
    snap = {}

    class Snap:
        @hookimpl
        def on_step(self, model, ctx):
            if ctx.step == 2:
                snap.update(snapshot(model))

    pm.register(Snap())
    out = trainer.fit()
    assert ctx.extras["state_after"] < ctx.extras["state_before"] / 10
    assert out["optimizer_rebuilds"] == 1
    for name, p in model.named_parameters():
        if not ctx.is_head(name):
            assert torch.equal(p, snap[name]), f"{name} moved after it left the optimizer"
    # the learning-rate schedule carried on (not reset to warmup)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
