"""LongLoRA's training cost against LoRA with full attention and full fine-tuning, by length.

Model: a Llama with SmolLM2-135M's layer shapes (hidden 576, 9 query heads, 3 kv heads, MLP 1536,
vocabulary 49,152, tied embeddings, RoPE theta 100,000) but ``--layers`` of its 30 layers (4 by
default) and random weights: cost per layer is what matters and random weights cost the same.
Batch 1, one sequence of each length. Configurations, built by the harness's own methods:

- ``full``: every weight trains, full attention;
- ``lora``: LoRA r 8 on q, k, v, o, full attention (the baseline of the ratios);
- ``lora+``: LongLoRA without S2-Attn (LoRA + trainable embeddings and norms, full attention);
- ``longlora``: LongLoRA (the same, with S2-Attn, group 1/4 of the sequence).

Per configuration and length: the median time of a training step (forward, backward, AdamW;
configurations interleaved round by round so machine noise hits all alike), the bytes autograd
saves for backward in one forward (``torch.autograd.graph.saved_tensors_hooks``, deduplicated by
storage, weights excluded), and the optimizer state (gradients + AdamW's two moments). Attention
implementations: ``sdpa`` (the default; on the CPU a flash-style kernel that saves no
``n x n`` matrix) and ``eager`` (saves the attention matrix, up to ``--eager-max`` tokens).

    python benchmarks/bench_longlora.py [--lengths 512,1024,2048,4096] [--layers 4] [--rounds 3]

Ratios are against ``lora`` at the same length and attention implementation: below 1.0 is
cheaper.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))  # tests/helpers
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lora_family_a import saved_activation_bytes  # noqa: E402  (one definition of the count)
os.environ.setdefault("HARNESS_NO_PROGRESS", "1")

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("full", {}),
    "lora": ("lora", {"targets": "attn"}),
    "lora+": ("longlora", {"s2_attn": False, "rope_factor": 1}),
    "longlora": ("longlora", {"rope_factor": 1}),
}


def smollm2_like(layers: int, attn: str, vocab: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=576, num_hidden_layers=layers, num_attention_heads=9,
                      num_key_value_heads=3, intermediate_size=1536, max_position_embeddings=8192,
                      rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg)


class Subject:
    def __init__(self, name: str, base: nn.Module, length: int, batch: dict[str, torch.Tensor]):
        from helpers import apply_method

        method, params = CONFIGS[name]
        self.model, ctx, _ = apply_method(copy.deepcopy(base), method, params, max_length=length)
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(trainable, lr=1e-5)
        self.batch = batch
        self.trainable = sum(p.numel() for p in trainable)
        self.state = 3 * sum(p.numel() * p.element_size() for p in trainable)
        self.act = saved_activation_bytes(self.model, batch)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="512,1024,2048,4096")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rounds", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    ap.add_argument("--attn", default="sdpa,eager")
    ap.add_argument("--eager-max", type=int, default=2048, help="longest length run with eager attention")
    args = ap.parse_args()
    from harness.observers import quiet_libraries

    quiet_libraries()
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"# LongLoRA benchmark: SmolLM2-135M shapes, {args.layers} layers, vocab {args.vocab}, batch 1, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| attn | length | config | trainable | step ms | x lora | saved act MiB | x lora | opt state MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for attn in args.attn.split(","):
        base = smollm2_like(args.layers, attn, args.vocab)
        for n in lengths:
            if attn == "eager" and n > args.eager_max:
                continue
            g = torch.Generator().manual_seed(n)
            ids = torch.randint(0, args.vocab, (1, n), generator=g)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            subjects = {name: Subject(name, base, n, batch) for name in CONFIGS}
            for r in range(args.rounds + 1):  # round 0 warms up
                for s in subjects.values():
                    s.step(record=r > 0)
            ref = subjects["lora"]
            for name, s in subjects.items():
                print(f"| {attn} | {n} | {name} | {s.trainable:,} | {s.ms:.0f} | {s.ms / ref.ms:.2f} | "
                      f"{s.act / 2**20:.0f} | {s.act / ref.act:.2f} | {s.state / 2**20:.0f} |", flush=True)
            del subjects


if __name__ == "__main__":
    main()
