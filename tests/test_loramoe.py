"""LoRAMoE: routing, the localized balancing loss, equivalence with LoRA, what trains."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from harness.lowrank import LowRankLinear, adapted_modules
from harness.plugins import get_method
from helpers import apply_method, batch, snapshot, tiny_bert, tiny_llama, tiny_multitask, train
from methods.loramoe import MoELoRALinear, balancing_loss, expert_groups


def _layer(experts: int = 3, seed: int = 0) -> MoELoRALinear:
    torch.manual_seed(seed)
    layer = MoELoRALinear(nn.Linear(8, 6), experts=experts, r=2, alpha=4)
    with torch.no_grad():
        layer.B.normal_(0, 0.1)
    return layer


def test_router_weights_sum_to_one_per_token():
    layer = _layer().train()
    x = torch.randn(2, 5, 8)
    gates = layer.route(x)
    assert gates.shape == (2, 5, 3) and (gates > 0).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(2, 5))
    layer(x)
    torch.testing.assert_close(layer.gates, gates)  # what the balancing loss will read


def test_output_is_the_gate_weighted_sum_of_the_experts():
    layer = _layer(experts=3).eval()
    x = torch.randn(4, 8)
    g = layer.route(x)
    expected = layer.base(x) + sum(g[:, i:i + 1] * (x @ layer.A[i].T @ layer.B[i].T) * layer.scale
                                   for i in range(3))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_balancing_loss_matches_a_hand_computation():
    gates = torch.tensor([[[0.7, 0.3], [0.4, 0.6]],     # sample 0: two real tokens
                          [[0.2, 0.8], [0.5, 0.5]]])    # sample 1: the second token is padding
    mask = torch.tensor([[1, 1], [1, 0]])
    # Q (expert x sample) = [[1.1, 0.2], [0.9, 0.8]]; sample 0 is expert 0's type, sample 1 expert
    # 1's: I = [[1.1, 0.9], [0.9, 1.1]]; Z = [[1.21, 0.18], [0.81, 0.88]], mean 0.77.
    expected = (0.44 ** 2 + 0.59 ** 2 + 0.04 ** 2 + 0.11 ** 2) / 3 / 0.77 ** 2
    loss = balancing_loss(gates, mask, torch.tensor([0, 1]), torch.tensor([0, 1]), delta=0.1)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_expert_groups_follow_the_tasks():
    assert expert_groups(6, 1).tolist() == [0] * 6
    assert expert_groups(6, 3).tolist() == [0, 0, 1, 1, 2, 2]
    assert expert_groups(2, 5).tolist() == [0, 1]
    _, ctx, _ = apply_method(tiny_multitask({"a": 2, "b": 1}), "loramoe", {"experts": 4})
    assert ctx.extras["expert_groups"] == {"a": [0, 1], "b": [2, 3]}


def test_one_expert_with_a_constant_router_equals_lora():
    base = tiny_bert()
    lora, _, _ = apply_method(copy.deepcopy(base), "lora", {"r": 4, "alpha": 8, "targets": "mlp"})
    moe, _, _ = apply_method(base, "loramoe", {"experts": 1, "r": 4, "alpha": 8, "targets": "mlp"})
    theirs = dict(adapted_modules(lora))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, m in adapted_modules(moe):
            ref = theirs[name]
            assert isinstance(ref, LowRankLinear)
            ref.B.copy_(torch.randn(ref.B.shape, generator=g) * 0.1)
            m.A[0].copy_(ref.A), m.B[0].copy_(ref.B)
            m.router.weight.zero_()
        b = batch()
        torch.testing.assert_close(moe(**b).logits, lora(**b).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_only_declared_parameters_change_and_the_router_learns(arch):
    model = {"bert": tiny_bert, "llama": tiny_llama}[arch]()
    before = snapshot(model)
    model, ctx, pm, result = train(model, "loramoe", {"r": 2, "experts": 3}, n_rows=32, max_steps=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B", ".router.weight")) or ctx.is_head(n) for n in trainable)
    names = [n for n, _ in adapted_modules(model)]
    expected = ("intermediate.dense", "output.dense") if arch == "bert" else ("gate_proj", "up_proj", "down_proj")
    assert names and all(n.endswith(expected) and "attention" not in n for n in names)
    moved = _moved(before, model)
    assert moved <= trainable, sorted(moved - trainable)
    assert any(n.endswith(".router.weight") for n in moved) and any(n.endswith(".B") for n in moved)


def _moved(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    """Parameters that changed; a wrapped base layer's weights are compared under their old name."""
    out = set()
    for n, p in model.named_parameters():
        old = before.get(n.replace(".base.", "."))
        if old is None or not torch.equal(old, p.detach()):
            out.add(n)
    return out


def test_the_balancing_loss_is_added_in_training_only():
    model, ctx, pm = apply_method(tiny_multitask({"a": 2, "b": 1}), "loramoe", {"experts": 4})
    model.train()
    ctx.current_task = "b"
    b = batch()
    out = model(**b, task="b")
    (extra,) = [x for x in pm.hook.extra_loss(model=model, batch=b, outputs=out, ctx=ctx) if x is not None]
    assert extra.dim() == 0 and float(extra.detach()) > 0
    assert all(m.gates is None for _, m in adapted_modules(model))  # consumed: the graph can go
    model.eval()
    out = model(**b, task="b")
    assert [x for x in pm.hook.extra_loss(model=model, batch=b, outputs=out, ctx=ctx) if x is not None] == []


def test_not_mergeable():
    model, ctx, pm = apply_method(tiny_bert(), "loramoe")
    assert get_method("loramoe").mergeable is False
    assert pm.hook.merge(model=model, ctx=ctx) is None
