"""Memory of the selective and sparse methods against full fine-tuning, on MiniLM (6 blocks).

Every configuration runs in a fresh subprocess (no run inherits another's freed memory) through
the harness's own training loop (`harness.train.Trainer`) on the same fixed batch (16 sequences of
64 tokens, no padding, so every step has the same shape). The loop's `PeakMemory` resets the
kernel's high-water mark (``/proc/self/clear_refs`` <- 5) after the optimizer is built and reads
``VmHWM`` after the last step: weights, gradients, optimizer state, activations.

Data-driven selections are shortened to keep the script within a few minutes on 2 CPU cores
(``fisher_samples`` 64, NeFT ``probe_steps`` 4): that changes which entries are picked, not how
many, so the memory figures are those of the default budgets.

    python benchmarks/bench_selective.py [--steps 4] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    "full": {},
    "lisa": {"gamma": 2, "interval": 20},
    "sparse_fisher": {"fisher_samples": 64},
    "neft": {"probe_steps": 4},
    "bitfit": {},
}
BATCH, LENGTH = 16, 64


def worker(method: str, steps: int, threads: int) -> dict[str, Any]:
    import torch

    from harness.config import RunConfig, TrainConfig
    from harness.measure import count_parameters
    from harness.models import load_model
    from harness.plugins import get_method, make_manager
    from harness.state import TrainState
    from harness.train import Trainer, attach_probes, set_seed

    torch.set_num_threads(threads)
    set_seed(0)
    loaded = load_model("minilm", "sequence-classification", num_labels=2)
    model = loaded.model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, loaded.model.config.vocab_size, (BATCH, LENGTH), generator=g)
    labels = torch.randint(0, 2, (BATCH,), generator=g)
    # Exactly `steps` batches of the same 16 rows (shuffled within the epoch; same shapes).
    rows = [{"input_ids": ids[i % BATCH].tolist(), "attention_mask": [1] * LENGTH,
             "labels": int(labels[i % BATCH])} for i in range(BATCH * steps)]

    def collate(rs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {k: torch.tensor([r[k] for r in rs]) for k in rs[0]}

    cls = get_method(method)
    params = {**cls.defaults, **CONFIGS[method]}
    config = RunConfig(method=method, task="bench", train=TrainConfig(
        batch_size=BATCH, max_steps=steps, lr=1e-4, weight_decay=0.01, warmup_ratio=0.0),
        method_params=params)
    ctx = TrainState(config=config, device=torch.device("cpu"), targets=[],
                     head_names=loaded.head_names, model_type=loaded.model_type)
    pm = make_manager(cls(params))
    attach_probes(ctx, rows[:BATCH * 4], collate)
    t0 = time.perf_counter()
    replaced = pm.hook.inject(model=model, ctx=ctx)
    model = replaced if replaced is not None else model
    for name, p in model.named_parameters():
        if ctx.is_head(name):
            p.requires_grad_(True)
    select_s = time.perf_counter() - t0
    counted = count_parameters(model, ctx.is_head)
    counted.update(pm.hook.count_trainable(model=model, ctx=ctx) or {})
    model.train()
    out = Trainer(model, pm, ctx, rows, collate).fit()
    return {"method": method, "peak": out["memory"]["peak_bytes"],
            "baseline": out["memory"]["baseline_bytes"], "kind": out["memory"]["kind"],
            "opt_state": out["memory"]["optimizer_state_bytes"],
            "opt_state_if_sparse": ctx.extras.get("optimizer_state_bytes_if_sparse"),
            "trainable": counted["method"], "total": counted["total"],
            "step_ms": out["throughput"]["step_time_ms"], "select_s": select_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.threads)))
        return
    results = {}
    for method in CONFIGS:
        proc = subprocess.run([sys.executable, __file__, "--worker", method, "--steps",
                               str(args.steps), "--threads", str(args.threads)],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])

    mib = 1024 * 1024
    print(f"MiniLM-L6 (6 blocks), batch {BATCH} x {LENGTH} tokens, {args.steps} AdamW steps, "
          f"CPU, {args.threads} thread(s); peak = VmHWM during training ({results['full']['kind']})")
    print(f"{'method':<14}{'backbone trainable':>19}{'peak MiB':>10}{'start MiB':>10}"
          f"{'peak-start':>11}{'opt state MiB':>14}{'if sparse MiB':>14}{'step ms':>9}{'select s':>9}")
    for m, r in results.items():
        sparse = "" if r["opt_state_if_sparse"] is None else f"{r['opt_state_if_sparse'] / mib:.1f}"
        print(f"{m:<14}{r['trainable']:>11,} ({100 * r['trainable'] / r['total']:4.1f}%)"
              f"{r['peak'] / mib:>10.1f}{r['baseline'] / mib:>10.1f}"
              f"{(r['peak'] - r['baseline']) / mib:>11.1f}{r['opt_state'] / mib:>14.1f}{sparse:>14}"
              f"{r['step_ms']:>9.0f}{r['select_s']:>9.1f}")
    full, lisa = results["full"], results["lisa"]
    verdict = "below" if lisa["peak"] < full["peak"] else "NOT below"
    print(f"LISA (gamma 2 of 6) peak {lisa['peak'] / mib:.1f} MiB is {verdict} full fine-tuning's "
          f"{full['peak'] / mib:.1f} MiB ({(full['peak'] - lisa['peak']) / mib:+.1f} MiB saved)")


if __name__ == "__main__":
    main()
