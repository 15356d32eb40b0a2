"""The long-context suite: passkey prompts, perplexity, and runs through the normal runner
(synthetic essays, a tokenizer trained on them and a tiny Llama: no download, seconds)."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tasks import get_task
from tasks.longcontext import ESSAYS, INSTRUCTION, LongContext, Probe, needle

WORDS = ("the of and to in is that it was for on are with as his they at be this from have or by "
         "one had not but what all were when we there can an your which their said if do will each "
         "about how up out them then she many some so these would other into has more her two like "
         "him see time could no make than first been its who now people my made over did down only "
         "way find use may water long little very after words called just where most know").split()


def write_essays(root: Path, n: int = 8, sentences: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder = root / ESSAYS
    folder.mkdir(parents=True)
    for i in range(n):
        text = " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "."
                        for _ in range(sentences))
        (folder / f"essay{i:02d}.txt").write_text(text)
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(write_essays(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [p.read_text() for p in sorted((Path(data_dir) / ESSAYS).glob("*.txt"))]
    prompt = f"{INSTRUCTION}\n{needle('12345')}\nWhat is the pass key? The pass key is"
    tok.train_from_iterator(texts + [prompt] * 50, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_lm(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def task(**options) -> LongContext:
    return get_task("longcontext", options)


# -- data and prompts ----------------------------------------------------------------------------
def test_essays_split_into_train_and_held_out(data_dir):
    t = task()
    train, dev = t.documents("train", data_dir), t.documents("dev", data_dir)
    assert len(train) == 6 and len(dev) == 2  # every 4th essay held out
    assert not {d.name for d in train} & {d.name for d in dev}
    assert t.availability(data_dir) is None
    assert "at least 4" in t.availability("/nonexistent")


def test_training_rows_are_full_length_chunks_labelled_with_their_ids(data_dir, tokenizer):
    t = task()
    rows = t.encode(tokenizer, t.load("train", data_dir), 64)
    assert len(rows) > 10
    assert all(len(r["input_ids"]) == 64 and r["labels"] == r["input_ids"] for r in rows)


@pytest.mark.parametrize("length", [128, 256])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_passkey_prompt_has_the_key_at_the_depth_and_the_length(data_dir, tokenizer, length, depth):
    t = task()
    t.load("dev", data_dir)
    row = t.passkey_row(tokenizer, Probe("passkey", length, depth, 0))
    meta = row["meta"]
    key = meta["key"]
    assert len(key) == 5 and key.isdigit()
    text = tokenizer.decode(row["input_ids"])
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    assert needle in text and text.endswith(f"What is the pass key? The pass key is {key}")
    assert abs(len(row["input_ids"]) - length) <= max(4, 0.02 * length), len(row["input_ids"])
    # the key line sits at the stated depth of the haystack (snapped to a sentence end)
    hay_start = text.index("\n") + 1
    hay_end = text.rindex("\nWhat is the pass key?")
    hay_len = hay_end - hay_start - len(needle) - 1
    where = (text.index(needle) - hay_start) / hay_len
    assert abs(where - depth) < 0.15, where
    assert abs(meta["key_depth"] - depth) < 0.15
    # only the answer is labelled
    answer = [x for x in row["labels"] if x != -100]
    assert tokenizer.decode(answer) == f" {key}"


def test_passkey_prompts_are_deterministic_by_seed(data_dir, tokenizer):
    def rows(seed):
        t = task(seed=seed, passkey_lengths=[128], ppl_lengths=[64], ppl_samples=1)
        return t.encode(tokenizer, t.load("dev", data_dir), 64)

    a, b, c = rows(1), rows(1), rows(2)
    assert [r["input_ids"] for r in a] == [r["input_ids"] for r in b]
    keys = lambda rs: [r["meta"]["key"] for r in rs if r["meta"]["kind"] == "passkey"]
    assert keys(a) != keys(c) and len(set(keys(a))) > 1


def test_bad_options_fail_clearly():
    with pytest.raises(ValueError, match="no option"):
        task(bogus=1)
    with pytest.raises(ValueError, match="passkey_depths"):
        task(passkey_depths=[1.5])
    with pytest.raises(ValueError, match="passkey_lengths"):
        task(passkey_lengths="many")
    assert task(passkey_lengths="512,1024").passkey_lengths == [512, 1024]


# -- evaluation ----------------------------------------------------------------------------------
def test_perplexity_and_passkey_by_hand(data_dir, tokenizer):
    t = task(passkey_lengths=[96], passkey_depths=[0.0, 1.0], passkey_samples=1, ppl_lengths=[64],
             ppl_samples=3)
    rows = t.encode(tokenizer, t.load("dev", data_dir), 64)
    model = tiny_lm(len(tokenizer))
    collate = t.collator(tokenizer)
    batches = [collate(rows[i:i + 2]) for i in range(0, len(rows), 2)]
    metrics = t.evaluate(model, iter(batches), lambda b: model(**{k: v for k, v in b.items()}))
    assert set(metrics) == {"perplexity_64", "passkey_acc_96"}
    # perplexity: exp of the mean next-token loss over the three windows, computed directly
    windows = [r for r in rows if r["meta"]["kind"] == "ppl"]
    assert len(windows) == 3
    ids = torch.tensor([w["input_ids"] for w in windows])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert metrics["perplexity_64"] == pytest.approx(math.exp(float(nll)), rel=1e-4)
    assert 0 <= metrics["passkey_acc_96"] <= 1
    files = t.take_artifacts()
    assert set(files) == {"passkey.md", "passkey.csv", "passkey_heatmap.png"}
    assert files["passkey_heatmap.png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 96 |" in files["passkey.md"]


def test_passkey_is_correct_when_the_model_predicts_the_answer(data_dir, tokenizer):
    """The accuracy counts a prompt as solved exactly when every answer token is the argmax."""
    t = task(passkey_lengths=[96], passkey_depths=[0.5], passkey_samples=1, ppl_samples=0)
    (row,) = t.encode(tokenizer, t.load("dev", data_dir), 64)
    batch = t.collator(tokenizer)([row])
    labels = batch["labels"][0]

    class Oracle:  # logits that put the answer token first at every answer position
        def __init__(self, wrong_at: int | None = None):
            self.wrong_at = wrong_at

        def __call__(self, b):
            n = b["input_ids"].shape[1]
            logits = torch.zeros(1, n, len(tokenizer))
            answer_pos = [i for i in range(1, n) if labels[i] != -100]
            for j, i in enumerate(answer_pos):
                logits[0, i - 1, labels[i] if j != self.wrong_at else 0] = 5.0
            return type("Out", (), {"logits": logits})()

    assert t.evaluate(None, iter([batch]), Oracle())["passkey_acc_96"] == 1.0
    assert t.evaluate(None, iter([batch]), Oracle(wrong_at=2))["passkey_acc_96"] == 0.0


# -- through the normal runner -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "longlora"])
def test_runs_through_the_runner_with_before_and_after_metrics(method, data_dir, tokenizer, tmp_path):
    from harness.config import resolve
    from harness.plugins import get_method
    from harness.run import run_and_record

    model_dir = tmp_path / "tiny"
    tiny_lm(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    overrides = {"max_length": 64, "batch_size": 2, "grad_accum": 1, "max_steps": 2, "lr": 1e-3, "eval_batch_size": 2,
                 "max_train_samples": None, "max_eval_samples": None, "merge_check_samples": 2,
                 "passkey_lengths": [96, 128], "passkey_depths": [0.0, 1.0], "passkey_samples": 1,
                 "ppl_samples": 1}
    config = resolve(method, "longcontext", get_method(method).defaults, "smoke", overrides,
                     model=str(model_dir), device="cpu", data_dir=data_dir, output_dir=str(tmp_path / "runs"))
    assert config.task_params["passkey_lengths"] == [96, 128]
    record = run_and_record(config)
    assert record["status"] == "ok", record.get("traceback")
    for key in ("metrics", "metrics_before"):
        assert set(record[key]) == {"perplexity_96", "perplexity_128", "passkey_acc_96", "passkey_acc_128"}
    assert record["metrics"]["perplexity_96"] != record["metrics_before"]["perplexity_96"]  # training moved it
    names = {Path(p).name for p in record["artifacts"]}
    assert {"dev-passkey_heatmap.png", "before-dev-passkey_heatmap.png", "dev-passkey.md"} <= names
    assert record["merge"]["ok"] and record["merge"]["plain"]
    assert record["throughput"]["tokens"] == 2 * 2 * 64
    saved = json.loads((tmp_path / "runs" / f"{record['run_id']}.json").read_text())
    assert saved["metrics_before"] == record["metrics_before"]


# -- configuration -------------------------------------------------------------------------------
def test_task_options_and_per_task_method_settings_resolve_from_profile_and_set():
    from harness.config import ConfigError, resolve
    from harness.matrix import plan
    from harness.plugins import get_method

    lora = get_method("lora").defaults
    lc = resolve("lora", "longcontext", lora, "smoke", {"passkey_samples": 3})
    assert lc.task_params["passkey_lengths"] == [512, 1024] and lc.task_params["passkey_samples"] == 3
    assert lc.train.lr == 2e-4  # tasks.longcontext.methods.lora beats methods.lora
    glue = resolve("lora", "glue/rte", lora, "smoke", {"passkey_samples": 3})
    assert glue.train.lr == 5e-3 and glue.task_params == {}  # the option belongs to longcontext only
    assert lc.run_id() != resolve("lora", "longcontext", lora, "smoke").run_id()
    with pytest.raises(ConfigError, match="bogus"):
        plan(["lora"], "longcontext", "smoke", {"bogus": 1})
    assert plan(["lora"], "longcontext", "smoke", {"ppl_samples": 1}, data_dir="/nonexistent").cells


# -- report --------------------------------------------------------------------------------------
def test_report_orders_lengths_as_numbers_and_before_after_the_trained_figures():
    from harness.report import runs_frame, summary_frame
    from records_factory import fake_record

    # Records store metric keys alphabetically: passkey_acc_1k before passkey_acc_512.
    metrics = {"passkey_acc_1k": 0.4, "passkey_acc_2k": 0.2, "passkey_acc_512": 0.8,
               "perplexity_1k": 9.0, "perplexity_512": 10.0}
    rec = fake_record("lora", task="longcontext", acc=metrics,
                      metrics_before={k: v / 2 for k, v in metrics.items()})
    cols = [c for c in summary_frame(runs_frame([rec])).columns if c.startswith("longcontext")]
    assert cols == ["longcontext passkey acc 512", "longcontext passkey acc 1k", "longcontext passkey acc 2k",
                    "longcontext ppl 512", "longcontext ppl 1k",
                    "longcontext passkey acc 512 before", "longcontext passkey acc 1k before",
                    "longcontext passkey acc 2k before", "longcontext ppl 512 before", "longcontext ppl 1k before"]
