"""Instruction suite: templates, response-only labels, truncation, data formats and errors,
ROUGE-L, perplexity by hand, batched generation, runs through the runner (lora, dora,
prompt_tuning), the report, and `harness eval` on a local lm-eval task. Tiny models, offline."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tasks import TASKS, expand, get_task
from tasks.base import MalformedData
from tasks.instruction import (IGNORE, Instruction, InstructionTask, format_example, greedy_generate,
                               held_out, rouge_l)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ("Below is an instruction that describes a task, paired with an input that provides further "
         "context. Write a response that appropriately completes the request. ### Instruction: "
         "### Input: ### Response: Add the numbers. Name a colour of the sky. Translate the word "
         "into French. the cat sat on the mat. The answer is blue. chat le 2 and 3 is 5.")
TASK = "instruction/code_alpaca_2k"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def make_tokenizer(chat: bool = False):
    """A byte-level BPE trained here (lossless decode), with EOS/pad and optionally ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, show_progress=False,
                                  special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([WORDS], trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                  eos_token="<|im_end|>" if chat else "</s>")
    if chat:
        out.chat_template = CHATML
    return out


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return make_tokenizer(chat=True)


def tiny_lm(tok, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


EXAMPLES = [Instruction("Add the numbers.", "2 and 3", "5"),
            Instruction("Name a colour of the sky.", "", "The answer is blue."),
            Instruction("Translate the word into French.", "cat", "chat le chat, le chat sat on the mat")]


# -- templates ----------------------------------------------------------------------------------
def test_alpaca_template_without_a_chat_template(tok):
    prompt, response = format_example(tok, EXAMPLES[0])
    assert prompt == ("Below is an instruction that describes a task, paired with an input that provides "
                      "further context. Write a response that appropriately completes the request.\n\n"
                      "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:")
    assert response == "5</s>"
    prompt, response = format_example(tok, EXAMPLES[1])
    assert prompt == ("Below is an instruction that describes a task. Write a response that appropriately "
                      "completes the request.\n\n### Instruction:\nName a colour of the sky.\n\n### Response:")
    assert response == "The answer is blue.</s>"


def test_chat_template_when_the_tokenizer_has_one(chat_tok):
    prompt, response = format_example(chat_tok, EXAMPLES[0])
    assert prompt == "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n"
    assert response == "5<|im_end|>\n"
    prompt, _ = format_example(chat_tok, EXAMPLES[1])
    assert prompt == "<|im_start|>user\nName a colour of the sky.<|im_end|>\n<|im_start|>assistant\n"


# -- encoding, labels, truncation ---------------------------------------------------------------
@pytest.mark.parametrize("chat", [False, True])
def test_labels_are_ignored_exactly_on_prompt_and_padding(chat, tok, chat_tok):
    t = chat_tok if chat else tok
    task = get_task(TASK)
    rows = task.encode(t, EXAMPLES, max_length=512)
    batch = task.collator(t)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # only what the model takes
    assert len({len(r["input_ids"]) for r in rows}) == 3          # so two rows are padded
    for i, ex in enumerate(EXAMPLES):
        prompt, response = format_example(t, ex)
        p = t(prompt, add_special_tokens=not chat)["input_ids"]
        r = t(response, add_special_tokens=False)["input_ids"]
        n = len(p) + len(r)
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        assert ids[:len(p)].tolist() == p and ids[len(p):n].tolist() == r
        assert (labels[:len(p)] == IGNORE).all()                  # prompt: not scored
        assert labels[len(p):n].tolist() == r                     # response (and its EOS): scored
        assert (labels[n:] == IGNORE).all() and (mask[n:] == 0).all() and (mask[:n] == 1).all()
        assert t.decode(labels[len(p):n].tolist()) == response
        assert batch.meta[i]["prompt_ids"] == p and batch.meta[i]["reference"] == ex.output


def test_truncation_keeps_the_prompt_and_drops_examples_without_room(tok, capsys):
    task = get_task(TASK)
    ex = EXAMPLES[2]
    prompt, response = format_example(tok, ex)
    p = tok(prompt)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    assert len(r) > 3
    (row,) = task.encode(tok, [ex], max_length=len(p) + 3)
    assert row["input_ids"] == p + r[:3] and row["labels"] == [IGNORE] * len(p) + r[:3]
    assert row["reference"] == ex.output                          # ROUGE compares the whole output
    assert task.encode(tok, [ex], max_length=len(p)) == []
    assert "dropped 1 of 1" in capsys.readouterr().err
    split = "dev" if held_out(ex) else "train"
    assert task.data_notes()[split] == {"encoded": 0, "dropped_prompt_too_long": 1, "response_truncated": 0}


# -- data ---------------------------------------------------------------------------------------
def write_data(root: Path) -> dict[str, list[Instruction]]:
    """The five layouts, each with rows the reader must keep and one it must skip (empty output)."""
    base = root / "instruction"
    alpaca = [{"instruction": f"Task {i}", "input": "x" if i % 2 else "", "output": f"Answer {i}"}
              for i in range(40)] + [{"instruction": "Say nothing", "input": "", "output": ""}]
    instances = [{"id": f"t{i}", "instruction": f"Task {i}",
                  "instances": [{"input": f"in {i}", "output": f"out {i}"}] * (1 + (i == 0))}
                 for i in range(30)]
    files = {
        "code_alpaca_2k/code_alpaca_2k.json": json.dumps(alpaca),
        "llamafactory_demo/alpaca_en_demo.json": json.dumps(alpaca),
        "alpaca_eval/text_davinci_003/model_outputs.json": json.dumps(
            [{"dataset": "x", "instruction": r["instruction"], "output": r["output"], "generator": "g"}
             for r in alpaca]),
        "alpaca_seed_tasks/seed_tasks.jsonl": "\n".join(json.dumps(r) for r in instances) + "\n",
        "self_instruct_user_oriented/user_oriented_instructions.jsonl":
            "\n".join(json.dumps(r) for r in instances) + "\n",
    }
    for rel, text in files.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_text(text)
    kept = [Instruction(r["instruction"], r["input"], r["output"]) for r in alpaca[:40]]
    per_instance = [Instruction(r["instruction"], inst["input"], inst["output"])
                    for r in instances for inst in r["instances"]]
    return {"instruction/code_alpaca_2k": kept, "instruction/llamafactory_demo": kept,
            "instruction/alpaca_eval": [Instruction(e.instruction, "", e.output) for e in kept],
            "instruction/alpaca_seed_tasks": per_instance,
            "instruction/self_instruct_user_oriented": per_instance}


def test_every_format_loads_into_disjoint_train_and_dev(tmp_path):
    expected = write_data(tmp_path)
    assert set(expected) == {n for n in TASKS if n.startswith("instruction/")}
    for name, examples in expected.items():
        task = get_task(name)
        train, dev = task.load("train", str(tmp_path)), task.load("dev", str(tmp_path))
        assert sorted(train + dev, key=repr) == sorted(examples, key=repr), name
        assert dev and train and all(held_out(e) for e in dev) and not any(held_out(e) for e in train)
        assert task.availability(str(tmp_path)) is None


def test_held_out_split_is_about_a_tenth_and_fixed_by_content():
    exs = [Instruction(f"instruction {i}", "", "x") for i in range(2000)]
    share = sum(map(held_out, exs)) / len(exs)
    assert 0.08 < share < 0.12
    assert held_out(Instruction("instruction 7", "", "a")) == held_out(Instruction("instruction 7", "", "b"))


def test_shared_data_loads_when_present():
    from tasks.base import data_root

    root = data_root()
    if root is None or not (root / "instruction").is_dir():
        pytest.skip("HARNESS_DATA_DIR/instruction not present")
    sizes = {"instruction/code_alpaca_2k": 2015, "instruction/llamafactory_demo": 999,
             "instruction/alpaca_eval": 803, "instruction/alpaca_seed_tasks": 175,
             "instruction/self_instruct_user_oriented": 252}  # rows with a non-empty output
    for name, n in sizes.items():
        task = get_task(name)
        train, dev = task.load("train"), task.load("dev")
        assert len(train) + len(dev) == n and 0.05 < len(dev) / n < 0.15, name


@pytest.mark.parametrize("name,rel,text,where,what", [
    (TASK, "code_alpaca_2k/code_alpaca_2k.json",
     '[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', ": record 1", "'output' is missing"),
    (TASK, "code_alpaca_2k/code_alpaca_2k.json",
     '[{"instruction": "a", "input": 3, "output": "b"}]', ": record 0", "'input' is int"),
    (TASK, "code_alpaca_2k/code_alpaca_2k.json", '{"instruction": "a"}', "", "expected a JSON list"),
    (TASK, "code_alpaca_2k/code_alpaca_2k.json", '[{"instruction": "a",\n "output": }]', ":2", "not valid JSON"),
    (TASK, "code_alpaca_2k/code_alpaca_2k.json", '[["a", "b"]]', ": record 0", "expected an object"),
    ("instruction/alpaca_seed_tasks", "alpaca_seed_tasks/seed_tasks.jsonl",
     '{"instruction": "a", "instances": [{"input": "", "output": "b"}]}\n{"instruction": "c", "instances": []}\n',
     ":2", "'instances' must be a non-empty list"),
    ("instruction/alpaca_seed_tasks", "alpaca_seed_tasks/seed_tasks.jsonl",
     '{"instruction": "a", "instances": [{"input": ""}]}\n', ":1, instance 0", "'output' is missing"),
    ("instruction/self_instruct_user_oriented", "self_instruct_user_oriented/user_oriented_instructions.jsonl",
     '{"instruction": "a", "instances": [{"input": "", "output": "b"}]}\nnot json\n', ":2", "not valid JSON"),
])
def test_malformed_rows_name_the_file_and_row(tmp_path, name, rel, text, where, what):
    path = tmp_path / "instruction" / rel
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(MalformedData) as e:
        get_task(name).load("train", str(tmp_path))
    assert str(e.value).startswith(f"{path}{where}") and what in str(e.value), str(e.value)


def test_missing_data_says_where_to_put_it(tmp_path):
    task = get_task(TASK)
    why = task.availability(str(tmp_path))
    assert why and f"{tmp_path}/instruction/code_alpaca_2k/code_alpaca_2k.json" in why


def test_bad_options_fail_clearly():
    for bad in (0, -1, "many", 2.5):
        with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
            get_task(TASK, {"max_new_tokens": bad})
    with pytest.raises(ValueError, match="no option 'max_tokens'"):
        get_task(TASK, {"max_tokens": 3})
    with pytest.raises(ValueError, match="evaluate_before must be true or false, got 'yes'"):
        get_task(TASK, {"evaluate_before": "yes"})
    assert not get_task(TASK).evaluate_before_training
    assert get_task(TASK, {"evaluate_before": True}).evaluate_before_training


def test_group_is_the_alpaca_format_training_sets():
    assert expand("instruction") == ["instruction/code_alpaca_2k", "instruction/llamafactory_demo"]
    assert expand("instruction/alpaca_eval") == ["instruction/alpaca_eval"]
    for name in (n for n in TASKS if n.startswith("instruction/")):
        t = get_task(name)
        assert isinstance(t, InstructionTask) and t.model_kind == "causal-lm" and t.default_model == "smollm2"


# -- metrics ------------------------------------------------------------------------------------
def test_rouge_l_matches_rouge_score_and_hand_values():
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    pairs = [("the cat on the mat", "the cat sat on the mat"), ("cats running", "cat runs"),
             ("def f(x): return x + 1", "def f(y): return y + 1"), ("", "anything"), ("blue", "red")]
    for pred, ref in pairs:
        assert rouge_l(pred, ref) == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure)
    # LCS 5 of 5 predicted and 6 reference words: P = 1, R = 5/6, F = 10/11.
    assert rouge_l(*pairs[0]) == pytest.approx(10 / 11)
    assert rouge_l(*pairs[1]) == 1.0  # stemming: cats/cat, running/runs
    # f x return x 1 against f y return y 1: LCS "def f return 1" = 4 of 6 each.
    assert rouge_l(*pairs[2]) == pytest.approx(4 / 6)
    assert rouge_l(*pairs[3]) == 0.0 and rouge_l(*pairs[4]) == 0.0


def test_perplexity_is_exp_of_the_token_weighted_response_nll(tok):
    task = get_task(TASK, {"max_new_tokens": 2})
    model = tiny_lm(tok)
    rows = task.encode(tok, EXAMPLES, max_length=512)
    collate = task.collator(tok)
    metrics = task.evaluate(model, [collate(rows[:2]), collate(rows[2:])], lambda b: model(**b))
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in rows:  # one at a time, no padding
            ids = torch.tensor([row["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            for t in range(row["prompt_length"], len(row["input_ids"])):
                nll -= float(logp[t - 1, row["input_ids"][t]])
                count += 1
    assert count == sum(len(r["input_ids"]) - r["prompt_length"] for r in rows)
    assert metrics["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert 0.0 <= metrics["rougeL"] <= 1.0


def test_response_loss_is_aligned_when_a_method_prepends_virtual_tokens(tok):
    from helpers import apply_method

    task = get_task(TASK, {"max_new_tokens": 1})
    model, _, _ = apply_method(tiny_lm(tok), "prompt_tuning", {"num_virtual_tokens": 4})
    model.eval()
    rows = task.encode(tok, EXAMPLES, max_length=512)
    collate = task.collator(tok)
    metrics = task.evaluate(model, [collate(rows)], lambda b: model(**b))
    # The model's own loss: the virtual prompt extends labels with -100 in front of each row.
    with torch.no_grad():
        per_row = [(float(model(**collate([r])).loss), len(r["input_ids"]) - r["prompt_length"]) for r in rows]
    assert metrics["loss"] == pytest.approx(sum(l * n for l, n in per_row) / sum(n for _, n in per_row), rel=1e-5)


# -- generation ---------------------------------------------------------------------------------
def manual_greedy(model, prompt: list[int], eos: int, n: int) -> list[int]:
    """One prompt, no padding, no cache: argmax of the last position, n times or until EOS."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == eos:
                break
            ids.append(nxt)
            out.append(nxt)
    return out


@pytest.mark.parametrize("method", [None, "prompt_tuning"])
def test_batched_left_padded_generation_equals_one_by_one_greedy(tok, method):
    from helpers import apply_method

    model = tiny_lm(tok, seed=3)
    if method:
        model, _, _ = apply_method(model, method, {"num_virtual_tokens": 3})
        model.eval()
        with pytest.raises(NotImplementedError):  # so the no-cache fallback is what runs below
            model.generate(input_ids=torch.tensor([[5, 6]]), max_new_tokens=2, pad_token_id=0)
    prompts = [tok(format_example(tok, e)[0])["input_ids"] for e in EXAMPLES]
    assert len({len(p) for p in prompts}) == 3
    got = greedy_generate(model, prompts, tok.pad_token_id, [tok.eos_token_id], 6)
    assert got == [manual_greedy(model, p, tok.eos_token_id, 6) for p in prompts]
    assert all(len(g) == 6 for g in got)  # a random model rarely says EOS; the test compares 6 steps


# -- through the runner -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("model")
    tiny_lm(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["lora", "dora", "prompt_tuning"])
def test_runs_through_the_runner_and_writes_generations(method, saved_model, tmp_path):
    from harness.config import resolve
    from harness.plugins import get_method
    from harness.run import run_and_record

    write_data(tmp_path / "data")
    config = resolve(method, TASK, get_method(method).defaults, "smoke",
                     {"max_train_samples": 16, "max_eval_samples": 3, "max_length": 128,
                      "batch_size": 4, "eval_batch_size": 2, "max_new_tokens": 3},
                     model=str(saved_model), device="cpu", data_dir=str(tmp_path / "data"),
                     output_dir=str(tmp_path / "runs"))
    assert config.task_params == {"max_new_tokens": 3} and config.train.merge_check_samples == 4
    record = run_and_record(config)
    assert record["status"] == "ok", record.get("traceback")
    m = record["metrics"]
    assert set(m) == {"rougeL", "loss", "perplexity"}
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"])) and record["score"] == m["rougeL"]
    assert record["params"]["head"] == 0 and record["params"]["method"] > 0
    assert record["data"]["train"]["encoded"] == 16 and record["data"]["dev"]["encoded"] == 3
    assert record["artifacts"] == [f"{record['run_id']}/dev-generations.jsonl"]  # relative: movable
    path = tmp_path / "runs" / record["artifacts"][0]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 3 and {"instruction", "reference", "generation", "rougeL"} <= set(lines[0])
    assert sum(x["rougeL"] for x in lines) / 3 == pytest.approx(m["rougeL"])
    assert record["merge"]["samples"] == 3 and record["merge"]["max_abs_diff"] < 1e-3


def test_evaluate_before_scores_the_base_model(saved_model, tmp_path):
    """LoRA starts as the base model, so its metrics_before are the base model's: the same as the
    metrics of a run that never moves it (lr 0), and different from what training reached."""
    from harness.config import resolve
    from harness.plugins import get_method
    from harness.run import run_and_record

    write_data(tmp_path / "data")

    def run(**overrides):
        config = resolve("lora", TASK, get_method("lora").defaults, "smoke",
                         {"max_train_samples": 16, "max_eval_samples": 3, "max_length": 128,
                          "batch_size": 4, "eval_batch_size": 2, "max_new_tokens": 3, **overrides},
                         model=str(saved_model), device="cpu", data_dir=str(tmp_path / "data"),
                         output_dir=str(tmp_path / "runs"))
        record = run_and_record(config)
        assert record["status"] == "ok", record.get("traceback")
        return record

    trained = run(evaluate_before=True, lr=1e-2)
    untouched = run(lr=0.0)
    assert "metrics_before" not in untouched
    assert trained["metrics_before"] == pytest.approx(untouched["metrics"], rel=1e-5)
    assert trained["metrics_before"]["loss"] != pytest.approx(trained["metrics"]["loss"], rel=1e-3)
    assert sorted(trained["artifacts"]) == [f"{trained['run_id']}/before-dev-generations.jsonl",
                                            f"{trained['run_id']}/dev-generations.jsonl"]


def test_report_shows_rouge_in_percent_and_perplexity_as_is():
    from harness.report import runs_frame, summary_frame

    record = {"method": "lora", "task": TASK, "profile": "smoke", "status": "ok", "score": 0.25,
              "finished_at": "2024-01-01T00:00:00", "metrics": {"rougeL": 0.25, "loss": 2.0, "perplexity": 7.389},
              "params": {"method": 10, "head": 0, "share": 0.1}}
    table = summary_frame(runs_frame([record]))
    row = table.loc["lora"]
    assert row["code_alpaca_2k rougeL"] == 25.0 and row["code_alpaca_2k ppl"] == 7.39
    assert row["code_alpaca_2k loss"] == 2.0 and row["avg score"] == 25.0
    # a model scored before training too: its loss and perplexity stay unscaled as well
    record["metrics_before"] = {"rougeL": 0.125, "loss": 3.0, "perplexity": 20.09}
    row = summary_frame(runs_frame([record])).loc["lora"]
    assert row["code_alpaca_2k rougeL before"] == 12.5 and row["code_alpaca_2k ppl before"] == 20.09
    assert row["code_alpaca_2k loss before"] == 3.0


# -- lm-evaluation-harness ----------------------------------------------------------------------
MC_DOCS = [{"question": "What is blue?", "choices": ["the sky", "the cat", "the mat"], "answer": 0},
           {"question": "Where sat the cat?", "choices": ["on the mat", "in the sky"], "answer": 0},
           {"question": "What is 2 and 3?", "choices": ["2", "3", "5"], "answer": 2},
           {"question": "Translate cat.", "choices": ["chat", "le"], "answer": 0}]


def loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenised as lm-eval's HF backend does (whole minus context)."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole[:-1]])).logits[0].float(), -1)
    return float(sum(logp[t - 1, whole[t]] for t in range(len(ctx), len(whole))))


def test_harness_eval_runs_a_local_lm_eval_task_offline(saved_model, tok, tmp_path):
    pytest.importorskip("lm_eval")
    from harness.cli import main

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    out = tmp_path / "eval.json"
    rc = main(["eval", str(saved_model), "--tasks", "tiny_mc", "--include-path", str(tasks),
               "--device", "cpu", "--batch-size", "2", "--output", str(out), "--log-samples"])
    assert rc == 0
    results = json.loads(out.read_text())
    acc = results["results"]["tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and results["n-samples"]["tiny_mc"]["effective"] == len(MC_DOCS)

    # By hand: each choice's log-likelihood after "context" + " " (lm-eval's target delimiter).
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(saved_model).eval()
    correct = []
    by_doc = {json.dumps(s["doc"], sort_keys=True): s for s in results["samples"]["tiny_mc"]}
    for doc in MC_DOCS:
        context = f"Question: {doc['question']}\nAnswer:"
        ll = [loglikelihood(model, tok, context, " " + c) for c in doc["choices"]]
        sample = by_doc[json.dumps(doc, sort_keys=True)]
        assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(ll, abs=1e-4)
        correct.append(float(max(range(len(ll)), key=ll.__getitem__) == doc["answer"]))
    assert acc == pytest.approx(sum(correct) / len(correct))


def test_harness_eval_refuses_bad_input(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from harness.cli import main
    from harness.lm_eval_bridge import EvalError, resolve_model_path

    assert main(["eval", str(tmp_path / "nope"), "--tasks", "x"]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "rec.json").write_text(json.dumps({"run_id": "r", "status": "ok"}))
    with pytest.raises(EvalError, match="re-run it with --save"):
        resolve_model_path(str(tmp_path / "rec.json"))
