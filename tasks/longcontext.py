"""Long-context suite: passkey retrieval and perplexity at several context lengths, and continued
language modelling on long real text to train for them.

Data: Paul Graham's essays (``$HARNESS_DATA_DIR/longcontext/paul_graham_essays/*.txt``, the
haystack of the needle-in-a-haystack test). Sorted by file name, every 4th essay is held out
(``dev``: perplexity text and passkey haystacks); the others are the training text.

- **Training** (split ``train``): the training essays, in file-name order, joined with EOS and cut
  into chunks of exactly ``max_length`` tokens (the training length; the incomplete tail is
  dropped, so no padding and every step sees the full length). Labels are the input ids (causal LM
  loss). ``max_train_samples`` counts essays, not chunks.
- **Passkey retrieval** (Mohtashami & Jaggi 2023, as LongLoRA's ``passkey_retrivial.py``): a plain
  prompt, no chat template (option ``passkey_prompt: chat`` wraps it in the model's template)::

      There is an important info hidden inside a lot of irrelevant text. Find it and memorize
      them. I will quiz you about the important information there.
      <essay text before>
      The pass key is 48213. Remember it. 48213 is the pass key.
      <essay text after>
      What is the pass key? The pass key is

  The key is a random 5-digit number; the haystack is a window of the held-out essays starting at
  a random token (wrapping around), with the key line at the stated depth (0 = right after the
  instruction, 1 = right before the question), moved back to the end of the nearest preceding
  sentence when one ends within 64 tokens. The whole prompt with its answer is ``length`` tokens
  (a few tokens more or less where re-tokenising joins differs). Everything is drawn from
  ``seed``, the length, the depth and the sample number: the same options give the same prompts.
  Correct means the model's greedy answer is the key: the argmax token at every answer position
  (teacher-forced, one forward pass) equals the answer's tokens ``" 48213"``. That is exactly the
  condition for greedy decoding to produce those tokens (each greedy step sees the prompt plus the
  correct tokens before it), i.e. LongLoRA's criterion (generated tokens == answer tokens),
  without a decoding loop.
- **Perplexity**: ``exp`` of the mean next-token loss over ``ppl_samples`` consecutive,
  non-overlapping windows of ``length`` tokens of the held-out essays (token-weighted).

Metrics: ``passkey_acc_<len>`` (mean over depths and samples) and ``perplexity_<len>`` per length
(``1k`` = 1024 tokens). The score is the mean passkey accuracy. Files beside the run record:
``passkey.md`` (accuracy by length and depth), ``passkey.csv`` (every prompt: key, depth,
tokens, greedy answer) and ``passkey_heatmap.png``. ``evaluate_before_training`` is on: the record
also holds ``metrics_before`` (the untrained model) and ``before-*`` files.

Options (profile ``tasks: longcontext:`` sections or ``--set``): ``passkey_lengths``,
``passkey_depths`` (fractions), ``passkey_samples`` (prompts per length and depth),
``ppl_lengths`` (None: the passkey lengths), ``ppl_samples``, ``passkey_prompt`` (plain|chat),
``seed``. Lists may be given as ``[512,1024]`` or ``512,1024``.
"""
from __future__ import annotations

import csv
import io
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F

from tasks.base import DataUnavailable, MalformedData, Task, data_root
from tasks.registry import register_task

ESSAYS = Path("longcontext") / "paul_graham_essays"
DEV_EVERY = 4          # every 4th essay by file name is held out
SNAP_TOKENS = 64       # how far back the key line may move to land after a full sentence

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
               "memorize them. I will quiz you about the important information there.")
QUESTION = "What is the pass key?"
ANSWER_LEAD = "The pass key is"


def needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def length_label(n: int) -> str:
    """512 -> "512", 1024 -> "1k", 1536 -> "1.5k": short metric names."""
    if n % 1024 == 0:
        return f"{n // 1024}k"
    if n % 512 == 0 and n > 1024:
        return f"{n / 1024:g}k"
    return str(n)


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True)
class Probe:
    """One evaluation prompt, built by `encode` (it needs the tokenizer)."""
    kind: str          # "ppl" or "passkey"
    length: int        # tokens
    depth: float       # passkey: where the key line sits, 0..1; ppl: unused (0)
    index: int         # sample number within (kind, length, depth)


class LMBatch(dict):
    """A collated batch (what the model takes) that also carries each row's description in
    ``meta``; `harness.train.to_device` copies only the tensors."""
    meta: list[dict[str, Any]]


def _int_list(value: Any, what: str) -> list[int]:
    items = value.split(",") if isinstance(value, str) else ([value] if isinstance(value, (int, float)) else value)
    try:
        out = [int(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"longcontext: {what} must be a list of token counts, got {value!r}") from None
    if not out or any(v < 16 for v in out):
        raise ValueError(f"longcontext: {what} must be token counts >= 16, got {value!r}")
    return out


def _depths(value: Any) -> list[float]:
    items = value.split(",") if isinstance(value, str) else ([value] if isinstance(value, (int, float)) else value)
    try:
        out = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"longcontext: passkey_depths must be fractions, got {value!r}") from None
    if not out or any(not 0 <= d <= 1 for d in out):
        raise ValueError(f"longcontext: passkey_depths must be fractions in [0, 1], got {value!r}")
    return out


@register_task
class LongContext(Task):
    name = "longcontext"
    group = "longcontext"
    model_kind = "causal-lm"
    default_model = "smollm2"
    num_labels = 0
    evaluate_before_training = True
    options: ClassVar[dict[str, Any]] = {
        "passkey_lengths": [1024, 2048, 4096],
        "passkey_depths": [0.0, 0.25, 0.5, 0.75, 1.0],
        "passkey_samples": 2,
        "ppl_lengths": None,
        "ppl_samples": 2,
        "passkey_prompt": "plain",
        "seed": 1234,
    }

    def __init__(self, options: dict[str, Any] | None = None):
        super().__init__(options)
        p = self.params
        self.passkey_lengths = _int_list(p["passkey_lengths"], "passkey_lengths")
        self.ppl_lengths = (self.passkey_lengths if p["ppl_lengths"] is None
                            else _int_list(p["ppl_lengths"], "ppl_lengths"))
        self.depths = _depths(p["passkey_depths"])
        for key in ("passkey_samples", "ppl_samples"):
            if not isinstance(p[key], int) or p[key] < 0:
                raise ValueError(f"longcontext: {key} must be a whole number >= 0, got {p[key]!r}")
        if p["passkey_prompt"] not in ("plain", "chat"):
            raise ValueError(f"longcontext: passkey_prompt must be plain or chat, got {p['passkey_prompt']!r}")
        self._dev_ids: list[int] | None = None
        self._tokenizer: Any = None

    # -- data -------------------------------------------------------------------------------
    def _folder(self, data_dir: str | None) -> Path | None:
        root = data_root(data_dir)
        return None if root is None else root / ESSAYS

    def availability(self, data_dir: str | None = None) -> str | None:
        folder = self._folder(data_dir)
        if folder is None:
            return (f"no essays for {self.name}: HARNESS_DATA_DIR is not set; put Paul Graham's "
                    f"essays (*.txt) at $HARNESS_DATA_DIR/{ESSAYS}/ or pass --data-dir")
        if len(sorted(folder.glob("*.txt"))) < DEV_EVERY:
            return f"no essays for {self.name}: need at least {DEV_EVERY} *.txt files in {folder}"
        return None

    def documents(self, split: str, data_dir: str | None = None) -> list[Document]:
        why = self.availability(data_dir)
        if why is not None:
            raise DataUnavailable(why)
        files = sorted(self._folder(data_dir).glob("*.txt"))
        docs = []
        for i, f in enumerate(files):
            if (i % DEV_EVERY == DEV_EVERY - 1) != (split == "dev"):
                continue
            text = f.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                docs.append(Document(f.stem, text))
        if not docs:
            raise MalformedData(f"{self._folder(data_dir)}: every {split} essay is empty")
        return docs

    def load(self, split: str, data_dir: str | None = None) -> list[Any]:
        if split == "train":
            return self.documents("train", data_dir)
        if split != "dev":
            raise ValueError(f"{self.name} has splits train and dev, not {split!r}")
        self._dev_docs = self.documents("dev", data_dir)
        probes = [Probe("ppl", n, 0.0, i) for n in self.ppl_lengths for i in range(self.params["ppl_samples"])]
        probes += [Probe("passkey", n, d, i) for n in self.passkey_lengths for d in self.depths
                   for i in range(self.params["passkey_samples"])]
        if not probes:
            raise ValueError(f"{self.name}: nothing to evaluate (passkey_samples and ppl_samples are 0)")
        # Shortest first: batches hold one length, and the runner's merge check takes the first rows.
        return sorted(probes, key=lambda p: (p.length, p.kind != "ppl", p.depth, p.index))

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, tokenizer: Any, examples: list[Any], max_length: int) -> list[dict[str, Any]]:
        self._tokenizer = tokenizer
        if examples and isinstance(examples[0], Document):
            return self._chunks(tokenizer, examples, max_length)
        return [self._probe_row(tokenizer, p) for p in examples]

    def _chunks(self, tok: Any, docs: list[Document], length: int) -> list[dict[str, Any]]:
        stream: list[int] = []
        for d in docs:
            stream += tok(d.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(stream) // length
        if n == 0:
            raise ValueError(f"{self.name}: the training essays hold {len(stream)} tokens, fewer than "
                             f"one chunk of max_length={length}")
        return [{"input_ids": stream[i * length:(i + 1) * length], "attention_mask": [1] * length,
                 "labels": stream[i * length:(i + 1) * length]} for i in range(n)]

    def dev_ids(self, tok: Any) -> list[int]:
        """The held-out essays as one token stream (essays separated by EOS)."""
        if self._dev_ids is None:
            docs = getattr(self, "_dev_docs", None) or self.documents("dev")
            ids: list[int] = []
            for d in docs:
                ids += tok(d.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            self._dev_ids = ids
        return self._dev_ids

    def _probe_row(self, tok: Any, p: Probe) -> dict[str, Any]:
        stream = self.dev_ids(tok)
        if p.kind == "ppl":
            if (p.index + 1) * p.length > len(stream):
                raise ValueError(f"{self.name}: perplexity window {p.index + 1} of {p.length} tokens needs "
                                 f"{(p.index + 1) * p.length} held-out tokens, there are {len(stream)}; "
                                 f"lower ppl_samples or ppl_lengths")
            ids = stream[p.index * p.length:(p.index + 1) * p.length]
            return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids),
                    "meta": {"kind": "ppl", "length": p.length, "index": p.index}}
        return self.passkey_row(tok, p)

    def render(self, tok: Any, before: str, after: str, key: str) -> tuple[str, str]:
        """The prompt around a haystack split in two, and its answer."""
        body = "\n".join(s for s in (INSTRUCTION, before, needle(key), after) if s)
        if self.params["passkey_prompt"] == "chat":
            msgs = [{"role": "user", "content": f"{body}\n{QUESTION}"}]
            prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + ANSWER_LEAD
        else:
            prompt = f"{body}\n{QUESTION} {ANSWER_LEAD}"
        return prompt, f" {key}"

    def passkey_row(self, tok: Any, p: Probe) -> dict[str, Any]:
        rng = random.Random(f"{self.params['seed']}/{p.length}/{p.depth}/{p.index}")
        key = str(rng.randint(10000, 99999))
        prompt, answer = self.render(tok, "", "", key)
        fixed = len(tok(prompt + answer)["input_ids"]) + 1   # +1: the line breaks around the text (measured)
        budget = p.length - fixed
        if budget < 1:
            raise ValueError(f"{self.name}: passkey length {p.length} is shorter than the prompt "
                             f"without haystack ({fixed} tokens)")
        stream = self.dev_ids(tok)
        start = rng.randrange(len(stream))
        hay = [stream[(start + j) % len(stream)] for j in range(budget)]  # wraps: any length works
        split = round(p.depth * budget)
        if 0 < split < budget:
            for j in range(split, max(0, split - SNAP_TOKENS), -1):
                if tok.decode(hay[j - 1:j]).rstrip().endswith((".", "!", "?")):
                    split = j
                    break
        before, after = tok.decode(hay[:split]).strip(), tok.decode(hay[split:]).strip()
        prompt, answer = self.render(tok, before, after, key)
        prompt_ids = tok(prompt)["input_ids"]
        full = tok(prompt + answer)["input_ids"]
        if full[:len(prompt_ids)] != prompt_ids:  # the join tokenised differently: keep the parts
            full = prompt_ids + tok(answer, add_special_tokens=False)["input_ids"]
        n_answer = len(full) - len(prompt_ids)
        return {"input_ids": full, "attention_mask": [1] * len(full),
                "labels": [-100] * len(prompt_ids) + full[len(prompt_ids):],
                "meta": {"kind": "passkey", "length": p.length, "depth": p.depth, "index": p.index,
                         "key": key, "tokens": len(full), "answer_tokens": n_answer,
                         "key_depth": split / budget}}

    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        def collate(rows: list[dict[str, Any]]) -> LMBatch:
            width = max(len(r["input_ids"]) for r in rows)

            def pad(key: str, fill: int) -> torch.Tensor:  # right padding: causal rows ignore it
                return torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows])

            batch = LMBatch(input_ids=pad("input_ids", pad_id), attention_mask=pad("attention_mask", 0),
                            labels=pad("labels", -100))
            batch.meta = [r.get("meta", {}) for r in rows]
            return batch

        return collate

    # -- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: Iterator[dict[str, torch.Tensor]],
                 forward: Callable[[dict[str, torch.Tensor]], Any]) -> dict[str, float]:
        nll: dict[int, float] = {}
        count: dict[int, int] = {}
        results: list[dict[str, Any]] = []
        for batch in batches:
            # Without labels: the model's own loss would add a second logits-sized buffer.
            logits = forward({k: v for k, v in batch.items() if k != "labels"}).logits
            labels = batch["labels"].to(logits.device)[:, 1:]
            for r, meta in enumerate(getattr(batch, "meta", None) or [{}] * len(labels)):
                keep = labels[r] != -100
                pred_logits = logits[r, :-1][keep].float()
                target = labels[r][keep]
                if meta.get("kind") == "passkey":
                    greedy = pred_logits.argmax(-1)
                    results.append({**meta, "correct": bool(torch.equal(greedy, target)),
                                    "answer": self._decode(greedy.tolist())})
                else:  # perplexity window (or an unlabelled LM row: counts as one)
                    n = meta.get("length", int(keep.sum()) + 1)
                    nll[n] = nll.get(n, 0.0) + float(F.cross_entropy(pred_logits, target, reduction="sum"))
                    count[n] = count.get(n, 0) + int(keep.sum())
        metrics: dict[str, float] = {}
        for n in sorted(nll):
            metrics[f"perplexity_{length_label(n)}"] = math.exp(nll[n] / max(1, count[n]))
        lengths = sorted({r["length"] for r in results})
        for n in lengths:
            rows = [r for r in results if r["length"] == n]
            metrics[f"passkey_acc_{length_label(n)}"] = sum(r["correct"] for r in rows) / len(rows)
        if results:
            self._passkey_files(results)
        return metrics

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids) if self._tokenizer is not None else " ".join(map(str, ids))

    def score(self, metrics: dict[str, float]) -> float:
        acc = [v for k, v in metrics.items() if k.startswith("passkey_acc_")]
        return sum(acc) / len(acc) if acc else float("nan")

    # -- files ------------------------------------------------------------------------------
    def _passkey_files(self, results: list[dict[str, Any]]) -> None:
        lengths = sorted({r["length"] for r in results})
        depths = sorted({r["depth"] for r in results})
        acc = [[_mean([r["correct"] for r in results if r["length"] == n and r["depth"] == d])
                for d in depths] for n in lengths]
        head = "| length \\ depth | " + " | ".join(f"{d:.0%}" for d in depths) + " | mean |"
        lines = ["Passkey accuracy (%) by context length (tokens) and depth of the key.", "",
                 head, "|" + "---|" * (len(depths) + 2)]
        for n, row in zip(lengths, acc):
            cells = " | ".join("" if math.isnan(a) else f"{100 * a:.0f}" for a in row)
            overall = _mean([r["correct"] for r in results if r["length"] == n])
            lines.append(f"| {n} | {cells} | {100 * overall:.0f} |")
        self.add_artifact("passkey.md", "\n".join(lines) + "\n")

        out = io.StringIO()
        fields = ["length", "depth", "index", "key", "correct", "answer", "tokens", "key_depth"]
        w = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
        self.add_artifact("passkey.csv", out.getvalue())
        self.add_artifact("passkey_heatmap.png", heatmap_png(acc, lengths, depths))


def _mean(xs: list[bool]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def heatmap_png(acc: list[list[float]], lengths: list[int], depths: list[float]) -> bytes:
    """Accuracy by length (rows) and depth (columns) as a PNG (matplotlib's Agg canvas, no display
    and no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.2 + 0.9 * len(depths), 1.0 + 0.6 * len(lengths)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("depth of the key")
    ax.set_ylabel("context length (tokens)")
    ax.set_title("passkey accuracy")
    for i, row in enumerate(acc):
        for j, a in enumerate(row):
            if not math.isnan(a):
                ax.text(j, i, f"{100 * a:.0f}", ha="center", va="center", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
