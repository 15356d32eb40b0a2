"""LongLoRA: S2-Attn masking, RoPE interpolation, merge, what trains (tiny Llama, no data)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.lowrank import adapted_modules
from harness.train import Trainer
from helpers import apply_method, changed, snapshot, tiny_bert
from methods.longlora import group_size, shifted_sparse_attention


def tiny_causal_llama(seed: int = 0, tie: bool = True, max_positions: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=max_positions,
                      tie_word_embeddings=tie, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def lm_rows(n: int = 8, length: int = 32, seed: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 100, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": list(ids)})
    return out


def lm_collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}


def longlora(model, **params):
    params = {"rope_factor": 1, **params}
    return apply_method(model, "longlora", params, max_length=32)


# -- S2-Attn ------------------------------------------------------------------------------------
def visible(head_shifted: bool, q: int, k: int, group: int, n: int) -> bool:
    """The S2-Attn rule: causal, and in the same group (shifted groups start at -G/2; nothing
    wraps around)."""
    if k > q:
        return False
    off = group // 2 if head_shifted else 0
    return (q + off) // group == (k + off) // group


@pytest.mark.parametrize("n,group", [(16, 4), (14, 4), (8, 8)])
def test_s2_attn_output_depends_exactly_on_visible_tokens(n, group):
    torch.manual_seed(0)
    heads, d = 2, 8  # head 0 plain groups, head 1 shifted
    q, k, v = (torch.randn(1, heads, n, d, dtype=torch.float64) for _ in range(3))
    base = shifted_sparse_attention(q, k, v, group)
    assert base.shape == (1, heads, n, d)
    for j in range(n):  # perturb token j's key and value, see which outputs move
        k2, v2 = k.clone(), v.clone()
        k2[:, :, j] += 1.0
        v2[:, :, j] += 1.0
        out = shifted_sparse_attention(q, k2, v2, group)
        for h in range(heads):
            for t in range(n):
                moved = not torch.equal(out[0, h, t], base[0, h, t])
                assert moved == visible(h == 1, t, j, group, n), (h, t, j)


def test_s2_attn_matches_a_dense_masked_reference():
    torch.manual_seed(1)
    n, group, heads, d = 16, 4, 4, 8
    q, k, v = (torch.randn(2, heads, n, d, dtype=torch.float64) for _ in range(3))
    ours = shifted_sparse_attention(q, k, v, group, scaling=0.3)
    ref = torch.empty_like(ours)
    for h in range(heads):
        mask = torch.tensor([[visible(h >= heads // 2, t, j, group, n) for j in range(n)] for t in range(n)])
        ref[:, h] = F.scaled_dot_product_attention(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1],
                                                   attn_mask=mask, scale=0.3)[:, 0]
    torch.testing.assert_close(ours, ref)


def test_a_plain_roll_would_leak_across_the_wrap_around():
    """The paper's roll-then-group puts the last G/2 tokens before the first G/2 in one causal
    group: token 0 would see token n-1. Ours must not (checked above); this documents the leak."""
    torch.manual_seed(2)
    n, group, d = 16, 4, 8
    q, k, v = (torch.randn(1, 1, n, d, dtype=torch.float64) for _ in range(3))

    def rolled(k, v):
        r = lambda x: x.roll(-group // 2, dims=2).reshape(1, 1, n // group, group, d)[0].transpose(0, 1)
        out = F.scaled_dot_product_attention(r(q), r(k), r(v), is_causal=True)
        return out.transpose(0, 1).reshape(1, 1, n, d).roll(group // 2, dims=2)

    k2, v2 = k.clone(), v.clone()
    k2[..., n - 1, :] += 1
    v2[..., n - 1, :] += 1
    assert not torch.equal(rolled(k, v)[..., 0, :], rolled(k2, v2)[..., 0, :])  # the leak
    ours = lambda k, v: shifted_sparse_attention(torch.cat([q, q], 1), torch.cat([k, k], 1),
                                                 torch.cat([v, v], 1), group)[:, 1]
    assert torch.equal(ours(k, v)[..., 0, :], ours(k2, v2)[..., 0, :])


def test_group_size():
    assert group_size(512, 0.25) == 128 and group_size(30, 0.25) == 6 and group_size(6, 0.25) == 2


def test_model_uses_s2_attn_in_training_and_full_attention_in_eval():
    base = tiny_causal_llama()
    ids = torch.randint(1, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    model, ctx, pm = longlora(base)
    assert model.config._attn_implementation.startswith("longlora_s2")
    model.eval()
    with torch.no_grad():  # B = 0, no RoPE scaling: eval mode is the base model exactly
        torch.testing.assert_close(model(input_ids=ids).logits, reference, rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        train_out = model(input_ids=ids).logits
        assert not torch.allclose(train_out, reference, atol=1e-4)  # grouped attention differs
        # no token sees a later one, across both layers: perturb the last token
        ids2 = ids.clone()
        ids2[:, -1] = (ids2[:, -1] % 99) + 1
        out2 = model(input_ids=ids2).logits
        torch.testing.assert_close(out2[:, :-1], train_out[:, :-1], rtol=0, atol=0)
        # ... and a token sees the one before it
        ids3 = ids.clone()
        ids3[:, 20] = (ids3[:, 20] % 99) + 1
        assert not torch.allclose(model(input_ids=ids3).logits[:, 21], train_out[:, 21])


def test_left_padding_is_refused_in_training():
    model, ctx, pm = longlora(tiny_causal_llama())
    model.train()
    ids = torch.randint(1, 100, (2, 32))
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[0, :4] = 0
    with pytest.raises(ValueError, match="left-padded"):
        model(input_ids=ids, attention_mask=mask)
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[0, -4:] = 0  # right padding is fine
    model(input_ids=ids, attention_mask=mask)


# -- RoPE ----------------------------------------------------------------------------------------
def test_rope_interpolation_divides_positions_by_the_factor():
    base = tiny_causal_llama()
    old = base.model.rotary_emb
    model, ctx, pm = apply_method(base, "longlora", {"target_length": 256}, max_length=32)  # auto: 256 / 64
    assert ctx.extras["rope_factor"] == 4.0
    new = model.model.rotary_emb
    assert new is not old and model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.rope_parameters["factor"] == 4.0
    x = torch.zeros(1, 1, 8)
    pos = torch.arange(0, 256).unsqueeze(0)
    cos_new, sin_new = new(x, pos)
    cos_old, sin_old = old(x, pos.float() / 4.0)
    torch.testing.assert_close(cos_new, cos_old)
    torch.testing.assert_close(sin_new, sin_old)


def test_rope_factor_options():
    _, ctx, _ = apply_method(tiny_causal_llama(), "longlora", {}, max_length=32)  # 32 <= 64: off
    assert ctx.extras["rope_factor"] == 1.0
    _, ctx, _ = apply_method(tiny_causal_llama(), "longlora", {"rope_factor": 2}, max_length=32)
    assert ctx.extras["rope_factor"] == 2.0
    with pytest.raises(ValueError, match="rope_factor"):
        apply_method(tiny_causal_llama(), "longlora", {"rope_factor": 0.5}, max_length=32)


# -- merge and training --------------------------------------------------------------------------
def _perturb(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, m in adapted_modules(model):
            m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.1)
        for n, p in model.named_parameters():
            if p.requires_grad and not n.endswith((".A", ".B")):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("tie", [True, False])
def test_merged_model_is_plain_and_predicts_what_adapted_did(tie, tmp_path):
    from transformers import LlamaForCausalLM

    base = tiny_causal_llama(tie=tie)
    keys = set(base.state_dict())
    original_impl = base.config._attn_implementation
    model, ctx, pm = apply_method(base, "longlora", {"rope_factor": 2}, max_length=32)
    _perturb(model)
    model.eval()
    ids = torch.randint(1, 100, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    merged = pm.hook.merge(model=model, ctx=ctx)
    assert not list(adapted_modules(merged))
    assert set(merged.state_dict()) == keys
    assert merged.config._attn_implementation == original_impl
    assert not any(hasattr(m, "longlora_s2") for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
    # saved and reloaded without this package: same positions (RoPE scaling), same head
    merged.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_only_lora_embeddings_and_norms_change_in_a_step():
    model, ctx, pm = longlora(tiny_causal_llama(tie=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if n.endswith((".A", ".B"))}
    assert {n.split(".")[-2] for n in lora} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    rest = trainable - lora
    assert rest == {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{norm}.weight" for i in range(2)
        for norm in ("input_layernorm", "post_attention_layernorm")}
    assert ctx.extras["lm_head_untied"] and model.lm_head.weight is not model.model.embed_tokens.weight
    before = snapshot(model)
    model.train()
    Trainer(model, pm, ctx, lm_rows(4), lm_collate).fit()  # batch 8 > 4 rows: one step
    moved = changed(before, model)
    assert moved <= trainable, f"frozen parameters moved: {sorted(moved - trainable)}"
    assert "model.embed_tokens.weight" in moved and "model.norm.weight" in moved
    assert any(n.endswith(".B") for n in moved)
    assert "lm_head.weight" not in moved


def test_other_architectures_fail_clearly():
    with pytest.raises(ValueError, match="Llama-architecture"):
        apply_method(tiny_bert(), "longlora", max_length=32)
