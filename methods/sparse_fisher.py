"""Sparse fine-tuning with a Fisher-information mask (FISH Mask; Sung et al., 2021, arXiv:2111.09839).

Paper: score every parameter entry by the empirical Fisher information, the squared gradient of
the loss summed over per-example gradients of about 1024 training examples; keep the global
top-k entries over the whole model (0.5% in the paper's GLUE runs) as a fixed mask and train only
those entries, with every gradient multiplied by the mask.

Choices here:
- Scores cover the backbone (every parameter outside the task head, embeddings included); the
  head trains densely as for every method and is not part of the budget. ``density`` (default
  0.005) is the share of backbone entries kept, ``k = round(density * backbone entries)``.
- Per-example gradients are exact: each example of ``ctx.train_batches()`` runs alone (batch of 1,
  padding trimmed), over the first ``fisher_samples`` examples in the data's fixed order (default
  1024, or the whole training set if smaller). Labels are the data's own (empirical Fisher).
  The model is in eval mode while scoring (no dropout noise in the scores).
- The mask is chosen in ``inject`` (the runner provides the probes there), so the trainable count
  is exact: selected entries plus the head.
- Gradients and weight decay are both masked (`methods._masking`): masked entries never move, even
  with AdamW's decoupled decay. Adam keeps dense moments for every tensor holding a selected entry;
  ``extras`` reports that state beside what a sparse optimizer would need.

Merge: identity. The trained model is plain; its dense weights are ``W0 + sparse delta``.
"""
from __future__ import annotations

import heapq
import time
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from harness.state import TrainState
from methods._masking import MaskedMethod

Batch = dict[str, torch.Tensor]


def split_examples(batch: Batch) -> Iterator[Batch]:
    """The examples of a batch one by one, with padding columns removed."""
    n = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    for i in range(n):
        # Non-tensor values (a multitask batch's task name) belong to every example.
        ex = {k: v[i:i + 1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        mask = ex.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            keep = mask[0].bool()
            ex = {k: (v[:, keep] if isinstance(v, torch.Tensor) and v.ndim >= 2
                      and v.shape[:2] == mask.shape else v) for k, v in ex.items()}
        yield ex


def empirical_fisher(model: nn.Module, params: dict[str, nn.Parameter], batches: Iterable[Batch],
                     loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
                     max_examples: int) -> tuple[dict[str, torch.Tensor], int]:
    """Sum over examples of the squared per-example gradient, for each of ``params``.

    Returns the scores (fp32, shaped as the parameters) and how many examples were used.
    """
    was_training = model.training
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    model.eval()
    scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    seen = 0
    try:
        for batch in batches:
            for ex in split_examples(batch):
                if seen >= max_examples:
                    break
                loss = loss_fn(model, ex)
                grads = torch.autograd.grad(loss.float(), list(params.values()), allow_unused=True)
                for s, g in zip(scores.values(), grads):
                    if g is not None:
                        g = g.float()
                        s.addcmul_(g, g)
                seen += 1
            if seen >= max_examples:
                break
    finally:
        for p, r in requires.items():
            p.requires_grad_(r)
        model.train(was_training)
    return scores, seen


def global_topk_masks(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Boolean masks selecting the ``k`` largest entries over all tensors together."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    if not 0 < k <= flat.numel():
        raise ValueError(f"budget k={k} must be between 1 and {flat.numel()} entries")
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start:start + s.numel()].view(s.shape)
        start += s.numel()
    return masks


class SparseFisher(MaskedMethod):
    name = "sparse_fisher"
    summary = "fixed mask of the top-Fisher backbone entries (FISH); only those entries train"
    mergeable = True
    defaults: dict[str, Any] = {"density": 0.005, "fisher_samples": 1024}

    def choose_masks(self, model: nn.Module, ctx: TrainState) -> dict[str, torch.Tensor]:
        density, samples = float(self.params["density"]), int(self.params["fisher_samples"])
        if not 0 < density <= 1 or samples < 1:
            raise ValueError(f"{self.name}: density must be in (0, 1] and fisher_samples >= 1")
        backbone = {n: p for n, p in model.named_parameters() if not ctx.is_head(n)}
        total = sum(p.numel() for p in backbone.values())
        t0 = time.perf_counter()
        scores, used = empirical_fisher(model, backbone, ctx.train_batches(), ctx.compute_loss,
                                        samples)
        k = max(1, round(density * total))
        masks = global_topk_masks(scores, k)
        kept = {n: int(m.sum()) for n, m in masks.items()}
        ctx.extras.update({
            "fisher_examples": used,
            "fisher_seconds": round(time.perf_counter() - t0, 2),
            "budget_entries": k,
            "backbone_entries": total,
            # Where the budget went: the five tensors holding most selected entries.
            "top_tensors": dict(heapq.nlargest(5, kept.items(), key=lambda x: x[1])),
        })
        return masks
