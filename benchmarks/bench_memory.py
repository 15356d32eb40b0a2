"""Measured peak training memory against the analytical estimate, per method (MiniLM, SST-2).

The estimate is the usual formula: weights (every parameter and buffer as stored: fp32, or packed
NF4 for QLoRA's base) + gradients (one per trainable element) + AdamW state (two moments per
trainable element). The measurement is the harness's own (`harness.budget.measure`): the run
prepared as `harness run` prepares it (smoke profile: batch 16, at most 64 tokens), then two real
optimizer steps through the training loop on the longest training rows, with every live tensor
counted (`harness.memory.TensorMemory`); the peak and what it holds at that moment.

ratio = measured / estimate. Above 1: activations and temporaries (the formula's blind spot;
e.g. AdamW's foreach update allocates temporaries as large as the trainable weights, QLoRA
dequantises each weight to fp32 in the forward pass). Below 1 would mean state the formula counts
is not live at the peak (a method's gradients or moments freed before it).

    HARNESS_DATA_DIR=../shared/data python benchmarks/bench_memory.py [--methods full,lora]
        [--batch 16] [--task glue/sst2] [--profile smoke]
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import time

DEFAULT = "full,lora,dora,qlora,lisa,bitfit,vera,prompt_tuning,prefix_tuning"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=DEFAULT)
    ap.add_argument("--task", default="glue/sst2")
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--batch", type=int, default=None, help="micro-batch (default: the profile's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from harness.budget import measure
    from harness.config import resolve
    from harness.memory import CATEGORIES, analytical_estimate
    from harness.observers import quiet_libraries
    from harness.plugins import get_method
    from harness.run import prepare

    torch.set_num_threads(args.threads)
    quiet_libraries()
    mib = 2**20
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        config = resolve(method, args.task, get_method(method).defaults, args.profile, {},
                         device="cpu")
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, memory_budget=None))
        batch = args.batch or config.train.batch_size
        p = prepare(config)  # the estimate reads the prepared model: what the method trains
        est = analytical_estimate(p.model)
        del p
        gc.collect()
        t0 = time.perf_counter()
        got = measure(config, batch, False, prepare)
        seconds = time.perf_counter() - t0
        bd = got["breakdown"]
        rows.append((method, est, got["peak_bytes"], bd, seconds, got.get("probe_rows_length")))
        print(f"{method}: estimate {est['total'] / mib:.1f} MiB, measured {got['peak_bytes'] / mib:.1f} MiB "
              f"({seconds:.1f} s)", flush=True)

    print(f"\n{args.task}, profile {args.profile}, micro-batch {args.batch or 'as profiled'}, "
          f"probe rows of {rows[0][5] if rows else '?'} tokens; MiB; "
          f"estimate = weights + gradients + AdamW state\n")
    short = {"frozen_weights": "frozen", "trainable_weights": "trainable", "buffers": "buffers",
             "gradients": "grads", "optimizer_state": "optim", "activations": "activ+tmp",
             "other": "other"}
    head = ("| method | weights | grads | optim | estimate | measured peak | ratio | "
            + " | ".join(f"at peak: {short[c]}" for c in CATEGORIES) + " |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for method, est, peak, bd, _, _ in rows:
        cells = [method, f"{est['weights'] / mib:.1f}", f"{est['gradients'] / mib:.1f}",
                 f"{est['optimizer_state'] / mib:.1f}", f"{est['total'] / mib:.1f}",
                 f"{peak / mib:.1f}", f"{peak / est['total']:.2f}"]
        cells += [f"{bd[c] / mib:.1f}" for c in CATEGORIES]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
