"""Step time and memory of QLoRA, Delta-LoRA, LoRA-Drop and AdaLoRA against our LoRA and PEFT.

The companion of `bench_lora_family_a.py` (same model, batch, measurements and round-robin timing)
for the methods whose training step is more than forward + backward + AdamW: here each of our
configurations runs its training hooks as the harness loop does (``on_train_start`` once, then per
step ``extra_loss``, backward, AdamW, ``on_step``), so a step includes Delta-LoRA's weight update
and AdaLoRA's scoring, masking and orthogonality regulariser. Hugging Face PEFT's AdaLoRA runs
``update_and_allocate`` every step, its documented use. Both AdaLoRAs are timed inside the rank
reduction phase with a masking interval of one step (the costliest case; a real run masks every
``delta_t`` steps).

Hugging Face PEFT has QLoRA (its LoRA around a bitsandbytes ``Linear4bit``; here both sides wrap
the very same NF4 storage) and AdaLoRA; it has no Delta-LoRA or LoRA-Drop, whose PEFT column is
``-``. QLoRA adapts every linear layer with r 64 (the paper's setting); its LoRA reference row is
our LoRA with the same targets and rank on the unquantized model, which isolates what 4-bit
storage costs in step time and what it saves in weight memory.

Weight memory is the bytes of the frozen backbone's parameters and buffers (the 4-bit storage and
its quantization constants for QLoRA), reported per backbone parameter.

    python benchmarks/bench_lora_family_b.py [--batch 16 --seq 64 --steps 5 --warmup 2]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora_family_a import MB, fixed_batch, saved_activation_bytes  # noqa: E402

from harness.config import RunConfig, TrainConfig  # noqa: E402
from harness.lowrank import adapted_modules  # noqa: E402
from harness.models import load_model  # noqa: E402
from harness.plugins import get_method, make_manager  # noqa: E402
from harness.state import TrainState  # noqa: E402
from harness.targets import resolve_targets  # noqa: E402

TOTAL_STEPS = 12  # the schedule both AdaLoRAs see: rank reduction runs from step 1 to step 11
LR = 1e-4


def weight_bytes(model: nn.Module, quantized_only: bool = False) -> tuple[int, int]:
    """(bytes, logical parameter count) of the frozen backbone: parameters and buffers that do not
    train. A bitsandbytes 4-bit weight stores two values per byte; its logical count is the
    unquantized shape's (``quant_state.shape``). ``quantized_only``: the 4-bit weights alone."""
    nbytes = count = 0
    for p in model.parameters():
        if p.requires_grad or (quantized_only and getattr(p, "quant_state", None) is None):
            continue
        nbytes += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        count += int(torch.Size(qs.shape).numel()) if qs is not None else p.numel()
        if qs is not None:  # absmax (and, double-quantized, its own constants) live in quant_state
            for t in (qs.absmax, getattr(qs, "code", None),
                      *((qs.state2.absmax, qs.state2.code) if getattr(qs, "state2", None) else ())):
                if isinstance(t, torch.Tensor):
                    nbytes += t.numel() * t.element_size()
    if not quantized_only:
        nbytes += sum(b.numel() * b.element_size() for b in model.buffers())
    return nbytes, count


class Ours:
    """Our plugin driven as the harness loop drives it, on one fixed batch."""

    def __init__(self, method: str, params: dict[str, Any], base: nn.Module, loaded: Any,
                 batch: dict[str, torch.Tensor]):
        torch.manual_seed(0)
        cls = get_method(method)
        mp = {**cls.defaults, **params}
        self.ctx = ctx = TrainState(
            config=RunConfig(method=method, task="bench", train=TrainConfig(lr=LR, batch_size=len(batch["labels"])),
                             method_params=mp),
            device=torch.device("cpu"), targets=resolve_targets(loaded.model_type, mp["targets"]),
            head_names=loaded.head_names, model_type=loaded.model_type)
        ctx.total_steps = TOTAL_STEPS
        # A sampling or probing phase (LoRA-Drop) sees ten copies of the batch as its data.
        ctx.train_batches = lambda: iter([batch] * 10)
        ctx.compute_loss = lambda model, b: model(**b).loss
        ctx._rebuild = self._rebuild
        self.pm = make_manager(cls(mp))
        model = copy.deepcopy(base)
        self.model = self.pm.hook.inject(model=model, ctx=ctx) or model
        for name, p in self.model.named_parameters():
            if ctx.is_head(name):
                p.requires_grad_(True)
        self.batch = batch
        self.model.train()
        self._rebuild()
        self.pm.hook.on_train_start(model=self.model, ctx=ctx)
        self.finish_init()

    def _rebuild(self) -> None:
        groups = self.pm.hook.param_groups(model=self.model, ctx=self.ctx) or \
            [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        self.opt = self.ctx.optimizer = torch.optim.AdamW(groups, lr=LR)

    def finish_init(self) -> None:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in trainable)
        self.act = saved_activation_bytes(self.model, self.batch)
        self.state = self.act + 3 * sum(p.numel() * p.element_size() for p in trainable)
        self.weights = weight_bytes(self.model)
        self.times: list[float] = []

    def step(self, record: bool) -> None:
        t0 = time.perf_counter()
        outputs = self.model(**self.batch)
        loss = outputs.loss
        for extra in self.pm.hook.extra_loss(model=self.model, batch=self.batch, outputs=outputs,
                                             ctx=self.ctx):
            if extra is not None:
                loss = loss + extra
        loss.backward()
        self.opt.step()
        self.ctx.step += 1
        self.pm.hook.on_step(model=self.model, ctx=self.ctx)  # sees the gradients, as in the loop
        self.opt.zero_grad(set_to_none=True)
        if record:
            self.times.append(time.perf_counter() - t0)

    @property
    def ms(self) -> float:
        return 1000 * statistics.median(self.times)


class Peft(Ours):
    """Hugging Face PEFT's implementation on the same base, plain AdamW (AdaLoRA: plus
    ``update_and_allocate`` after every step)."""

    def __init__(self, model: nn.Module, batch: dict[str, torch.Tensor], adalora: bool = False):
        self.model, self.batch, self.adalora, self.step_no = model, batch, adalora, 0
        self.model.train()
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        self.finish_init()

    def step(self, record: bool) -> None:
        t0 = time.perf_counter()
        self.model(**self.batch).loss.backward()  # PEFT's AdaLoRA adds its regulariser to .loss
        self.opt.step()
        self.step_no += 1
        if self.adalora:  # reads the gradients: before zero_grad, as PEFT documents
            self.model.base_model.update_and_allocate(self.step_no)
        self.opt.zero_grad(set_to_none=True)
        if record:
            self.times.append(time.perf_counter() - t0)


def peft_qlora(base: nn.Module, ours: Ours, r: int, alpha: int) -> nn.Module:
    """PEFT's LoRA around the very same ``Linear4bit`` layers our QLoRA built."""
    import peft

    reference = copy.deepcopy(base)
    layers = dict(adapted_modules(ours.model))
    for name, layer in layers.items():
        parent, _, attr = name.rpartition(".")
        setattr(reference.get_submodule(parent), attr, copy.deepcopy(layer.base))
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(layers),
                          task_type="SEQ_CLS")
    return peft.get_peft_model(reference, cfg)


def peft_adalora(base: nn.Module, targets: list[str], init_r: int, target_r: int,
                 alpha: int) -> nn.Module:
    import peft

    cfg = peft.AdaLoraConfig(init_r=init_r, target_r=target_r, lora_alpha=alpha, lora_dropout=0.0,
                             target_modules=targets, total_step=TOTAL_STEPS, tinit=1, tfinal=1,
                             deltaT=1, task_type="SEQ_CLS")
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    if args.warmup + args.steps > TOTAL_STEPS - 1:
        ap.error(f"--warmup + --steps must stay below {TOTAL_STEPS - 1}: the AdaLoRA schedule")

    loaded = load_model("minilm", "sequence-classification", num_labels=2)
    base = loaded.model
    batch = fixed_batch(args.batch, args.seq, base.config.vocab_size)
    q = get_method("qlora").defaults
    a = get_method("adalora").defaults
    attn = resolve_targets(loaded.model_type, a["targets"])
    print(f"model minilm ({loaded.model_type}, hidden {base.config.hidden_size}), batch {args.batch} x "
          f"seq {args.seq}, torch {torch.__version__}, {torch.get_num_threads()} threads; step = "
          f"forward + extra losses + backward + AdamW + on_step hooks, median of {args.steps} after "
          f"{args.warmup} warm-up, configurations interleaved")
    t_start = time.perf_counter()
    step_1 = {"start_step": 1}  # Delta-LoRA's W update active from the second step on
    subjects: dict[str, Ours] = {
        "ours lora": Ours("lora", {"dropout": 0.0}, base, loaded, batch),
        "ours delta_lora": Ours("delta_lora", step_1, base, loaded, batch),
        "ours lora_drop": Ours("lora_drop", {"dropout": 0.0}, base, loaded, batch),
        "ours adalora": Ours("adalora", {"t_init": 1, "t_final": 1, "delta_t": 1}, base, loaded, batch),
        "ours lora r64 all": Ours("lora", {"r": q["r"], "alpha": q["alpha"], "dropout": 0.0,
                                           "targets": q["targets"]}, base, loaded, batch),
        "ours qlora": Ours("qlora", {"dropout": 0.0}, base, loaded, batch),
    }
    subjects["peft adalora"] = Peft(peft_adalora(base, attn, a["r_init"], a["target_r"], a["alpha"]),
                                    batch, adalora=True)
    subjects["peft qlora"] = Peft(peft_qlora(base, subjects["ours qlora"], q["r"], q["alpha"]), batch)
    # (label, LoRA reference label, PEFT label or None)
    rows = [("ours lora", "ours lora", None),
            ("ours delta_lora", "ours lora", None),
            ("ours lora_drop", "ours lora", None),
            ("ours adalora", "ours lora", "peft adalora"),
            ("peft adalora", "ours lora", None),
            ("ours lora r64 all", "ours lora r64 all", None),
            ("ours qlora", "ours lora r64 all", "peft qlora"),
            ("peft qlora", "ours lora r64 all", None)]
    for i in range(args.warmup + args.steps):
        for s in subjects.values():
            s.step(record=i >= args.warmup)

    head = (f"{'method':<19}{'trainable':>10}{'step ms':>9}{'x lora':>8}{'x peft':>8}"
            f"{'saved act MB':>13}{'x lora':>8}{'x peft':>8}{'train state MB':>15}{'weights MB':>11}"
            f"{'B/param':>8}")
    print(head)
    print("-" * len(head))
    for label, ref_label, peft_label in rows:
        s, ref = subjects[label], subjects[ref_label]
        other = subjects.get(peft_label) if peft_label else None
        wb, wn = s.weights
        print(f"{label:<19}{s.trainable:>10,}{s.ms:>9.1f}{s.ms / ref.ms:>8.2f}"
              f"{(f'{s.ms / other.ms:.2f}' if other else '-'):>8}{s.act / MB:>13.1f}"
              f"{s.act / ref.act:>8.2f}{(f'{s.act / other.act:.2f}' if other else '-'):>8}"
              f"{s.state / MB:>15.1f}{wb / MB:>11.1f}{wb / wn:>8.2f}")
    kept = len(subjects["ours lora_drop"].ctx.extras.get("kept_layers", []))
    n_lora = len(list(adapted_modules(subjects["ours lora"].model)))
    print(f"x lora: against our LoRA (r 8, query+value; for QLoRA our LoRA r {q['r']} on every "
          f"linear, unquantized); x peft: against Hugging Face PEFT's same method. LoRA-Drop kept "
          f"{kept} of {n_lora} layers. weights: frozen backbone bytes; B/param: per backbone parameter.")
    qb, qn = weight_bytes(subjects["ours qlora"].model, quantized_only=True)
    lb = sum(m.base.weight.numel() * m.base.weight.element_size()
             for _, m in adapted_modules(subjects["ours lora r64 all"].model))
    print(f"QLoRA's NF4 linear weights (double-quantized constants included): {qb / MB:.1f} MB for "
          f"{qn:,} parameters = {qb / qn:.3f} bytes/param (fp32: {lb / MB:.1f} MB, 4 bytes/param); "
          f"embeddings, norms and the head stay in full precision.")
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
