"""Our LoRA against Hugging Face PEFT's, and the harness loop against a bare PyTorch loop.

Same model (MiniLM by default), same batch, same seed, same optimizer (AdamW, clipping 1.0).
Three configurations are timed in one process, interleaved round by round so that machine noise
hits all of them alike:

- ``harness``: our LoRA trained by the harness's own loop (`harness.train.Trainer`, hooks,
  schedule, progress observers off);
- ``bare``: the same LoRA model trained by a minimal PyTorch loop over the same DataLoader;
- ``peft``: PEFT's LoRA (same r, alpha, targets, weights copied in) in the same minimal loop.

Peak memory is measured per configuration in a fresh subprocess (so no configuration inherits
another's allocations): the peak resident set during the timed steps minus the resident set just
before them (the training increment: activations, gradients, optimizer state, temporaries), and
the bytes of tensors autograd saves for backward in one step.

    python benchmarks/bench_lora.py [--steps 8] [--rounds 7] [--batch 32] [--seq 64]

Ratios below 1.0 mean ours is faster / smaller.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))  # tests/helpers
os.environ.setdefault("HARNESS_NO_PROGRESS", "1")

R, ALPHA = 8, 16


def build(kind: str, args: argparse.Namespace) -> tuple[torch.nn.Module, Any, Any]:
    """Model for ``kind`` with identical weights: our LoRA or PEFT's, same init copied across."""
    from harness.lowrank import adapted_modules
    from harness.models import load_model
    from harness.observers import quiet_libraries
    from helpers import apply_method

    quiet_libraries()
    torch.manual_seed(0)
    loaded = load_model(args.model, "sequence-classification", num_labels=2)
    base = loaded.model
    peft_base = copy.deepcopy(base) if kind == "peft" else None
    ours, ctx, pm = apply_method(base, "lora", {"r": R, "alpha": ALPHA, "targets": "qv"},
                                 lr=1e-3, batch_size=args.batch, max_steps=args.steps + args.warmup,
                                 warmup_ratio=0.0, weight_decay=0.01, max_grad_norm=1.0)
    ctx.head_names = loaded.head_names
    if kind != "peft":
        return ours, ctx, pm
    import peft

    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["query", "value"],
                          lora_dropout=0.0, task_type="SEQ_CLS")
    theirs = peft.get_peft_model(peft_base, cfg)
    mine = dict(adapted_modules(ours))
    with torch.no_grad():
        for name, module in theirs.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                module.lora_A["default"].weight.copy_(mine[name].A)
                module.lora_B["default"].weight.copy_(mine[name].B)
    return theirs, ctx, pm


def rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    n = args.batch * (args.steps + args.warmup)
    ids = torch.randint(1000, 30000, (n, args.seq), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    return [{"input_ids": ids[i].tolist(), "attention_mask": [1] * args.seq,
             "token_type_ids": [0] * args.seq, "labels": int(labels[i])} for i in range(n)]


def collate(rs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([r[k] for r in rs]) for k in rs[0]}


def bare_loop(model: torch.nn.Module, data: list[dict], args: argparse.Namespace,
              on_start=None) -> float:
    """Seconds per step over the timed steps of a minimal loop (same loader, optimizer, clipping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    model.train()
    t0 = None
    for i, batch in enumerate(loader):
        if i == args.warmup:
            if on_start:
                on_start()
            t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / args.steps


def harness_loop(model, ctx, pm, data, args, on_start=None) -> float:
    from harness.hookspecs import hookimpl
    from harness.train import Trainer

    class Clock:  # an observer: starts the clock after the warm-up steps
        def __init__(self):
            self.t0 = None

        @hookimpl
        def on_step(self, model, ctx):
            if ctx.step == args.warmup:
                if on_start:
                    on_start()
                self.t0 = time.perf_counter()

    clock = Clock()
    pm.register(clock)
    model.train()
    Trainer(model, pm, ctx, data, collate).fit()
    seconds = time.perf_counter() - clock.t0
    pm.unregister(clock)
    return seconds / args.steps


def saved_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes autograd keeps for backward in one forward pass (deduplicated by storage)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except RuntimeError:
            pass
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def measure_memory(kind: str, args: argparse.Namespace) -> dict[str, float]:
    """Runs in a fresh process: training-increment peak RSS and saved activations for ``kind``."""
    from harness.measure import PeakMemory

    model, ctx, pm = build("peft" if kind == "peft" else "ours", args)
    data = rows(args)
    activations = saved_bytes(model, collate(data[: args.batch]))
    mem = PeakMemory(torch.device("cpu"))
    if kind == "harness":
        harness_loop(model, ctx, pm, data, args, on_start=mem.start)
    else:
        bare_loop(model, data, args, on_start=mem.start)
    return {"peak_increment_mib": (mem.peak() - mem.baseline_bytes) / 2**20,
            "peak_mib": mem.peak() / 2**20, "saved_activations_mib": activations / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        print(json.dumps(measure_memory(args.memory_child, args)))
        return

    torch.set_num_threads(torch.get_num_threads())
    print(f"model {args.model}, batch {args.batch} x seq {args.seq}, LoRA r {R} alpha {ALPHA} on "
          f"query,value; {args.steps} timed steps after {args.warmup} warm-up, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    data = rows(args)
    models = {"harness": build("ours", args), "bare": build("ours", args), "peft": build("peft", args)}
    fresh = {k: (copy.deepcopy(m), ctx, pm) for k, (m, ctx, pm) in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.rounds):
        for kind in models:  # interleaved: drift and noise fall on every configuration
            model, ctx, pm = copy.deepcopy(fresh[kind][0]), fresh[kind][1], fresh[kind][2]
            ctx.step = 0
            if kind == "harness":
                times[kind].append(harness_loop(model, ctx, pm, data, args))
            else:
                times[kind].append(bare_loop(model, data, args))
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    best = {k: min(v) * 1000 for k, v in times.items()}  # least disturbed round: robust to noise

    memory = {}
    for kind in models:
        out = subprocess.run([sys.executable, __file__, "--memory-child", kind, "--model", args.model,
                              "--steps", str(args.steps), "--warmup", str(args.warmup),
                              "--batch", str(args.batch), "--seq", str(args.seq)],
                             capture_output=True, text=True, check=True)
        memory[kind] = json.loads(out.stdout.strip().splitlines()[-1])

    print("\nconfiguration   step ms (median)   peak RSS increment MiB   saved activations MiB")
    for kind in models:
        print(f"{kind:14s}  {med[kind]:16.1f}   {memory[kind]['peak_increment_mib']:22.1f}   "
              f"{memory[kind]['saved_activations_mib']:21.1f}")
    print("\nratios (below 1.0: ours is faster or smaller)")
    print(f"  our LoRA / PEFT LoRA, step time (median): {med['bare'] / med['peft']:.3f}"
          f"   (fastest rounds: {best['bare'] / best['peft']:.3f})")
    print(f"  our LoRA / PEFT LoRA, peak RSS increment: "
          f"{memory['bare']['peak_increment_mib'] / memory['peft']['peak_increment_mib']:.3f}")
    print(f"  our LoRA / PEFT LoRA, saved activations:  "
          f"{memory['bare']['saved_activations_mib'] / memory['peft']['saved_activations_mib']:.3f}")
    print(f"  harness loop / bare loop, step time (overhead): {med['harness'] / med['bare']:.3f}"
          f"   (fastest rounds: {best['harness'] / best['bare']:.3f})")
    print("  per-round step ms: " + "; ".join(f"{k} {[round(t * 1000, 1) for t in v]}" for k, v in times.items()))


if __name__ == "__main__":
    main()
