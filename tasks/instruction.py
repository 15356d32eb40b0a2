"""Instruction tuning: prompt -> response sets trained as a causal language model.

Data (``$HARNESS_DATA_DIR/instruction`` or ``--data-dir``; see ``shared/data/MANIFEST.md``), one
task per dataset, all read into Alpaca's ``(instruction, input, output)``:

- ``instruction/code_alpaca_2k``: ``code_alpaca_2k/code_alpaca_2k.json``, a JSON list of
  ``{instruction, input, output}`` (Code Alpaca's 2k release).
- ``instruction/llamafactory_demo``: ``llamafactory_demo/alpaca_en_demo.json``, same format.
- ``instruction/alpaca_eval``: ``alpaca_eval/text_davinci_003/model_outputs.json``, a JSON list of
  ``{instruction, output, ...}`` (no input).
- ``instruction/alpaca_seed_tasks``: ``alpaca_seed_tasks/seed_tasks.jsonl`` and
- ``instruction/self_instruct_user_oriented``:
  ``self_instruct_user_oriented/user_oriented_instructions.jsonl``: JSON lines of
  ``{instruction, instances: [{input, output}, ...]}``; one example per instance.

The group ``instruction`` is the two Alpaca-format training sets (``code_alpaca_2k``,
``llamafactory_demo``); the three evaluation-sized sets (805, 175 and 252 rows) run by name. When
a file is missing and the machine is online (``HF_HUB_OFFLINE`` unset, ``datasets`` installed),
the same file is read at the commit the manifest names with ``datasets.load_dataset("json")``.

Rows whose output is empty are skipped (two in Code Alpaca, two in AlpacaEval: nothing to learn
or score); a row that is not the expected shape raises `MalformedData` naming the file and row.
Each file has one split, so the held-out ``dev`` split is fixed by content: an example is held out
when the SHA-256 of its instruction and input is 0 mod 10 (about 10%). It does not depend on row
order or a seed, and duplicated instructions never straddle train and dev.

Prompt: the tokenizer's chat template where it has one (user turn = instruction, plus
``"\\n\\n" + input`` when there is one; assistant turn = output; the prompt is the template with
the generation prompt, the response is what the full conversation adds to it), else the Stanford
Alpaca prompt with ``output + eos`` as response. Loss is on response tokens only: labels are
-100 on the prompt and on padding. Sequences are cut at ``max_length`` from the end, so the prompt
is kept from its start and the response keeps what fits; an example whose prompt leaves no room
for a response token is dropped and counted (stderr and the record's ``data`` notes).

Metrics on ``dev``: ``loss`` and ``perplexity`` (mean negative log-likelihood of the response
tokens, token-weighted over the split, and its exp), and ``rougeL``: the mean ROUGE-L F1
(``rouge-score``, stemming on) of greedy generations of at most ``max_new_tokens`` tokens (a task
option) against the reference outputs. The task's score is ``rougeL``. Generations are saved as
``dev-generations.jsonl`` beside the run record. The option ``evaluate_before`` (off by default:
it costs a second evaluation) scores the model once before training too: ``metrics_before`` and
``before-dev-generations.jsonl``; for methods that start as the base model, the zero-shot baseline.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F

from tasks.base import DataUnavailable, MalformedData, Task, data_root
from tasks.registry import register_task

# Stanford Alpaca's PROMPT_DICT (tatsu-lab/stanford_alpaca, train.py), verbatim.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)
IGNORE = -100  # label of tokens that are not scored (prompt, padding)


@dataclass(frozen=True)
class Instruction:
    instruction: str
    input: str
    output: str

    @property
    def user(self) -> str:
        """The user turn of a chat: the instruction, and the input after a blank line."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_example(tokenizer: Any, ex: Instruction) -> tuple[str, str]:
    """``(prompt, response)`` text: the chat template when the tokenizer has one, else Alpaca's."""
    if has_chat_template(tokenizer):
        turn = [{"role": "user", "content": ex.user}]
        prompt = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(turn + [{"role": "assistant", "content": ex.output}],
                                             tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the tokenizer's chat template does not extend the generation prompt "
                             "with the assistant turn; cannot tell the prompt from the response")
        return prompt, full[len(prompt):]
    template = ALPACA_PROMPT_INPUT if ex.input else ALPACA_PROMPT_NO_INPUT
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has neither a chat template nor an EOS token to end responses")
    return template.format(instruction=ex.instruction, input=ex.input), ex.output + tokenizer.eos_token


def held_out(ex: Instruction) -> bool:
    """Whether ``ex`` belongs to the dev split (content hash, about 1 in 10)."""
    digest = hashlib.sha256(f"{ex.instruction}\x00{ex.input}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10 == 0


# -- readers --------------------------------------------------------------------------------------
def _text(row: dict, key: str, where: str, required: bool = True) -> str:
    value = row.get(key, None if required else "")
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        what = "is missing" if key not in row else f"is {type(value).__name__}, not a string"
        raise MalformedData(f"{where}: field {key!r} {what}")
    return value


def parse_alpaca(row: Any, where: str) -> list[Instruction]:
    """``{instruction, input?, output}`` -> one example (none if the output is empty)."""
    if not isinstance(row, dict):
        raise MalformedData(f"{where}: expected an object with instruction/output, got {type(row).__name__}")
    ex = Instruction(_text(row, "instruction", where), _text(row, "input", where, required=False),
                     _text(row, "output", where))
    if not ex.instruction.strip():
        raise MalformedData(f"{where}: empty instruction")
    return [ex] if ex.output.strip() else []


def parse_instances(row: Any, where: str) -> list[Instruction]:
    """``{instruction, instances: [{input, output}, ...]}`` -> one example per instance."""
    if not isinstance(row, dict):
        raise MalformedData(f"{where}: expected an object with instruction/instances, got {type(row).__name__}")
    instruction = _text(row, "instruction", where)
    instances = row.get("instances")
    if not isinstance(instances, list) or not instances:
        raise MalformedData(f"{where}: field 'instances' must be a non-empty list of {{input, output}}")
    out = []
    for j, inst in enumerate(instances):
        out += parse_alpaca({"instruction": instruction, **inst} if isinstance(inst, dict) else inst,
                            f"{where}, instance {j}")
    return out


def read_json_list(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MalformedData(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise MalformedData(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise MalformedData(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


# -- metrics ----------------------------------------------------------------------------------------
_SCORER: Any = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one prediction, as ``rouge_score`` computes it (lower-cased ASCII words,
    Porter stemming)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score.rouge_scorer import RougeScorer

        _SCORER = RougeScorer(["rougeL"], use_stemmer=True)
    return float(_SCORER.score(reference, prediction)["rougeL"].fmeasure)


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood of the labelled (response) tokens, and their count.

    Logits are aligned with ``labels`` from the right: methods that prepend positions (virtual
    tokens) return longer logits whose extra positions come first and are never labelled.
    """
    logits = logits[:, -labels.shape[1]:].float()
    targets = labels[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=IGNORE, reduction="sum")
    return float(nll), int((targets != IGNORE).sum())


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompts: list[list[int]], pad_id: int,
                    eos_ids: list[int], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of token-id prompts, batched with left padding, cut at the first EOS."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                  do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=eos_ids,
                  temperature=None, top_p=None, top_k=None)
    from harness.models import autocast_context

    with autocast_context(device):
        try:
            out = model.generate(**kwargs)
        except NotImplementedError:
            # A model that refuses incremental decoding (a virtual prompt prepended on every call)
            # is decoded without a key/value cache: every step recomputes the whole sequence.
            out = model.generate(**kwargs, use_cache=False)
    result = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
        result.append(row[:cut])
    return result


def eos_ids(tokenizer: Any, model: torch.nn.Module) -> list[int]:
    """Token ids that end a generation: the tokenizer's EOS and the model's generation config's
    (chat models may end turns with a token other than EOS)."""
    config = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(config if isinstance(config, (list, tuple)) else [config])}
    found = sorted(i for i in ids if isinstance(i, int))
    if not found:
        raise ValueError("neither the tokenizer nor the model names an EOS token to end generations")
    return found


class Batch(dict):
    """A collated batch: tensors as items (all the model gets), the rows' evaluation extras
    (prompt ids, reference text) in ``meta``."""

    meta: list[dict[str, Any]]


# -- the task ---------------------------------------------------------------------------------------
class InstructionTask(Task):
    group: ClassVar[str] = "instruction"
    model_kind: ClassVar[str] = "causal-lm"
    default_model: ClassVar[str] = "smollm2"
    num_labels: ClassVar[int] = 0                  # no classification head: the LM head is scored
    # evaluate_before: also score the model as training starts (recorded as metrics_before; for
    # LoRA-style methods that is the base model, the zero-shot baseline a gain is measured from).
    options: ClassVar[dict[str, Any]] = {"max_new_tokens": 64, "evaluate_before": False}
    in_group: ClassVar[bool] = True
    relpath: ClassVar[str] = ""                    # under <data root>/instruction/
    parse: ClassVar[Callable[[Any, str], list[Instruction]]] = staticmethod(parse_alpaca)
    url: ClassVar[str] = ""                        # the same file online, at the manifest's commit

    def __init__(self, options: dict[str, Any] | None = None):
        super().__init__(options)
        n = self.params["max_new_tokens"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{self.name}: max_new_tokens must be a positive integer, got {n!r}")
        before = self.params["evaluate_before"]
        if not isinstance(before, bool):
            raise ValueError(f"{self.name}: evaluate_before must be true or false, got {before!r}")
        self.evaluate_before_training = before

    # -- data ---------------------------------------------------------------------------------------
    def local_file(self, data_dir: str | None) -> Path | None:
        root = data_root(data_dir)
        if root is None:
            return None
        path = root / "instruction" / self.relpath
        return path if path.is_file() else None

    def read_file(self, path: Path) -> list[Instruction]:
        out: list[Instruction] = []
        if path.suffix == ".jsonl":
            for lineno, row in read_jsonl(path):
                out += type(self).parse(row, f"{path}:{lineno}")
        else:
            for i, row in enumerate(read_json_list(path)):
                out += type(self).parse(row, f"{path}: record {i}")
        if not out:
            raise MalformedData(f"{path}: no examples with a non-empty output")
        return out

    @staticmethod
    def hub_allowed() -> bool:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        return not offline and importlib.util.find_spec("datasets") is not None

    def load_hub(self) -> list[Instruction]:
        from datasets import load_dataset  # optional dependency: pip install peft-harness[hub]

        ds = load_dataset("json", data_files=self.url, split="train")
        out: list[Instruction] = []
        for i, row in enumerate(ds):
            out += type(self).parse(row, f"{self.url}: record {i}")
        return out

    def _missing(self, data_dir: str | None) -> str:
        root = data_root(data_dir)
        where = f"{root}/instruction/{self.relpath}" if root else \
            f"$HARNESS_DATA_DIR/instruction/{self.relpath} (HARNESS_DATA_DIR is not set)"
        return (f"no data for {self.name}: put the file at {where} (or pass --data-dir), or go "
                f"online with `pip install datasets` to read {self.url}")

    def examples(self, data_dir: str | None = None) -> list[Instruction]:
        """Every example of the dataset, both splits, in file order."""
        path = self.local_file(data_dir)
        if path is not None:
            return self.read_file(path)
        if self.hub_allowed():
            try:
                return self.load_hub()
            except MalformedData:
                raise
            except Exception as e:  # network, missing file
                raise DataUnavailable(f"{self._missing(data_dir)}; the download failed: {e}") from e
        raise DataUnavailable(self._missing(data_dir))

    def load(self, split: str, data_dir: str | None = None) -> list[Instruction]:  # type: ignore[override]
        """The examples of ``split`` (``train`` or ``dev``), in file order."""
        if split not in (self.train_split, *self.eval_splits):
            raise ValueError(f"{self.name} has splits {self.train_split!r} and "
                             f"{self.eval_splits[0]!r}, not {split!r}")
        dev = split != self.train_split
        return [ex for ex in self.examples(data_dir) if held_out(ex) == dev]

    def availability(self, data_dir: str | None = None) -> str | None:
        if self.local_file(data_dir) is not None or self.hub_allowed():
            return None
        return self._missing(data_dir)

    # -- encoding -----------------------------------------------------------------------------------
    def encode(self, tokenizer: Any, examples: list[Instruction], max_length: int) -> list[dict[str, Any]]:
        """Prompt + response ids, labels -100 on the prompt; cut from the end at ``max_length``.

        Rows also carry ``prompt_length`` and ``reference`` (the full output) for evaluation; the
        collator keeps those out of the model's inputs. The tokenizer is kept for generation.
        """
        self.tokenizer = tokenizer
        chat = has_chat_template(tokenizer)
        rows, dropped, truncated = [], 0, 0
        for ex in examples:
            prompt, response = format_example(tokenizer, ex)
            # A chat template writes its own special tokens; the Alpaca prompt gets the
            # tokenizer's usual ones (BOS for Llama-style tokenizers), as Stanford Alpaca did.
            p = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
            r = tokenizer(response, add_special_tokens=False)["input_ids"]
            room = max_length - len(p)
            if room <= 0 or not r:
                dropped += 1
                continue
            truncated += len(r) > room
            r = r[:room]
            rows.append({"input_ids": p + r, "attention_mask": [1] * (len(p) + len(r)),
                         "labels": [IGNORE] * len(p) + r, "prompt_length": len(p),
                         "instruction": ex.user, "reference": ex.output})
        # Which split these are (the split is a function of content); "examples" when mixed.
        held = {held_out(ex) for ex in examples}
        split = "examples" if len(held) != 1 else (self.eval_splits[0] if held == {True} else self.train_split)
        if dropped:
            print(f"{self.name}: dropped {dropped} of {len(examples)} {split} examples whose prompt "
                  f"leaves no room for the response within max_length {max_length}", file=sys.stderr)
        self.notes = {**getattr(self, "notes", {}), split: {
            "encoded": len(rows), "dropped_prompt_too_long": dropped, "response_truncated": truncated}}
        return rows

    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], Batch]:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        def collate(rows: list[dict[str, Any]]) -> Batch:
            width = max(len(r["input_ids"]) for r in rows)

            def pad(key: str, fill: int) -> torch.Tensor:
                return torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows])

            batch = Batch(input_ids=pad("input_ids", pad_id), attention_mask=pad("attention_mask", 0),
                          labels=pad("labels", IGNORE))
            batch.meta = [{"prompt_ids": r["input_ids"][:r["prompt_length"]],
                           "instruction": r["instruction"], "reference": r["reference"]} for r in rows]
            return batch

        return collate

    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: Iterator[Batch],
                 forward: Callable[[dict[str, torch.Tensor]], Any]) -> dict[str, float]:
        """Response loss and perplexity (token-weighted), and ROUGE-L F1 of greedy generations."""
        tok = getattr(self, "tokenizer", None)
        if tok is None:
            raise RuntimeError(f"{self.name}: evaluate needs the tokenizer; call encode first")
        eos = eos_ids(tok, model)
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
        nll, count, lines, scores = 0.0, 0, [], []
        for batch in batches:
            meta = getattr(batch, "meta", None)
            if meta is None:
                raise TypeError(f"{self.name}: batches must come from this task's collator (they carry "
                                f"the prompts and references)")
            s, n = response_nll(forward(batch).logits, batch["labels"])
            nll, count = nll + s, count + n
            outs = greedy_generate(model, [m["prompt_ids"] for m in meta], pad, eos,
                                   int(self.params["max_new_tokens"]))
            for m, ids in zip(meta, outs):
                text = tok.decode(ids, skip_special_tokens=True).strip()
                scores.append(rouge_l(text, m["reference"]))
                lines.append(json.dumps({"instruction": m["instruction"], "reference": m["reference"],
                                         "generation": text, "rougeL": scores[-1]}, ensure_ascii=False))
        if not count:
            raise ValueError(f"{self.name}: no response tokens to evaluate")
        self.add_artifact("generations.jsonl", "\n".join(lines) + "\n")
        loss = nll / count
        return {"rougeL": sum(scores) / len(scores), "loss": loss, "perplexity": math.exp(loss)}

    def predictions(self, logits: torch.Tensor) -> Any:
        """The next-token choice at every position (what the merge check compares)."""
        return logits.float().argmax(-1).cpu().numpy()

    def score(self, metrics: dict[str, float]) -> float:
        """ROUGE-L F1 (loss and perplexity are not on a 0-1 scale, so they stay out of the mean)."""
        return float(metrics["rougeL"])

    def data_notes(self) -> dict[str, Any]:
        """Per split: examples encoded, dropped (no room for a response), truncated."""
        return dict(getattr(self, "notes", {}))


@register_task
class CodeAlpaca2k(InstructionTask):
    name = "instruction/code_alpaca_2k"
    relpath = "code_alpaca_2k/code_alpaca_2k.json"
    url = ("https://raw.githubusercontent.com/sahil280114/codealpaca/"
           "2f78ddc5c682ed6738ad092bbbfa59ba915afcb0/data/code_alpaca_2k.json")


@register_task
class LlamaFactoryDemo(InstructionTask):
    name = "instruction/llamafactory_demo"
    relpath = "llamafactory_demo/alpaca_en_demo.json"
    url = ("https://raw.githubusercontent.com/hiyouga/LLaMA-Factory/"
           "ff6d4d12eeb035d6ce06805a5733dd7b29f2ac30/data/alpaca_en_demo.json")


@register_task
class AlpacaEval(InstructionTask):
    name = "instruction/alpaca_eval"
    in_group = False
    relpath = "alpaca_eval/text_davinci_003/model_outputs.json"
    url = ("https://raw.githubusercontent.com/tatsu-lab/alpaca_eval/"
           "cd543a149df89434d8a54582c0151c0b945c3d20/results/text_davinci_003/model_outputs.json")


@register_task
class AlpacaSeedTasks(InstructionTask):
    name = "instruction/alpaca_seed_tasks"
    in_group = False
    relpath = "alpaca_seed_tasks/seed_tasks.jsonl"
    parse = staticmethod(parse_instances)
    url = ("https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/"
           "761dc5bfbdeeffa89b8bff5d038781a4055f796a/seed_tasks.jsonl")


@register_task
class SelfInstructUserOriented(InstructionTask):
    name = "instruction/self_instruct_user_oriented"
    in_group = False
    relpath = "self_instruct_user_oriented/user_oriented_instructions.jsonl"
    parse = staticmethod(parse_instances)
    url = ("https://raw.githubusercontent.com/yizhongw/self-instruct/"
           "0b26ccaa415992100fa32df62d41b994cf928e23/human_eval/user_oriented_instructions.jsonl")
