"""Method discovery through the `harness.methods` entry-point group, and the core's neutrality."""
from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness.plugins import BrokenMethodError, UnknownMethodError, discover_methods, get_method
from helpers import changed, snapshot, tiny_bert, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """An installed-looking distribution outside this repository that registers `head_only`."""
    pkg = tmp_path / "acme_peft"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from harness import Method, hookimpl

        class HeadOnly(Method):
            """Trains only the task head (a linear probe)."""
            name = "head_only"
            summary = "linear probe"
            defaults = {"note": "x"}

            @hookimpl
            def inject(self, model, ctx):
                for p in model.parameters():
                    p.requires_grad_(False)

            @hookimpl
            def merge(self, model, ctx):
                return model
    '''))
    dist = tmp_path / "acme_peft-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-peft\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[harness.methods]\nhead_only = acme_peft:HeadOnly\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "head_only"
    sys.modules.pop("acme_peft", None)


def test_third_party_method_is_discovered_and_trains(third_party):
    assert third_party in discover_methods()
    assert get_method(third_party).__module__ == "acme_peft"
    model = tiny_bert()
    before = snapshot(model)
    model, ctx, pm, _ = train(model, third_party, n_rows=16, max_steps=2)
    moved = changed(before, model)
    assert moved and all(ctx.is_head(n) for n in moved)


def test_broken_plugin_is_skipped_and_named_when_asked_for(tmp_path, monkeypatch):
    """One plugin that fails to import must not take the other methods down with it."""
    (tmp_path / "broken_peft.py").write_text("raise ImportError('needs a library that is absent')\n")
    dist = tmp_path / "broken_peft-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-peft\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[harness.methods]\nbroken = broken_peft:Broken\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match="method plugin 'broken' skipped"):
        methods = discover_methods()
    assert "broken" not in methods and {"full", "lora"} <= set(methods)
    assert get_method("lora").name == "lora"
    with pytest.raises(BrokenMethodError, match="'broken' is registered but cannot be used: "
                                                "broken_peft:Broken failed to import: ImportError"):
        get_method("broken")
    sys.modules.pop("broken_peft", None)


def test_builtin_methods_are_entry_points():
    methods = discover_methods()
    assert {"full", "lora"} <= set(methods)
    for name, cls in methods.items():
        assert cls.name == name, f"entry point {name} names class with name {cls.name!r}"
        assert cls.__doc__ or sys.modules[cls.__module__].__doc__, f"{name} has no docstring"


def test_unknown_method_error_lists_available():
    with pytest.raises(UnknownMethodError, match="unknown method 'nosuch'; available: .*lora"):
        get_method("nosuch")


def test_core_names_no_method():
    """No method's name appears in harness/ as a word: methods act only through hooks."""
    names = [n for n in discover_methods() if n != "full"]  # 'full' is also a profile name
    hits = []
    for path in (ROOT / "harness").rglob("*.py"):
        text = path.read_text()
        for n in names:
            if re.search(rf"\b{re.escape(n)}\b", text):
                hits.append(f"{path.name}: {n}")
        if re.search(r"""["']full["']""", text):
            hits.append(f"{path.name}: 'full'")
    assert not hits, hits


def test_full_fine_tuning_trains_every_parameter():
    model = tiny_bert()
    before = snapshot(model)
    model, ctx, pm, out = train(model, "full", n_rows=16, max_steps=1, weight_decay=0.1)
    assert out["throughput"]["steps"] == 1 and torch.isfinite(torch.tensor(out["loss_curve"])).all()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not frozen
    # every tensor that received a gradient moved (embeddings of unused tokens move by decay)
    assert len(changed(before, model)) == len(before)
