"""`harness export --format peft`: PEFT loads our adapter and predicts what our model predicted."""
from __future__ import annotations

import json

import pytest
import torch

from harness.config import RunConfig, TrainConfig
from harness.export import ExportError, export_peft, rebuild, save_adapter_state, trained_state
from harness.lowrank import adapted_modules

peft = pytest.importorskip("peft")


def _saved_run(tmp_path, method: str, params: dict) -> tuple:
    """Build a real adapted MiniLM the way `harness run --save` does, with non-trivial weights."""
    from harness.run import prepare
    from harness.plugins import get_method

    config = RunConfig(method=method, task="glue/sst2", device="cpu", train=TrainConfig(),
                       method_params={**get_method(method).defaults, **params})
    p = prepare(config, with_data=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, t in p.model.named_parameters():
            if t.requires_grad:
                t.add_(torch.randn(t.shape, generator=g) * 0.05)
    save_adapter_state(trained_state(p.model, p.plain_keys), config, tmp_path / "run")
    return p


@pytest.mark.parametrize("method,params,peft_type", [
    ("lora", {"r": 4}, "LORA"), ("lora", {"r": 4, "rank_scaling": "rs"}, "LORA"),
    ("lora_plus", {"r": 4}, "LORA"), ("dora", {"r": 4}, "LORA"), ("vera", {"r": 16}, "VERA"), ("adalora", {}, "ADALORA"),
])
def test_peft_loads_export_and_matches(tmp_path, method, params, peft_type):
    p = _saved_run(tmp_path, method, params)
    out = export_peft(tmp_path / "run", tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == peft_type and cfg["task_type"] == "SEQ_CLS"

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(p.loaded.path, num_labels=2)
    theirs = peft.PeftModel.from_pretrained(base, str(out)).eval()
    tok = AutoTokenizer.from_pretrained(p.loaded.path)
    batch = tok(["a fine film", "dull and long, far too long"], padding=True, return_tensors="pt")
    p.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, p.model(**batch).logits, rtol=1e-4, atol=1e-5)


def test_rebuild_restores_the_adapted_model(tmp_path):
    p = _saved_run(tmp_path, "lora", {"r": 4})
    again = rebuild(tmp_path / "run")
    mine = dict(adapted_modules(p.model))
    for name, layer in adapted_modules(again.model):
        assert torch.equal(layer.B, mine[name].B)


def test_method_without_peft_format_says_so(tmp_path):
    _saved_run(tmp_path, "full", {})
    with pytest.raises(ExportError, match="'full' has no Hugging Face PEFT format"):
        export_peft(tmp_path / "run", tmp_path / "peft")


def test_not_a_saved_run_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match="not a saved run"):
        export_peft(tmp_path, tmp_path / "out")
