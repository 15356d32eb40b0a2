"""LoRA and the shared low-rank machinery: merge, PEFT equivalence, what trains."""
from __future__ import annotations

import pytest
import torch

from harness.lowrank import LowRankLinear, adapted_modules
from harness.train import Trainer
from helpers import (apply_method, batch, changed, clone, collate, rows, snapshot, tiny_bert,
                     tiny_gpt2, tiny_llama)

MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def _randomise_b(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, m in adapted_modules(model):
            m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("targets", ["qv", "all-linear"])
def test_merged_model_predicts_what_adapted_did(arch, targets):
    model, ctx, pm = apply_method(MODELS[arch](), "lora", {"targets": targets})
    _randomise_b(model)  # B = 0 at init would make the test pass trivially
    model.eval()
    b = batch()
    with torch.no_grad():
        adapted = model(**b).logits
    merged = pm.hook.merge(model=model, ctx=ctx)
    assert not list(adapted_modules(merged)), "merged model still holds adapter modules"
    with torch.no_grad():
        out = merged(**b).logits
    torch.testing.assert_close(out, adapted, rtol=1e-5, atol=1e-5)


def test_merged_model_has_original_state_dict_keys():
    base = tiny_bert()
    keys = set(base.state_dict())
    model, ctx, pm = apply_method(base, "lora")
    merged = pm.hook.merge(model=model, ctx=ctx)
    assert set(merged.state_dict()) == keys


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_only_declared_parameters_change_in_training(arch):
    model, ctx, pm = apply_method(MODELS[arch](), "lora")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) or ctx.is_head(n) for n in trainable)
    before = snapshot(model)
    model.train()
    Trainer(model, pm, ctx, rows(16), collate).fit()
    moved = changed(before, model)
    assert moved, "nothing trained"
    assert moved <= trainable, f"frozen parameters moved: {sorted(moved - trainable)}"
    assert any(n.endswith(".B") for n in moved) and any(ctx.is_head(n) for n in moved)


def test_lora_parameter_count_matches_formula():
    model, ctx, pm = apply_method(tiny_bert(), "lora", {"r": 4})
    n = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".A", ".B")))
    # 2 layers x (query, value) x r x (in + out), hidden 32
    assert n == 2 * 2 * 4 * (32 + 32)


@pytest.mark.parametrize("arch,targets,peft_targets", [
    ("bert", "qv", ["query", "value"]),
    ("gpt2", "qv", ["c_attn"]),
    ("llama", "attn", ["q_proj", "k_proj", "v_proj", "o_proj"]),
])
def test_logits_equal_hugging_face_peft_lora(arch, targets, peft_targets):
    peft = pytest.importorskip("peft")
    base = MODELS[arch]()
    reference = clone(base)
    ours, ctx, _ = apply_method(base, "lora", {"r": 4, "alpha": 8, "targets": targets})
    _randomise_b(ours)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=peft_targets, lora_dropout=0.0,
                          fan_in_fan_out=arch == "gpt2", task_type="SEQ_CLS")
    theirs = peft.get_peft_model(reference, cfg)
    ours_by_name = dict(adapted_modules(ours))
    copied = 0
    with torch.no_grad():
        for name, module in theirs.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                mine = ours_by_name[name]
                module.lora_A["default"].weight.copy_(mine.A)
                module.lora_B["default"].weight.copy_(mine.B)
                copied += 1
    assert copied == len(ours_by_name) > 0
    ours.eval(), theirs.eval()
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(**b).logits, theirs(**b).logits, rtol=1e-5, atol=1e-5)


def test_rslora_scale_and_bad_rank():
    layer = torch.nn.Linear(8, 8)
    assert LowRankLinear(layer, r=4, alpha=8, rank_scaling="rs").scale == pytest.approx(4.0)
    assert LowRankLinear(torch.nn.Linear(8, 8), r=4, alpha=8).scale == pytest.approx(2.0)
    with pytest.raises(ValueError, match="rank must be positive"):
        LowRankLinear(torch.nn.Linear(8, 8), r=0, alpha=8)


def test_unknown_targets_fail_clearly():
    with pytest.raises(ValueError, match="no linear module matches"):
        apply_method(tiny_bert(), "lora", {"targets": "nonexistent_proj"})
