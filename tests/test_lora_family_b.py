"""QLoRA, Delta-LoRA, LoRA-Drop and AdaLoRA: merge, what trains, PEFT equivalence, method rules."""
from __future__ import annotations

import math

import pytest
import torch

from harness.hookspecs import hookimpl
from harness.lowrank import adapted_modules, base_weight
from harness.train import Trainer
from helpers import (apply_method, batch, changed, clone, collate, rows, snapshot, tiny_bert,
                     tiny_gpt2, tiny_llama, train)

MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}
METHODS = ["qlora", "delta_lora", "lora_drop", "adalora"]
SMALL = {"qlora": {"r": 4}, "delta_lora": {}, "lora_drop": {}, "adalora": {"r_init": 4, "target_r": 2}}


def _needs_bnb(method: str) -> None:
    if method == "qlora":
        pytest.importorskip("bitsandbytes")


def _randomise(model, seed: int = 5) -> None:
    """Random values for every adapter tensor (B = 0 / E = 0 at init would make merges trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in adapted_modules(model):
            for name in ("A", "B", "P", "E", "Q"):
                p = getattr(m, name, None)
                if isinstance(p, torch.nn.Parameter):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _own_param(name: str) -> bool:
    return name.endswith((".A", ".B", ".P", ".E", ".Q"))


# -- every method ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_merged_model_predicts_what_adapted_did(method, arch):
    _needs_bnb(method)
    base = MODELS[arch]()
    keys = set(base.state_dict())
    model, ctx, pm = apply_method(base, method, SMALL[method])
    _randomise(model)
    model.eval()
    b = batch()
    with torch.no_grad():
        adapted = model(**b).logits
    merged = pm.hook.merge(model=model, ctx=ctx)
    assert not list(adapted_modules(merged)), "merged model still holds adapter modules"
    assert set(merged.state_dict()) == keys
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    with torch.no_grad():
        out = merged(**b).logits
    torch.testing.assert_close(out, adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_only_declared_parameters_change_in_training(method):
    _needs_bnb(method)
    model, ctx, pm = apply_method(tiny_bert(), method, SMALL[method], batch_size=8, lr=1e-2,
                                  warmup_ratio=0.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(_own_param(n) or ctx.is_head(n) for n in trainable)
    before = snapshot(model)
    model.train()
    Trainer(model, pm, ctx, rows(32), collate).fit()
    moved = changed(before, model)
    allowed = set(trainable)
    if method == "delta_lora":  # the frozen base weights of adapted layers follow the product
        bases = {f"{n}.base.weight" for n, _ in adapted_modules(model)}
        assert bases <= moved, "Delta-LoRA left the base weights unchanged"
        allowed |= bases
    if method == "lora_drop":  # the sampled pairs were replaced: compare only what survives
        moved = {n for n in moved if n in before}
    assert any(_own_param(n) for n in moved) and any(ctx.is_head(n) for n in moved)
    assert moved <= allowed, f"frozen parameters moved: {sorted(moved - allowed)}"


# -- QLoRA ---------------------------------------------------------------------------------------
def test_qlora_base_is_nf4_double_quantized_and_merge_adds_to_the_dequantized_weight():
    bnb = pytest.importorskip("bitsandbytes")
    from methods.qlora import dequantized_weight

    original = tiny_bert()
    weights = {n: m.weight.detach().clone() for n, m in original.named_modules()
               if isinstance(m, torch.nn.Linear)}
    model, ctx, pm = apply_method(original, "qlora", {"r": 4})
    layers = dict(adapted_modules(model))
    # all-linear: every encoder linear (6 per block), never the pooler or the classifier
    assert len(layers) == 12 and not any("pooler" in n or "classifier" in n for n in layers)
    for layer in layers.values():
        assert isinstance(layer.base, bnb.nn.Linear4bit)
        qs = layer.base.weight.quant_state
        assert qs.quant_type == "nf4" and qs.blocksize == 64 and qs.nested
        assert layer.base.weight.dtype == torch.uint8
    # 4 bits + an 8-bit absmax per 64 weights (+ per-layer code books on these tiny layers)
    assert 0.5 + 1 / 64 <= ctx.extras["quantized_bytes_per_param"] < 2
    _randomise(model)
    dequant = {n: dequantized_weight(l.base).clone() for n, l in layers.items()}
    deltas = {n: l.delta_weight().detach().clone() for n, l in layers.items()}
    merged = pm.hook.merge(model=model, ctx=ctx)
    for n in layers:
        w = merged.get_submodule(n).weight.detach()
        torch.testing.assert_close(w, dequant[n] + deltas[n], rtol=0, atol=1e-6)
        # The base is exactly bitsandbytes' NF4 (double-quantised) round trip of the original
        # weight: quantised, not the original.
        q, state = bnb.functional.quantize_4bit(weights[n], blocksize=64, quant_type="nf4",
                                                compress_statistics=True)
        torch.testing.assert_close(dequant[n], bnb.functional.dequantize_4bit(q, state), rtol=0, atol=0)
        assert (dequant[n] - weights[n]).abs().max() > 0


def test_qlora_counts_logical_parameters():
    pytest.importorskip("bitsandbytes")
    base = tiny_bert()
    total = sum(p.numel() for p in base.parameters())
    model, ctx, pm = apply_method(base, "qlora", {"r": 4})
    counted = pm.hook.count_trainable(model=model, ctx=ctx)
    lora = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".A", ".B")))
    assert counted["method"] == lora == 2 * (4 * 4 * (32 + 32) + 4 * (32 + 64) + 4 * (64 + 32))
    assert counted["total"] == total + lora


def test_qlora_logits_equal_hugging_face_peft_on_the_same_nf4_weights():
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    import copy

    base = tiny_llama()
    reference = clone(base)
    ours, ctx, _ = apply_method(base, "qlora", {"r": 4, "alpha": 8, "dropout": 0.0})
    _randomise(ours)
    layers = dict(adapted_modules(ours))
    for name, layer in layers.items():  # the same quantised storage on both sides
        parent, _, attr = name.rpartition(".")
        setattr(reference.get_submodule(parent), attr, copy.deepcopy(layer.base))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(layers),
                          task_type="SEQ_CLS")
    theirs = peft.get_peft_model(reference, cfg)
    copied = 0
    with torch.no_grad():
        for name, module in theirs.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                # PEFT picks its generic LoRA layer around the bitsandbytes base (the model is not
                # flagged as loaded in 4 bit); the base computes with the same NF4 storage.
                assert type(module.base_layer).__name__ == "Linear4bit"
                module.lora_A["default"].weight.copy_(layers[name].A)
                module.lora_B["default"].weight.copy_(layers[name].B)
                copied += 1
    assert copied == len(layers) > 0
    ours.eval(), theirs.eval()
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(**b).logits, theirs(**b).logits, rtol=1e-5, atol=1e-5)


# -- Delta-LoRA ----------------------------------------------------------------------------------
class _ProductAt:
    """Observer: the products ``s B A`` of every adapted layer after optimizer step ``step``."""

    def __init__(self, step: int):
        self.step, self.products = step, {}

    @hookimpl
    def on_step(self, model, ctx):
        if ctx.step == self.step:
            self.products = {n: m.delta_weight().detach().clone() for n, m in adapted_modules(model)}


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("start", [0, 3])
def test_delta_lora_moves_w_by_lam_times_the_products_change(arch, start):
    lam = 2.0
    base = MODELS[arch]()
    w0 = {n: base_weight(m).detach().clone() for n, m in base.named_modules()
          if type(m).__name__ in ("Linear", "Conv1D")}
    observer = _ProductAt(start)
    model, ctx, _, result = train(base, "delta_lora", {"lam": lam, "start_step": start},
                                  observers=[observer])
    assert result["throughput"]["steps"] == 4 > start
    for name, layer in adapted_modules(model):
        assert layer.dropout.__class__.__name__ == "Identity"
        product_t = layer.delta_weight().detach()
        product_k = observer.products[name] if start else torch.zeros_like(product_t)
        assert product_t.abs().max() > 1e-4, "the pair did not train"
        moved = base_weight(layer.base).detach() - w0[name]
        torch.testing.assert_close(moved, lam * (product_t - product_k), rtol=1e-4, atol=1e-6)


# -- LoRA-Drop -----------------------------------------------------------------------------------
def test_lora_drop_selection_rule():
    from methods.lora_drop import module_type, select_layers

    scores = {"a": 0.5, "b": 0.05, "c": 0.3, "d": 0.15}
    assert select_layers(scores, 0.9) == ["a", "c", "d"]   # 0.8 < 0.9, 0.95 >= 0.9
    assert select_layers(scores, 0.8) == ["a", "c"]        # reaches exactly 0.8
    assert select_layers(scores, 0.9, keep=1) == ["a"]
    assert module_type("bert.encoder.layer.11.attention.self.query") == \
        "bert.encoder.layer.*.attention.self.query"


def test_lora_drop_score_is_mean_squared_lora_output_over_real_tokens():
    from methods.lora_drop import layer_scores

    model, ctx, pm = apply_method(tiny_bert(), "lora_drop")
    _randomise(model)
    layers = dict(adapted_modules(model))
    loud = "bert.encoder.layer.1.attention.self.value"
    with torch.no_grad():
        layers[loud].B.mul_(10)
    b = batch()
    inputs = {}
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: inputs.__setitem__(n, a[0]))
               for n, m in layers.items()]
    with torch.no_grad():
        model(**b)
    for h in handles:
        h.remove()
    mask = b["attention_mask"].bool()
    raw = {}
    for n, m in layers.items():
        out = inputs[n] @ (m.B @ m.A).T * m.scale  # dense form, independent of delta_forward
        raw[n] = out.pow(2).sum(-1)[mask].mean().item()
    expected = {n: v / sum(raw.values()) for n, v in raw.items()}
    scores = layer_scores(model, layers, [b])
    assert max(scores, key=scores.get) == loud
    assert sum(scores.values()) == pytest.approx(1.0)
    for n in layers:
        assert scores[n] == pytest.approx(expected[n], rel=1e-4)


def test_lora_drop_keeps_top_layers_and_shares_one_pair_per_type():
    model, ctx, pm, _ = train(tiny_llama(), "lora_drop", {"keep": 2, "sample_frac": 0.5,
                                                           "targets": "attn"})
    scores, kept = ctx.extras["layer_scores"], ctx.extras["kept_layers"]
    assert kept == sorted(scores, key=scores.get, reverse=True)[:2]
    layers = dict(adapted_modules(model))
    assert set(scores) == set(layers) and len(layers) == 8
    by_type: dict[str, set[int]] = {}
    for n, m in layers.items():
        if n not in kept:
            by_type.setdefault(n.split(".")[-1], set()).add(id(m.A))
    assert all(len(ids) == 1 for ids in by_type.values()), "dropped layers of one type must share"
    own = {id(layers[n].A) for n in kept}
    assert len(own) == 2 and not own & set().union(*by_type.values())
    # the optimizer trains the new pairs: every distinct pair moved away from B = 0
    assert all(m.B.abs().max() > 0 for m in layers.values())
    after = ctx.extras["trainable_after_drop"]
    assert after == sum(p.numel() for p in model.parameters() if p.requires_grad)  # shared once
    full_lora = sum(8 * (m.in_features + m.out_features) for m in layers.values()) + 32 * 2
    assert after < full_lora
    # merge folds the shared pair into each of its layers
    _randomise(model)
    model.eval()
    b = batch()
    with torch.no_grad():
        adapted = model(**b).logits
        merged = pm.hook.merge(model=model, ctx=ctx)
        torch.testing.assert_close(merged(**b).logits, adapted, rtol=1e-5, atol=1e-5)


# -- AdaLoRA -------------------------------------------------------------------------------------
def _schedule(step, b0, bt, t_init, t_final, total):
    """The paper's cubic budget, written out again here so the test does not reuse the code."""
    if step <= t_init:
        return b0
    if step >= total - t_final:
        return bt
    return math.floor(bt + (b0 - bt) * (1 - (step - t_init) / (total - t_final - t_init)) ** 3)


def test_adalora_budget_follows_the_schedule_and_ends_at_the_target():
    r0, rt = 6, 2
    model, ctx, pm, result = train(tiny_bert(), "adalora",
                                   {"r_init": r0, "target_r": rt, "t_init": 3, "t_final": 4,
                                    "delta_t": 2}, n_rows=160)
    total = result["throughput"]["steps"]
    assert total == 20
    layers = dict(adapted_modules(model))
    n = len(layers)
    b0, bt = r0 * n, rt * n
    allocations = ctx.extras["allocations"]
    steps = [s for s, _, _ in allocations]
    assert steps == [5, 7, 9, 11, 13, 15, 16]  # every 2 after t_init, then the final one at T - t_final
    for step, budget, kept in allocations:
        assert budget == _schedule(step, b0, bt, 3, 4, total) == kept
    budgets = [b for _, b, _ in allocations]
    assert budgets == sorted(budgets, reverse=True) and b0 > budgets[0]
    assert ctx.extras["final_total_rank"] == bt == sum(ctx.extras["final_ranks"].values())
    # masked triplets are zero at the end; the fixed mask held through the final phase
    for name, m in layers.items():
        assert not m.E[~m.mask].any()
        assert ctx.extras["final_ranks"][name] == int(m.mask.sum())
    nonzero = sum(int((m.E != 0).sum()) for m in layers.values())
    assert nonzero <= bt


def test_adalora_allocation_keeps_the_best_triplets():
    from methods.adalora import AdaLoRA

    model, ctx, pm = apply_method(tiny_bert(), "adalora", {"r_init": 3, "target_r": 1})
    method = pm.get_plugin("method")
    layers = {n: m for n, m in adapted_modules(model)}
    g = torch.Generator().manual_seed(0)
    method.ipt, method.unc = {}, {}
    for m in layers.values():
        for p in (m.P, m.E, m.Q):
            method.ipt[id(p)] = torch.rand(p.shape, generator=g)
            method.unc[id(p)] = torch.rand(p.shape, generator=g)
    with torch.no_grad():
        for m in layers.values():
            m.E.fill_(1.0)
    expected = {}
    for n, m in layers.items():
        s = lambda p: method.ipt[id(p)] * method.unc[id(p)]  # noqa: E731
        expected[n] = s(m.E) + s(m.Q).mean(1) + s(m.P).mean(0)
    flat = torch.cat(list(expected.values()))
    fifth = flat.sort(descending=True).values[4]
    assert isinstance(method, AdaLoRA) and method.allocate(layers, 5) == 5
    for n, m in layers.items():
        torch.testing.assert_close(m.mask, expected[n] >= fifth)
        assert torch.equal(m.E != 0, m.mask)


def test_adalora_orthogonality_loss_matches_the_reference_formula():
    model, ctx, pm = apply_method(tiny_bert(), "adalora", {"r_init": 4, "target_r": 2, "orth_weight": 0.1})
    _randomise(model)
    [loss] = [x for x in pm.hook.extra_loss(model=model, batch={}, outputs=None, ctx=ctx)
              if x is not None]
    terms = []
    for _, m in adapted_modules(model):
        terms.append(torch.norm(m.Q @ m.Q.T - torch.eye(4), p="fro"))
        terms.append(torch.norm(m.P.T @ m.P - torch.eye(4), p="fro"))
    torch.testing.assert_close(loss, 0.1 * torch.stack(terms).mean())
    loss.backward()
    assert all(m.P.grad is not None and m.Q.grad is not None for _, m in adapted_modules(model))


@pytest.mark.parametrize("arch,targets,peft_targets", [
    ("bert", "attn", ["query", "key", "value", "attention.output.dense"]),
    ("llama", "qv", ["q_proj", "v_proj"]),
])
def test_adalora_logits_equal_hugging_face_peft(arch, targets, peft_targets):
    peft = pytest.importorskip("peft")
    base = MODELS[arch]()
    reference = clone(base)
    ours, ctx, _ = apply_method(base, "adalora", {"r_init": 4, "target_r": 2, "alpha": 8,
                                                  "targets": targets})
    _randomise(ours)
    cfg = peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, lora_dropout=0.0,
                             target_modules=peft_targets, total_step=100, task_type="SEQ_CLS")
    theirs = peft.get_peft_model(reference, cfg)
    ours_by_name = dict(adapted_modules(ours))
    copied = 0
    with torch.no_grad():
        for name, module in theirs.base_model.model.named_modules():
            if hasattr(module, "lora_E") and "default" in module.lora_E:
                mine = ours_by_name[name]
                module.lora_A["default"].copy_(mine.Q)              # (r, in)
                module.lora_E["default"].copy_(mine.E.view(-1, 1))  # (r, 1)
                module.lora_B["default"].copy_(mine.P)              # (out, r)
                # PEFT divides lora_alpha by (ranknum + 1e-5), ranknum = init_r; ours alpha / r_init
                assert module.scaling["default"] / (module.ranknum["default"] + 1e-5) == \
                    pytest.approx(mine.scale, rel=1e-5)
                copied += 1
    assert copied == len(ours_by_name) > 0
    ours.eval(), theirs.eval()
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(**b).logits, theirs(**b).logits, rtol=1e-5, atol=1e-5)
