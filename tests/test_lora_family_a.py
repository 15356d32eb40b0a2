"""LoRA+, DoRA, LoRA-FA and VeRA: merge, what trains, Hugging Face PEFT equivalence, and each
method's own claim (LoRA+ learning rates, DoRA's start at the base model, LoRA-FA's smaller saved
activations, VeRA's seeded shared pair saved once with the model)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.hookspecs import hookimpl
from harness.lowrank import LowRankLinear, adapted_modules
from harness.train import Trainer
from helpers import (apply_method, batch, changed, clone, collate, rows, snapshot, tiny_bert,
                     tiny_gpt2, tiny_llama)
from methods.dora import DoRALinear
from methods.lora_fa import FrozenALowRankLinear
from methods.vera import SHARED_ATTR, SharedProjection

MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}
METHODS = ["lora_plus", "dora", "lora_fa", "vera"]
# Parameter-name suffixes each method declares trainable (the task head trains besides).
DECLARED = {"lora_plus": (".A", ".B"), "dora": (".A", ".B", ".m"), "lora_fa": (".B",),
            "vera": (".lambda_b", ".lambda_d")}
SMALL = {"vera": {"r": 16}}  # r 256 is for MiniLM; keep the tiny models' tests tiny
PEFT_TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"],
                "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}
OUR_TARGETS = {"bert": "qv", "gpt2": "qv", "llama": "attn"}


def _randomise(model: nn.Module, seed: int = 5, scale: float = 0.1) -> None:
    """Move every adapter parameter off its init (zero B, b = 0 would make equalities trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in adapted_modules(model):
            for name, p in m.named_parameters():
                if not name.startswith("base."):
                    p.add_(torch.randn(p.shape, generator=g) * scale)


def _params(method: str, **extra) -> dict:
    return {**SMALL.get(method, {}), **extra}


# -- every method -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_merged_model_predicts_what_adapted_did(method, arch):
    base = MODELS[arch]()
    keys = set(base.state_dict())
    model, ctx, pm = apply_method(base, method, _params(method, targets="all-linear"))
    _randomise(model, scale=0.5)
    model.eval()
    b = batch()
    with torch.no_grad():
        adapted = model(**b).logits
        plain = tiny_model_logits(arch, b)
    assert not torch.allclose(adapted, plain, atol=1e-4), "adapter had no effect: test is vacuous"
    merged = pm.hook.merge(model=model, ctx=ctx)
    assert not list(adapted_modules(merged)), "merged model still holds adapter modules"
    assert set(merged.state_dict()) == keys, "merged model's state_dict keys differ from the original"
    with torch.no_grad():
        torch.testing.assert_close(merged(**b).logits, adapted, rtol=1e-5, atol=1e-5)


def tiny_model_logits(arch: str, b: dict) -> torch.Tensor:
    return MODELS[arch]()(**b).logits


@pytest.mark.parametrize("method", METHODS)
def test_only_declared_parameters_change_in_training(method):
    # 4 steps at lr 1e-2: VeRA's d only gets a gradient once b has left zero (from step 2).
    model, ctx, pm = apply_method(tiny_bert(), method, _params(method), batch_size=8, lr=1e-2,
                                  warmup_ratio=0.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(DECLARED[method]) or ctx.is_head(n) for n in trainable)
    before = snapshot(model)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model.train()
    Trainer(model, pm, ctx, rows(32), collate).fit()
    moved = changed(before, model)
    assert moved <= trainable, f"frozen parameters moved: {sorted(moved - trainable)}"
    for suffix in DECLARED[method]:  # every declared kind of parameter actually trains
        assert any(n.endswith(suffix) for n in moved), f"no {suffix} moved"
    assert any(ctx.is_head(n) for n in moved)
    for k, v in model.named_buffers():  # VeRA's shared pair stays frozen
        assert torch.equal(buffers[k], v), f"buffer {k} changed"


# -- LoRA+ --------------------------------------------------------------------------------------

def _peft_name(name: str) -> str:
    """A PEFT parameter name in our naming (``...query.lora_A.default.weight`` -> ``...query.A``)."""
    name = name.removeprefix("base_model.model.")
    for theirs, ours in ((".lora_A.default.weight", ".A"), (".lora_B.default.weight", ".B"),
                         (".lora_magnitude_vector.default.weight", ".m"),
                         (".vera_lambda_b.default", ".lambda_b"),
                         (".vera_lambda_d.default", ".lambda_d"),
                         (".modules_to_save.default.", ".")):
        name = name.replace(theirs, ours)
    return name.replace(".base_layer.", ".")


def test_lora_plus_groups_match_peft_create_loraplus_optimizer():
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    base = tiny_bert()
    reference = clone(base)
    model, ctx, pm = apply_method(base, "lora_plus", {"r": 4, "alpha": 8, "ratio": 16}, lr=1e-3)
    ours = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in pm.hook.param_groups(model=model, ctx=ctx):
        for p in g["params"]:
            ours[names[id(p)]] = g["lr"]

    theirs_model = peft.get_peft_model(reference, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    opt = create_loraplus_optimizer(theirs_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    their_names = {id(p): _peft_name(n) for n, p in theirs_model.named_parameters()}
    theirs = {their_names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert ours == pytest.approx(theirs)
    assert ours["classifier.bias"] == pytest.approx(16e-3) and ours["classifier.weight"] == 1e-3
    assert {n for n, lr in ours.items() if n.endswith(".B")} and \
        all(lr == pytest.approx(16e-3) for n, lr in ours.items() if n.endswith(".B"))


class _RecordLR:
    """Observer: the learning rate of A, B and the head bias after every optimizer step."""

    def __init__(self):
        self.seen: list[dict[str, float]] = []

    @hookimpl
    def on_step(self, model, ctx):
        kind = {id(model.classifier.bias): "1d"}
        for _, m in adapted_modules(model):
            kind[id(m.A)], kind[id(m.B)] = "A", "B"
        self.seen.append({kind[id(p)]: g["lr"] for g in ctx.optimizer.param_groups
                          for p in g["params"] if id(p) in kind})


def test_lora_plus_ratio_survives_the_trainer_schedule():
    rec = _RecordLR()
    model, ctx, pm = apply_method(tiny_bert(), "lora_plus", {"ratio": 4}, observers=[rec], lr=1e-3,
                                  warmup_ratio=0.5, batch_size=8)
    model.train()
    Trainer(model, pm, ctx, rows(32), collate).fit()
    assert len(rec.seen) == 4
    for lrs in rec.seen[:-1]:  # warmup then decay; the last step's rate is 0
        assert lrs["A"] > 0 and lrs["B"] == pytest.approx(4 * lrs["A"]) and lrs["1d"] == lrs["B"]
    assert len({lrs["A"] for lrs in rec.seen}) > 1, "schedule did not move: test is vacuous"


# -- DoRA ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(MODELS))
def test_dora_starts_equal_to_the_base_model(arch):
    base = MODELS[arch]()
    b = batch()
    with torch.no_grad():
        expected = base(**b).logits
    model, _, _ = apply_method(base, "dora", {"targets": "all-linear"})
    for _, m in adapted_modules(model):  # m is the row norm of W0, not ones
        torch.testing.assert_close(m.m, m.base.weight.norm(dim=1 if arch != "gpt2" else 0))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**b).logits, expected, rtol=1e-5, atol=1e-6)


def test_dora_norm_is_detached_and_merge_normalises_rows():
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(6, 5), r=2, alpha=4)
    _randomise(nn.Sequential(layer))
    x = torch.randn(3, 6)
    layer(x).sum().backward()
    # With ||V|| a constant c, d out / d m_i = sum_n (V x_n)_i / c_i exactly.
    with torch.no_grad():
        v = layer.base.weight + layer.scale * layer.B @ layer.A
        expected = (x @ v.T).sum(0) / v.norm(dim=1)
    torch.testing.assert_close(layer.m.grad, expected)
    merged = layer.merged_base()
    torch.testing.assert_close(merged.weight.norm(dim=1), layer.m.detach().abs())


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_matches_hugging_face_peft(arch, dropout):
    """Same logits and the same gradients for A, B and m (norm detached in both), with dropout too."""
    peft = pytest.importorskip("peft")
    base = MODELS[arch]()
    reference = clone(base)
    ours, _, _ = apply_method(base, "dora", {"r": 4, "alpha": 8, "targets": OUR_TARGETS[arch],
                                             "dropout": dropout})
    _randomise(ours)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS[arch], lora_dropout=dropout,
                          use_dora=True, fan_in_fan_out=arch == "gpt2", task_type="SEQ_CLS")
    theirs = peft.get_peft_model(reference, cfg)
    mine = dict(adapted_modules(ours))
    pairs = []
    with torch.no_grad():
        for name, module in theirs.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                layer = mine[name]
                module.lora_A["default"].weight.copy_(layer.A)
                module.lora_B["default"].weight.copy_(layer.B)
                module.lora_magnitude_vector["default"].weight.copy_(layer.m)
                pairs.append((layer, module))
    assert len(pairs) == len(mine) > 0
    # Training mode: with dropout the masks must coincide, so both draw from the same seed.
    ours.train(), theirs.train()
    b = {k: v for k, v in batch().items() if k != "labels"}
    outs = []
    for model in (ours, theirs):
        torch.manual_seed(123)
        out = model(**b).logits
        out.pow(2).sum().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for layer, module in pairs:
        torch.testing.assert_close(layer.A.grad, module.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.B.grad, module.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.m.grad, module.lora_magnitude_vector["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6)


# -- LoRA-FA ------------------------------------------------------------------------------------

def _saved_activation_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward during one forward, parameters excluded, by storage."""
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return sum(seen.values())


def test_lora_fa_saves_only_the_rank_r_projection_for_backward():
    torch.manual_seed(0)
    base = nn.Linear(64, 64)
    lora, fa = LowRankLinear(clone(base), r=4, alpha=8), FrozenALowRankLinear(clone(base), r=4, alpha=8)
    with torch.no_grad():
        fa.A.copy_(lora.A)
        lora.B.normal_(), fa.B.copy_(lora.B)
    x = torch.randn(8, 32, 64, requires_grad=True)  # an inner layer's input requires grad
    lora_bytes, fa_bytes = _saved_activation_bytes(lora, x), _saved_activation_bytes(fa, x)
    ax_bytes = 8 * 32 * 4 * 4  # A x: tokens x r, fp32
    assert fa_bytes == ax_bytes, "LoRA-FA kept more than A x for backward"
    assert lora_bytes >= ax_bytes + x.numel() * 4, "LoRA should keep x for A's gradient"
    # Same gradient for B and the input: freezing A changes what is stored, not the maths.
    assert fa.A.grad is None and not fa.A.requires_grad
    torch.testing.assert_close(fa.B.grad, lora.B.grad)


def test_lora_fa_trainable_set_and_logits_match_peft():
    """PEFT 0.21 has LoRA-FA only as an optimizer (`create_lorafa_optimizer`, which freezes lora_A
    and applies the v2 gradient correction); we compare the trainable set and the forward."""
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_lorafa_optimizer

    base = tiny_bert()
    reference = clone(base)
    ours, _, _ = apply_method(base, "lora_fa", {"r": 4, "alpha": 8})
    _randomise(ours)
    theirs = peft.get_peft_model(reference, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    create_lorafa_optimizer(theirs, r=4, lora_alpha=8, lr=1e-3)
    with torch.no_grad():
        for name, module in theirs.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                layer = dict(adapted_modules(ours))[name]
                module.lora_A["default"].weight.copy_(layer.A)
                module.lora_B["default"].weight.copy_(layer.B)
    our_set = {n for n, p in ours.named_parameters() if p.requires_grad}
    their_set = {_peft_name(n) for n, p in theirs.named_parameters() if p.requires_grad}
    assert our_set == their_set and any(n.endswith(".B") for n in our_set)
    ours.eval(), theirs.eval()
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(**b).logits, theirs(**b).logits, rtol=1e-5, atol=1e-5)


# -- VeRA ---------------------------------------------------------------------------------------

VERA_PEFT_TARGETS = {
    "bert": r".*layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
            r"|intermediate\.dense|output\.dense)",
    "gpt2": ["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_vera_matches_hugging_face_peft(arch):
    """Layers of different shapes (attention and MLP) slice one shared pair; PEFT draws the same
    pair from the same seed, so A and B are compared, not copied; b and d are copied."""
    peft = pytest.importorskip("peft")
    base = MODELS[arch]()
    reference = clone(base)
    ours, _, _ = apply_method(base, "vera", {"r": 16, "projection_seed": 7, "targets": "all"})
    _randomise(ours)
    cfg = peft.VeraConfig(r=16, target_modules=VERA_PEFT_TARGETS[arch], projection_prng_key=7,
                          fan_in_fan_out=arch == "gpt2", task_type="SEQ_CLS")
    theirs = peft.get_peft_model(reference, cfg)
    shared = getattr(ours, SHARED_ATTR)
    mine = dict(adapted_modules(ours))
    copied = 0
    with torch.no_grad():
        for name, module in theirs.base_model.model.named_modules():
            if hasattr(module, "vera_lambda_b") and "default" in module.vera_lambda_b:
                torch.testing.assert_close(module.vera_A["default"], shared.A, rtol=0, atol=0)
                torch.testing.assert_close(module.vera_B["default"], shared.B, rtol=0, atol=0)
                module.vera_lambda_b["default"].copy_(mine[name].lambda_b)
                module.vera_lambda_d["default"].copy_(mine[name].lambda_d)
                copied += 1
    assert copied == len(mine) > 0
    ours.eval(), theirs.eval()
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(**b).logits, theirs(**b).logits, rtol=1e-5, atol=1e-5)


def test_vera_shared_pair_is_saved_once_and_reproducible_from_the_seed():
    model, _, _ = apply_method(tiny_bert(), "vera", {"r": 8, "projection_seed": 3, "targets": "all"})
    sd = model.state_dict()
    shared_keys = [k for k in sd if k.startswith(SHARED_ATTR + ".")]
    assert sorted(shared_keys) == [f"{SHARED_ATTR}.A", f"{SHARED_ATTR}.B"]
    for key in shared_keys:  # one entry per tensor, not one per adapted layer
        assert sum(v.data_ptr() == sd[key].data_ptr() for v in sd.values()) == 1, key
    assert sd[f"{SHARED_ATTR}.A"].shape == (8, 64) and sd[f"{SHARED_ATTR}.B"].shape == (64, 8)
    again = SharedProjection(8, 64, 64, seed=3)
    assert torch.equal(again.A, sd[f"{SHARED_ATTR}.A"]) and torch.equal(again.B, sd[f"{SHARED_ATTR}.B"])
    assert not torch.equal(SharedProjection(8, 64, 64, seed=4).A, again.A)
    # Saved state restores the adapted model even where the new one drew another pair.
    _randomise(model)
    other, _, _ = apply_method(tiny_bert(), "vera", {"r": 8, "projection_seed": 99, "targets": "all"})
    other.load_state_dict(model.state_dict())
    model.eval(), other.eval()
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(other(**b).logits, model(**b).logits)
    # Every layer reads the registered buffers (a copy per layer would miss load_state_dict).
    assert all(m._shared is getattr(other, SHARED_ATTR) for _, m in adapted_modules(other))


def test_vera_parameter_count():
    model, _, _ = apply_method(tiny_bert(), "vera", {"r": 8})
    n = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".lambda_b", ".lambda_d")))
    assert n == 2 * 2 * (32 + 8)  # 2 layers x (query, value) x (out + r)
