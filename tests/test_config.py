"""Profiles, overrides and the matrix plan."""
from __future__ import annotations

import os

import pytest

from harness.config import ConfigError, RunConfig, parse_overrides, resolve
from harness.matrix import plan
from harness.plugins import get_method

LORA = get_method("lora").defaults


def test_resolution_order_profile_task_method_cli():
    c = resolve("lora", "glue/rte", LORA, "quick")
    assert c.train.max_length == 128 and c.train.epochs == 1      # profile tasks.glue/rte over train (64)
    assert c.train.lr == pytest.approx(2e-3)                      # profile methods.lora
    c = resolve("lora", "glue/rte", LORA, "quick", parse_overrides(["lr=1e-3", "lora.lr=5e-4", "lora.r=4"]))
    assert c.train.lr == pytest.approx(5e-4) and c.method_params["r"] == 4
    assert resolve("full", "glue/sst2", {}, "quick", {"r": 4}).method_params == {}  # r is not full's


def test_unknown_keys_and_profiles_are_config_errors():
    with pytest.raises(ConfigError, match="'bogus' is neither a training setting"):
        resolve("lora", "glue/sst2", LORA, "smoke", {"lora.bogus": 1})
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        resolve("lora", "glue/sst2", LORA, "nope")
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])


def test_run_id_depends_on_every_setting_and_round_trips():
    a = resolve("lora", "glue/sst2", LORA, "smoke")
    b = resolve("lora", "glue/sst2", LORA, "smoke", {"seed": 1})
    assert a.run_id() != b.run_id()
    assert a.run_id() == resolve("lora", "glue/sst2", LORA, "smoke").run_id()
    assert RunConfig.from_dict(a.to_dict()).run_id() == a.run_id()


@pytest.mark.skipif(not os.environ.get("HARNESS_DATA_DIR"), reason="HARNESS_DATA_DIR not set")
def test_glue_group_skips_unavailable_tasks_with_reasons(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = plan(["lora", "nosuch"], "glue", "smoke", {})
    assert set(p.skipped_tasks) == {"glue/qqp", "glue/mnli", "glue/qnli"}
    assert all("no train data" in why and "hub" in why for why in p.skipped_tasks.values())
    assert {c.task for c in p.cells} == {"glue/cola", "glue/sst2", "glue/mrpc", "glue/stsb",
                                         "glue/rte", "glue/wnli"}
    bad = [c for c in p.cells if c.method == "nosuch"]
    assert len(bad) == 6 and all("unknown method" in c.error for c in bad)
