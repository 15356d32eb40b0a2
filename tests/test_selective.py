"""Selective and sparse methods: LISA, Fisher-mask sparse fine-tuning, NeFT, BitFit."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from harness.config import RunConfig, TrainConfig
from harness.hookspecs import hookimpl
from harness.measure import optimizer_state_bytes
from harness.state import TrainState
from harness.train import Trainer, attach_probes
from helpers import apply_method, batch, collate, make_ctx, rows, snapshot, tiny_bert, tiny_gpt2, tiny_llama
from methods._masking import MaskedTraining
from methods.lisa import find_blocks
from methods.neft import lora_budget, neuron_weights, select_rows
from methods.sparse_fisher import empirical_fisher, global_topk_masks, split_examples


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP threads that
    spin against other processes make these tests 10x slower; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def bert4(seed: int = 0) -> nn.Module:
    """A tiny BERT with 4 blocks, so that LISA has blocks to leave out."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def apply_with_data(model: nn.Module, method: str, params: dict[str, Any] | None = None,
                    n_rows: int = 32, observers: list[Any] = (), **train: Any):
    """helpers.apply_method with training rows attached, which the data-driven selections need."""
    train = {"batch_size": 8, "lr": 1e-2, "warmup_ratio": 0.0, **train}
    data = rows(n_rows)
    model, ctx, pm = apply_method(model, method, params, observers, data=data, **train)
    return model, ctx, pm, data


def fit(model: nn.Module, ctx: TrainState, pm: Any, data: list[dict]) -> dict[str, Any]:
    model.train()
    return Trainer(model, pm, ctx, data, collate).fit()


# -- masked training (shared by sparse_fisher and neft) ---------------------------------------

@pytest.mark.parametrize("method,arch,params", [
    ("sparse_fisher", "bert", {"density": 0.02}),
    ("neft", "bert", {}),
    ("neft", "gpt2", {}),  # Conv1D: neurons are columns of the stored weight
])
def test_masked_entries_never_move_under_weight_decay(method, arch, params):
    base = {"bert": tiny_bert, "gpt2": tiny_gpt2}[arch]()
    original = snapshot(base)
    model, ctx, pm, data = apply_with_data(base, method, params, weight_decay=0.1, max_steps=6)
    before = snapshot(model)
    for k, v in before.items():  # the selection probes left the weights as they were
        assert torch.equal(v, original[k]), k
    masks = pm.get_plugin("method").masking.masks
    assert masks, "nothing selected"
    fit(model, ctx, pm, data)
    selected = moved_selected = 0
    for name, p in model.named_parameters():
        now, was = p.detach(), before[name]
        if name in masks:
            m = masks[name]
            assert torch.equal(now[~m], was[~m]), f"masked entries of {name} moved"
            selected += int(m.sum())
            moved_selected += int((now[m] != was[m]).sum())
        elif ctx.is_head(name):
            assert not torch.equal(now, was), f"head {name} did not train"
        else:
            assert torch.equal(now, was), f"frozen {name} moved"
    assert moved_selected >= 0.9 * selected, f"only {moved_selected}/{selected} selected moved"


def _stub_ctx(**train: Any) -> TrainState:
    return TrainState(config=RunConfig(method="m", task="t", train=TrainConfig(**train)),
                      device=torch.device("cpu"), targets=[], head_names=[], model_type="none")


def test_masked_decay_is_adamw_decay_on_selected_entries_only():
    torch.manual_seed(0)
    lr, wd = 0.1, 0.5
    ours, ref = nn.Linear(5, 4, bias=False), nn.Linear(5, 4, bias=False)
    ref.load_state_dict(ours.state_dict())
    w0 = ours.weight.detach().clone()
    mask = torch.rand(4, 5) < 0.4
    ctx = _stub_ctx(lr=lr, weight_decay=wd)
    masking = MaskedTraining()
    masking.apply(ours, {"weight": mask}, ctx)
    opt = torch.optim.AdamW(masking.param_groups(ours, ctx), lr=lr)
    masking.attach(opt)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=wd)
    x = torch.randn(3, 5)
    for _ in range(3):
        (ours(x) ** 2).sum().backward()
        (ref(x) ** 2).sum().backward()
        ref.weight.grad.mul_(mask)  # the reference sees the same masked gradient
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()
        with torch.no_grad():
            # Plain AdamW decays the masked entries although their gradient is 0; put them back
            # so both runs see the same function and the selected entries can be compared.
            assert not torch.equal(ref.weight[~mask], w0[~mask])
            ref.weight[~mask] = w0[~mask]
    w = ours.weight.detach()
    assert torch.equal(w[~mask], w0[~mask])                           # masked: untouched
    torch.testing.assert_close(w[mask], ref.weight.detach()[mask], rtol=0, atol=1e-7)
    assert not torch.equal(w[mask], w0[mask])


def test_masked_count_is_selected_entries_plus_head():
    model, ctx, pm, _ = apply_with_data(tiny_bert(), "sparse_fisher", {"density": 0.01})
    backbone = sum(p.numel() for n, p in model.named_parameters() if not ctx.is_head(n))
    head = sum(p.numel() for n, p in model.named_parameters() if ctx.is_head(n))
    counted = pm.hook.count_trainable(model=model, ctx=ctx)
    assert counted == {"method": round(0.01 * backbone), "head": head}
    # what requires_grad alone would count is much more (whole tensors)
    dense = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not ctx.is_head(n))
    assert dense > 2 * counted["method"]


# -- Fisher scores and top-k ------------------------------------------------------------------

class _Dot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))


def test_fisher_sums_per_example_squared_gradients():
    # loss = w . x, so the per-example gradient is x. Entry 0's gradients cancel in the batch
    # mean (+1, -1) but its Fisher is the largest: only per-example squares pick it.
    model = _Dot()
    x = torch.tensor([[1.0, 0.5, 0.1], [-1.0, 0.5, 0.1]])
    loss = lambda m, b: (m.w * b["x"]).sum()  # noqa: E731
    scores, used = empirical_fisher(model, {"w": model.w}, [{"x": x}], loss, max_examples=1024)
    assert used == 2
    torch.testing.assert_close(scores["w"], torch.tensor([2.0, 0.5, 0.02]))
    assert global_topk_masks(scores, 1)["w"].tolist() == [True, False, False]
    batch_grad = x.mean(0).abs()
    assert batch_grad.argmax() != 0  # a batch-gradient score would have chosen otherwise
    first, used = empirical_fisher(model, {"w": model.w}, [{"x": x}], loss, max_examples=1)
    assert used == 1
    torch.testing.assert_close(first["w"], torch.tensor([1.0, 0.25, 0.01]))


def test_global_topk_picks_largest_scores_across_tensors():
    scores = {"a": torch.tensor([5.0, 1.0, 3.0]), "b": torch.tensor([[4.0, 0.0], [2.0, 6.0]])}
    masks = global_topk_masks(scores, 3)
    assert masks["a"].tolist() == [True, False, False]
    assert masks["b"].tolist() == [[True, False], [False, True]]
    with pytest.raises(ValueError, match="budget"):
        global_topk_masks(scores, 8)


def test_fisher_mask_matches_topk_of_recomputed_scores():
    """End to end: the mask the method keeps is the top-k of the Fisher over its examples."""
    base = tiny_bert()
    reference = {n: p for n, p in base.named_parameters() if not n.startswith("classifier")}
    ctx = make_ctx(base, "sparse_fisher", batch_size=8)
    data = rows(16)
    attach_probes(ctx, data, collate)
    scores, used = empirical_fisher(base, reference, ctx.train_batches(), ctx.compute_loss, 10)
    assert used == 10
    model, ctx, pm, _ = apply_with_data(base, "sparse_fisher",
                                        {"density": 0.01, "fisher_samples": 10}, n_rows=16)
    masks = pm.get_plugin("method").masking.masks
    k = sum(int(m.sum()) for m in masks.values())
    threshold = torch.cat([s.reshape(-1) for s in scores.values()]).topk(k).values.min()
    for name, m in masks.items():
        assert bool((scores[name][m] >= threshold).all()), name
    assert ctx.extras["fisher_examples"] == 10


def test_split_examples_trims_padding():
    b = batch(n=3, length=6)  # example 0 is padded after position 3
    exs = list(split_examples(b))
    assert [e["input_ids"].shape for e in exs] == [(1, 3), (1, 6), (1, 6)]
    assert exs[0]["labels"].shape == (1,)


# -- NeFT -------------------------------------------------------------------------------------

def test_neft_picks_lowest_similarity_rows_until_budget():
    sims = {"a": torch.tensor([0.9, 0.1, 0.5]), "b": torch.tensor([0.2, 0.95])}
    rows_ = select_rows(sims, {"a": 4, "b": 10}, budget=15)
    # a1 (0.1, 4 entries) then b0 (0.2, 10): 14; a2 (0.5) would make 18 > 15: stop.
    assert {n: i.tolist() for n, i in rows_.items()} == {"a": [1], "b": [0]}


def test_neft_budget_is_lora_count_and_counts_rows():
    lora_model, _, _ = apply_method(tiny_bert(), "lora")
    lora_n = sum(p.numel() for n, p in lora_model.named_parameters() if n.endswith((".A", ".B")))
    model, ctx, pm, _ = apply_with_data(tiny_bert(), "neft")
    assert lora_budget(model, ctx, 8, "qv") == lora_n == 2 * 2 * 8 * (32 + 32)
    masks = pm.get_plugin("method").masking.masks
    counted = pm.hook.count_trainable(model=model, ctx=ctx)
    for name, m in masks.items():  # whole rows: every selected row is all True
        rows_on = m.any(dim=1)
        assert torch.equal(m, rows_on[:, None].expand_as(m)), name
    assert counted["method"] == sum(int(m.sum()) for m in masks.values())
    # Stops at the first row that would exceed the budget; the longest row has 64 entries.
    assert lora_n - 64 < counted["method"] <= lora_n
    # Candidates are the blocks' linears: never the pooler (it sits under the fresh head and
    # would take the whole budget) nor the head.
    assert masks and all(".encoder.layer." in n for n in masks), sorted(masks)
    assert not any("pooler" in n for n in neuron_weights(model, ctx))


# -- LISA -------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,expected", [(tiny_bert, "bert.encoder.layer"),
                                           (tiny_gpt2, "transformer.h"),
                                           (tiny_llama, "model.layers")])
def test_lisa_finds_transformer_blocks(make, expected):
    assert find_blocks(make())[0] == expected


class _Watch:
    """Observer: at every step (before LISA may switch) record what moved and the optimizer."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList):
        self.model, self.blocks = model, blocks
        self.last = snapshot(model)
        self.steps: list[dict[str, Any]] = []

    @hookimpl(tryfirst=True)
    def on_step(self, model: nn.Module, ctx: TrainState) -> None:
        now = snapshot(model)
        moved_blocks = {i for i, b in enumerate(self.blocks)
                        for n, _ in b.named_parameters()
                        if not torch.equal(now[self._name(i, n)], self.last[self._name(i, n)])}
        self.steps.append({
            "step": ctx.step,
            "active": list(ctx.extras["active_blocks"][-1]["blocks"]),
            "moved_blocks": moved_blocks,
            "embeddings_moved": not torch.equal(now["bert.embeddings.word_embeddings.weight"],
                                                self.last["bert.embeddings.word_embeddings.weight"]),
            "opt_params": {p for g in ctx.optimizer.param_groups for p in g["params"]},
            "state_params": set(ctx.optimizer.state),
            "state_bytes": optimizer_state_bytes(ctx.optimizer),
            "stale_grads": any(p.grad is not None for i, b in enumerate(self.blocks)
                               if i not in ctx.extras["active_blocks"][-1]["blocks"]
                               for p in b.parameters()),
        })
        self.last = now

    @staticmethod
    def _name(i: int, n: str) -> str:
        return f"bert.encoder.layer.{i}.{n}"


def test_lisa_switches_on_schedule_trains_only_active_blocks_and_frees_state():
    model = bert4()
    blocks = model.bert.encoder.layer
    watch = _Watch(model, blocks)
    model, ctx, pm, data = apply_with_data(model, "lisa", {"interval": 3, "gamma": 1},
                                           n_rows=64, observers=[watch], max_steps=10,
                                           weight_decay=0.1)
    watch.last = snapshot(model)
    result = fit(model, ctx, pm, data)
    schedule = ctx.extras["active_blocks"]
    assert [s["from_step"] for s in schedule] == [0, 3, 6, 9]
    assert result["optimizer_rebuilds"] == ctx.rebuilds == 3
    assert len({tuple(s["blocks"]) for s in schedule}) > 1, "seed never changed the block"
    block_params = [set(b.parameters()) for b in blocks]
    all_block = set().union(*block_params)
    always_on = {p for p in model.parameters() if p not in all_block}
    full_bytes = sum(2 * p.numel() * p.element_size() + 4 for p in model.parameters())
    for s in watch.steps:
        expected = always_on.union(*(block_params[i] for i in s["active"]))
        assert s["moved_blocks"] == set(s["active"]), s["step"]   # inactive blocks did not move
        assert s["embeddings_moved"]
        assert s["opt_params"] == expected, s["step"]              # optimizer holds the active set
        assert s["state_params"] == expected, s["step"]            # and state of nothing else
        # AdamW: two moments per element plus a 4-byte step counter per tensor
        assert s["state_bytes"] == sum(2 * p.numel() * p.element_size() + 4 for p in expected)
        assert s["state_bytes"] < full_bytes
        assert not s["stale_grads"], s["step"]  # grads of blocks that left were dropped


def test_lisa_decoder_trains_only_active_blocks():
    base = tiny_llama()
    before = snapshot(base)
    model, ctx, pm, data = apply_with_data(base, "lisa", {"interval": 100, "gamma": 1},
                                           max_steps=2)
    fit(model, ctx, pm, data)
    active = ctx.extras["active_blocks"][0]["blocks"]
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    moved_blocks = {int(n.split(".")[2]) for n in moved if n.startswith("model.layers.")}
    assert moved_blocks == set(active)
    assert "model.embed_tokens.weight" in moved and "score.weight" in moved


def test_lisa_refuses_bad_gamma():
    with pytest.raises(ValueError, match="gamma"):
        apply_with_data(tiny_bert(), "lisa", {"gamma": 3})


# -- BitFit -----------------------------------------------------------------------------------

def test_bitfit_trains_biases_and_head_only():
    base = tiny_bert()
    before = snapshot(base)
    model, ctx, pm, data = apply_with_data(base, "bitfit", max_steps=3)
    bias = sum(p.numel() for n, p in model.named_parameters()
               if n.endswith("bias") and not ctx.is_head(n))
    assert pm.hook.count_trainable(model=model, ctx=ctx) is None  # the default count is exact
    assert sum(p.numel() for n, p in model.named_parameters()
               if p.requires_grad and not ctx.is_head(n)) == bias
    fit(model, ctx, pm, data)
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert moved and all(n.endswith("bias") or ctx.is_head(n) for n in moved)
    assert any(n.startswith("bert.") for n in moved)


def test_bitfit_refuses_model_without_biases():
    with pytest.raises(ValueError, match="no bias"):
        apply_with_data(tiny_llama(), "bitfit")


# -- merge ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,params", [("lisa", {"interval": 2, "gamma": 1}),
                                           ("sparse_fisher", {"density": 0.02}),
                                           ("neft", {}), ("bitfit", {})])
def test_merged_model_equals_trained_model(method, params):
    base = tiny_bert()
    keys = set(base.state_dict())
    model, ctx, pm, data = apply_with_data(base, method, params, max_steps=4, weight_decay=0.1)
    fit(model, ctx, pm, data)
    model.eval()
    b = batch()
    with torch.no_grad():
        trained = model(**b).logits
    merged = pm.hook.merge(model=model, ctx=ctx)
    assert set(merged.state_dict()) == keys
    assert all(not p._backward_hooks for p in merged.parameters()), "gradient hooks left behind"
    with torch.no_grad():
        torch.testing.assert_close(merged(**b).logits, trained, rtol=0, atol=0)
