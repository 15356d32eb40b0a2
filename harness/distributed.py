"""Data-parallel runs: one run trained by several processes (``harness run --processes N``).

The launcher is Hugging Face ``accelerate`` (``accelerate launch --multi_gpu --num_processes N``,
torchrun underneath); `harness.worker` starts it for a run whose config has ``processes > 1`` and
each process it starts joins the process group here (NCCL on CUDA, one device per process; gloo on
the CPU). The training loop (`harness.train.Trainer`) stays method-agnostic:

- **Batches**: every process draws the same batches (same seeded order) and trains on its own
  contiguous share of each one, so the configured ``batch_size`` stays the global batch: the same
  optimization, steps and schedule as one process.
- **Gradients**: each process scales its loss by its share of the batch's rows and the gradients
  are summed over the processes before clipping (one flat all-reduce per dtype), which gives the
  batch's mean-loss gradient (exact for per-example mean losses). A parameter whose gradient is
  missing on some processes (a task head another process's batch did not touch) gets the others';
  one missing everywhere stays without a gradient, as in one process. No ``DistributedDataParallel``
  wrapper: methods keep the model they built, and may freeze, unfreeze and rebuild the optimizer.
- **Randomness**: forward and backward run under a forked generator seeded per process and step,
  so dropout differs between processes while the global generator, which methods' hooks draw from
  (random layer or block picks), advances identically everywhere.
- **Consistency**: after every step the processes compare their trainable parameter count; a method
  whose hooks made different choices on different processes (from its own share of the data) stops
  the run with an error saying so, instead of training diverged copies.
- **Measurement**: throughput is overall (rows and tokens summed over the processes, over the
  slowest process's training time); the training loop's peak memory is kept per device
  (``memory.train_per_device``), its maximum as ``memory.train_peak_bytes``. The memory budget's
  probe steps run data-parallel as well, so ``memory.peak_bytes`` is one device's share.
- **Records**: process 0 evaluates, merges and writes the record; a process that fails writes a
  ``failed`` record (the launcher then stops the others).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

WORLD_ENV = "WORLD_SIZE"


@dataclass
class Group:
    rank: int
    world_size: int
    backend: str
    device: torch.device


def launched() -> bool:
    """This process was started by a distributed launcher for more than one process."""
    return int(os.environ.get(WORLD_ENV, "1")) > 1


def group() -> Group | None:
    """The data-parallel group of this process, or None when it trains alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Group(dist.get_rank(), dist.get_world_size(), backend, device)


def is_main() -> bool:
    g = group()
    return g is None or g.rank == 0


def init(device: str) -> str:
    """Join the launcher's process group; returns the device this process trains on."""
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        index = local % torch.cuda.device_count()
        torch.cuda.set_device(index)
        device = f"cuda:{index}"
    else:
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: dict[str, Any], g: Group) -> tuple[dict[str, Any], int, int]:
    """This process's contiguous share of a collated batch: (share, its rows, the batch's rows).
    Values that are not per-row tensors (a multitask batch's task name) are kept as they are."""
    n = int(batch["labels"].shape[0])
    base, extra = divmod(n, g.world_size)
    start = g.rank * base + min(g.rank, extra)
    stop = start + base + (1 if g.rank < extra else 0)
    out = {k: v[start:stop] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n else v
           for k, v in batch.items()}
    return out, stop - start, n


def all_reduce_grads(params: list[torch.nn.Parameter], g: Group) -> None:
    """Sum gradients over the processes (each already scaled by its share of the batch)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    if not params:
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=g.device)
    dist.all_reduce(present)
    needed = [p for p, k in zip(params, present.tolist()) if k > 0]
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
    for p in needed:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for (_, device), ps in buckets.items():
        grads = [p.grad for p in ps]
        flat = _flatten_dense_tensors(grads)
        moved = flat.to(g.device)
        dist.all_reduce(moved)
        for grad, synced in zip(grads, _unflatten_dense_tensors(moved.to(device), grads)):
            grad.copy_(synced)


def all_reduce_sum(t: torch.Tensor, g: Group) -> torch.Tensor:
    import torch.distributed as dist

    moved = t.detach().clone().to(g.device)
    dist.all_reduce(moved)
    return moved.to(t.device)


def check_same(value: int, what: str, g: Group) -> None:
    """Stop every process together when ``value`` differs between them."""
    import torch.distributed as dist

    t = torch.tensor([value, -value], dtype=torch.int64, device=g.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    hi, lo = int(t[0]), -int(t[1])
    if hi != lo:
        raise RuntimeError(f"data-parallel processes disagree on {what} ({lo} vs {hi}): the method's "
                           f"hooks made different choices on different processes' data; it cannot "
                           f"run with --processes > 1")


def gather(obj: Any, g: Group) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * g.world_size
    dist.all_gather_object(out, obj)
    return out


def rng_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The forked generator's seed for one process's forward and backward of one micro-batch."""
    return (seed * 1_000_003 + step * 10_007 + micro * 101 + rank) % (2**63 - 1)


def combine(result: dict[str, Any], local: dict[str, Any], g: Group) -> dict[str, Any]:
    """The loop's result over every process: rows and tokens summed, time the slowest process's,
    the training loop's peak memory per device (and the largest)."""
    everyone = gather(local, g)
    thr = dict(result["throughput"])
    seconds = max(x["seconds"] for x in everyone)
    samples = sum(x["samples"] for x in everyone)
    tokens = sum(x["tokens"] for x in everyone)
    thr.update(train_seconds=seconds, samples=samples, tokens=tokens, samples_per_s=samples / seconds,
               tokens_per_s=tokens / seconds, step_time_ms=1000 * seconds / max(1, thr["steps"]))
    mem = dict(result["memory"])
    mem["per_device"] = [{k: x[k] for k in ("rank", "device", "peak_bytes", "baseline_bytes", "kind",
                                             "samples", "seconds")} for x in everyone]
    mem["peak_bytes"] = max(x["peak_bytes"] for x in everyone)
    return {**result, "throughput": thr, "memory": mem,
            "distributed": {"world_size": g.world_size, "backend": g.backend,
                            "launcher": os.environ.get("HARNESS_LAUNCHER", "external"),
                            "batch_split": "each process trains on its share of every global batch"}}
