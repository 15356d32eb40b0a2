"""Step time and memory of LoRA+, DoRA, LoRA-FA and VeRA against our LoRA and Hugging Face PEFT.

One process, one model (MiniLM, the harness's default), one fixed random batch and seed for every
configuration. Per configuration it reports:

- step time: forward + backward + AdamW step, median of ``--steps`` after ``--warmup`` steps,
  configurations interleaved step by step (fair on a shared, busy CPU);
- saved activations: bytes autograd keeps for backward during one training forward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` and deduplicated by storage (weights excluded);
- train state: saved activations + gradients + AdamW moments of the trainable parameters, the
  part of peak memory that differs between methods (the frozen weights are common to all).

Process RSS is not reported: in one process the allocator's caching makes it meaningless per
configuration (the harness itself measures a run's peak RSS in a fresh process).

The second table repeats the activation count for LoRA and LoRA-FA on every attention and MLP
linear at sequence length 256, where activations dominate memory.

    python benchmarks/bench_lora_family_a.py [--batch 16 --seq 64 --steps 5 --warmup 1]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from harness.config import RunConfig, TrainConfig
from harness.models import load_model
from harness.plugins import get_method, make_manager
from harness.state import TrainState
from harness.targets import resolve_targets

MB = 2 ** 20


def ours(method: str, params: dict[str, Any] | None = None) -> Callable[[nn.Module, Any], tuple]:
    """A builder that applies our plugin as the core does (inject, head unfrozen, param_groups)."""
    def build(model: nn.Module, loaded: Any) -> tuple[nn.Module, list[dict[str, Any]]]:
        cls = get_method(method)
        mp = {**cls.defaults, **(params or {})}
        ctx = TrainState(config=RunConfig(method=method, task="bench", train=TrainConfig(lr=1e-4),
                                          method_params=mp),
                         device=torch.device("cpu"), targets=resolve_targets(loaded.model_type, mp["targets"]),
                         head_names=loaded.head_names, model_type=loaded.model_type)
        pm = make_manager(cls(mp))
        model = pm.hook.inject(model=model, ctx=ctx) or model
        for name, p in model.named_parameters():
            if ctx.is_head(name):
                p.requires_grad_(True)
        groups = pm.hook.param_groups(model=model, ctx=ctx) or \
            [{"params": [p for p in model.parameters() if p.requires_grad]}]
        return model, groups
    return build


def peft_builder(kind: str, targets: list[str], **cfg: Any) -> Callable[[nn.Module, Any], tuple]:
    def build(model: nn.Module, loaded: Any) -> tuple[nn.Module, Any]:
        import peft

        if kind == "vera":
            config = peft.VeraConfig(target_modules=targets, task_type="SEQ_CLS", **cfg)
        else:
            config = peft.LoraConfig(target_modules=targets, task_type="SEQ_CLS", **cfg)
        model = peft.get_peft_model(model, config)
        if kind == "lora_plus":
            from peft.optimizers import create_loraplus_optimizer
            return model, create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16)
        if kind == "lora_fa":  # freezes lora_A; its optimizer adds the v2 gradient correction
            from peft.optimizers import create_lorafa_optimizer
            return model, create_lorafa_optimizer(model, r=cfg["r"], lora_alpha=cfg["lora_alpha"], lr=1e-4)
        return model, [{"params": [p for p in model.parameters() if p.requires_grad]}]
    return build


def saved_activation_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes kept for backward by one training forward; weights and buffers excluded, by storage."""
    frozen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in frozen:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss  # what is saved is fixed by the forward; no backward needed
    del loss
    return sum(seen.values())


class Subject:
    """One configuration, built once; `step` runs one timed training step."""

    def __init__(self, base: nn.Module, loaded: Any, build: Callable, batch: dict[str, torch.Tensor]):
        torch.manual_seed(0)
        self.model, groups = build(copy.deepcopy(base), loaded)
        self.model.train()
        self.opt = groups if isinstance(groups, torch.optim.Optimizer) else torch.optim.AdamW(groups, lr=1e-4)
        self.batch = batch
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in trainable)
        self.act = saved_activation_bytes(self.model, batch)
        # grad + AdamW's two moments per trainable element, plus the saved activations
        self.state = self.act + 3 * sum(p.numel() * p.element_size() for p in trainable)
        self.times: list[float] = []

    def step(self, record: bool) -> None:
        t0 = time.perf_counter()
        self.model(**self.batch).loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if record:
            self.times.append(time.perf_counter() - t0)

    @property
    def ms(self) -> float:
        return 1000 * statistics.median(self.times)


def fixed_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, vocab, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch,), generator=g)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--long-seq", type=int, default=256)
    ap.add_argument("--long-batch", type=int, default=8)
    args = ap.parse_args()

    loaded = load_model("minilm", "sequence-classification", num_labels=2)
    base = loaded.model
    qv = ["query", "value"]
    vera_r = get_method("vera").defaults["r"]
    # (label, our method it compares with, builder); PEFT rows are the reference for their method.
    configs = [
        ("ours lora", "lora", ours("lora")),
        ("ours lora_plus", "lora_plus", ours("lora_plus")),
        ("ours dora", "dora", ours("dora")),
        ("ours lora_fa", "lora_fa", ours("lora_fa")),
        ("ours vera", "vera", ours("vera")),
        ("peft lora", "lora", peft_builder("lora", qv, r=8, lora_alpha=16)),
        ("peft lora_plus", "lora_plus", peft_builder("lora_plus", qv, r=8, lora_alpha=16)),
        ("peft dora", "dora", peft_builder("lora", qv, r=8, lora_alpha=16, use_dora=True)),
        ("peft lora_fa", "lora_fa", peft_builder("lora_fa", qv, r=8, lora_alpha=16)),
        ("peft vera", "vera", peft_builder("vera", qv, r=vera_r, projection_prng_key=0)),
    ]
    torch.manual_seed(0)
    batch = fixed_batch(args.batch, args.seq, base.config.vocab_size)
    print(f"model minilm ({loaded.model_type}, hidden {base.config.hidden_size}), batch {args.batch} x "
          f"seq {args.seq}, targets query+value, r 8 (VeRA r {vera_r}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; step = forward+backward+AdamW, median of {args.steps} "
          f"after {args.warmup} warm-up")
    t_start = time.perf_counter()
    results = {label: Subject(base, loaded, build, batch) for label, _, build in configs}
    # Round-robin: every round runs one step of each configuration, so a busy shared CPU slows
    # them alike and the medians stay comparable.
    for i in range(args.warmup + args.steps):
        for subject in results.values():
            subject.step(record=i >= args.warmup)
    ref = results["ours lora"]
    head = (f"{'method':<16}{'trainable':>10}{'step ms':>9}{'x our lora':>11}{'x peft same':>12}"
            f"{'saved act MB':>13}{'x our lora':>11}{'x peft same':>12}{'train state MB':>15}")
    print(head)
    print("-" * len(head))
    for label, method, _ in configs:
        r = results[label]
        peft_same = results.get(f"peft {method}")
        vs_peft_ms = f"{r.ms / peft_same.ms:.2f}" if peft_same and label.startswith("ours") else "-"
        vs_peft_act = f"{r.act / peft_same.act:.2f}" if peft_same and label.startswith("ours") else "-"
        print(f"{label:<16}{r.trainable:>10,}{r.ms:>9.1f}{r.ms / ref.ms:>11.2f}{vs_peft_ms:>12}"
              f"{r.act / MB:>13.1f}{r.act / ref.act:>11.2f}{vs_peft_act:>12}{r.state / MB:>15.1f}")

    print("train state = saved activations + gradient + AdamW moments of the trainable parameters; "
          "peft lora_fa uses PEFT's create_lorafa_optimizer, whose step adds LoRA-FA v2's gradient "
          "correction (ours: plain AdamW)")

    # Activation memory where it dominates: every attention and MLP linear, longer sequences.
    long_batch = fixed_batch(args.long_batch, args.long_seq, base.config.vocab_size, seed=1)
    print(f"\nsaved activations, batch {args.long_batch} x seq {args.long_seq}, targets all "
          f"(attention + MLP linears), r 8:")
    acts = {}
    for method in ("lora", "lora_fa"):
        torch.manual_seed(0)
        model, _ = ours(method, {"targets": "all"})(copy.deepcopy(base), loaded)
        model.train()
        acts[method] = saved_activation_bytes(model, long_batch)
        print(f"  ours {method:<8}{acts[method] / MB:>9.1f} MB")
    print(f"  LoRA-FA / LoRA = {acts['lora_fa'] / acts['lora']:.2f} "
          f"({(acts['lora'] - acts['lora_fa']) / MB:.1f} MB less)")
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
