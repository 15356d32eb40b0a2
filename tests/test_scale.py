"""Scaling a benchmark out: seeds, resume after kill -9, executors (local, Ray), data parallel.

The fast tests use synthetic records and a tiny model; the slow ones drive the real command line on
MiniLM and the shared RTE files (HARNESS_DATA_DIR), in the tiniest configuration that still trains.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from harness.config import ConfigError
from harness.records import read_records
from records_factory import fake_record, write

DATA = os.environ.get("HARNESS_DATA_DIR")
needs_data = pytest.mark.skipif(not DATA, reason="HARNESS_DATA_DIR not set (tox and .ci/run set it)")
# A run in a few seconds: 2 optimizer steps of 8 rows, 16 dev rows, no memory-budget search.
TINY = ["--profile", "smoke", "--memory-budget", "none", "--set", "max_train_samples=32",
        "--set", "max_eval_samples=16", "--set", "max_length=32", "--set", "batch_size=8",
        "--set", "max_steps=2", "--no-progress"]


def harness_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness", *args]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def record_files(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*.json") if not p.name.startswith(".tmp-"))


# -- seeds: planning and tables ------------------------------------------------------------------

def test_seeds_are_separate_runs_with_their_own_ids():
    from harness.matrix import plan

    p = plan(["lora", "bitfit"], "glue/rte", "smoke", {}, seeds=[0, 1, 2], output_dir="/tmp/x")
    assert [(c.method, c.seed) for c in p.cells] == [("lora", 0), ("lora", 1), ("lora", 2),
                                                     ("bitfit", 0), ("bitfit", 1), ("bitfit", 2)]
    assert [c.config.train.seed for c in p.cells] == [0, 1, 2, 0, 1, 2]
    ids = [c.config.run_id() for c in p.cells]
    assert len(set(ids)) == 6
    # the same plan again gives the same ids (what resume relies on)
    again = plan(["lora", "bitfit"], "glue/rte", "smoke", {}, seeds=[0, 1, 2], output_dir="/elsewhere")
    assert [c.config.run_id() for c in again.cells] == ids
    with pytest.raises(ConfigError, match="both set the seed"):
        plan(["lora"], "glue/rte", "smoke", {"seed": 3}, seeds=[0, 1])
    with pytest.raises(ConfigError, match="repeats"):
        plan(["lora"], "glue/rte", "smoke", {}, seeds=[0, 0])
    # data-parallel runs are measured differently: their own ids; one process keeps the old id
    dp = plan(["lora"], "glue/rte", "smoke", {}, processes=2)
    one = plan(["lora"], "glue/rte", "smoke", {})
    assert dp.cells[0].config.run_id() != one.cells[0].config.run_id()
    assert "processes" not in one.cells[0].config.identity()


def seeded(method: str, seed: int, acc: float, task: str = "glue/rte", **kw):
    rec = fake_record(method, task, acc=acc, run_id=f"{task.replace('/', '-')}__{method}__s{seed}", **kw)
    rec["config"]["train"]["seed"] = seed
    return rec


def test_tables_show_mean_and_sd_over_seeds_and_ties(tmp_path):
    from harness.leaderboard import leaderboard_frame, leaderboard_markdown, render_html
    from harness.report import aggregate_seeds, failures, runs_frame, summary_frame, to_markdown

    recs = [seeded("lora", s, a) for s, a in ((0, 0.60), (1, 0.64), (2, 0.62))]
    recs += [seeded("dora", s, a) for s, a in ((0, 0.61), (1, 0.66), (2, 0.65))]   # within lora's spread
    recs += [seeded("full", s, a) for s, a in ((0, 0.80), (1, 0.81), (2, 0.79))]   # clearly ahead
    recs += [seeded("bitfit", 0, 0.55), seeded("bitfit", 1, 0.57),
             seeded("bitfit", 2, 0.0, status="failed", reason="NonFiniteLoss: loss became nan")]
    runs = runs_frame(recs)
    assert len(runs) == 12 and sorted(runs["seed"].unique()) == [0, 1, 2]
    agg = aggregate_seeds(runs).set_index("method")
    assert agg.loc["lora", "score"] == pytest.approx(0.62)
    assert agg.loc["lora", "sd:score"] == pytest.approx(0.02)           # sample sd of 60, 64, 62
    assert agg.loc["bitfit", "seeds"] == 2 and agg.loc["bitfit", "seeds_run"] == 3
    assert agg.loc["bitfit", "status"] == "failed" and "seed 2: NonFiniteLoss" in agg.loc["bitfit", "reason"]

    table = summary_frame(runs, ["full", "dora", "lora", "bitfit"])
    md = to_markdown(table)
    assert str(table.loc["lora", "rte acc"]) == "62 ± 2.00"
    assert str(table.loc["bitfit", "rte acc"]) == "56 ± 1.41 (2/3 seeds)"
    assert table.loc["lora", "seeds"] == "3" and table.loc["bitfit", "seeds"] == "2"
    assert table.loc["bitfit", "runs failed"] == 1
    assert "| full     | 80 ± 1.00" in md
    # the failed seed is listed as failed, by seed
    assert failures(runs) == ["bitfit on glue/rte (seed 2): failed: NonFiniteLoss: loss became nan"]
    # a method whose every seed failed shows as failed
    broken = recs + [seeded("vera", s, 0.0, status="failed", reason="OutOfMemoryError: CUDA") for s in (0, 1, 2)]
    t2 = summary_frame(runs_frame(broken))
    assert t2.loc["vera", "rte acc"] == "failed" and t2.loc["vera", "runs failed"] == 3
    assert pd.isna(t2.loc["vera", "avg score"])

    lb = leaderboard_frame(runs).set_index("method")
    assert list(lb.index) == ["full", "dora", "lora", "bitfit"]
    assert list(lb["rank"]) == [1, 2, 3, 4]
    assert lb.loc["lora", "± sd"] == 2.0 and lb.loc["lora", "seeds"] == "3"
    assert lb.loc["dora", "within spread of"] == "lora"      # |64 - 62| <= max(2.65, 2)
    assert lb.loc["lora", "within spread of"] == "dora"
    assert lb.loc["full", "within spread of"] == ""
    assert lb.loc["bitfit", "seeds"] == "2/3"
    text = leaderboard_markdown(recs)
    assert "within spread of" in text and "larger of the two standard deviations" in text
    page = render_html(recs)
    assert "62 ± 2.00" in page and "within spread of" in page and "NonFiniteLoss" in page

    # a single seed keeps the old layout (no spread claimed)
    single = summary_frame(runs_frame([fake_record("lora", "glue/rte", acc=0.6)]))
    assert "seeds" not in single.columns and single.loc["lora", "rte acc"] == 60.0
    assert "rank" not in leaderboard_frame(runs_frame([fake_record("lora", "glue/rte")])).columns


def test_newest_configuration_wins_and_its_seeds_aggregate():
    from harness.report import runs_frame, summary_frame

    old = [seeded("lora", s, 0.5, lr=1e-3, finished_at="2026-01-01T00:00:00+00:00") for s in (0, 1)]
    new = [seeded("lora", s, a, lr=2e-3, finished_at="2026-01-02T00:00:00+00:00") for s, a in ((0, 0.7), (1, 0.8))]
    for r in new:
        r["run_id"] += "-new"
    runs = runs_frame(old + new)
    assert len(runs) == 2 and set(runs["run_id"]) == {r["run_id"] for r in new}
    assert str(summary_frame(runs).loc["lora", "rte acc"]) == "75 ± 7.07"


def test_compare_uses_the_means_of_seeds(tmp_path):
    from harness.compare import compare

    base = write(tmp_path / "base", *[seeded("lora", s, a) for s, a in ((0, 0.60), (1, 0.64), (2, 0.62))])
    same = write(tmp_path / "same", *[seeded("lora", s, a) for s, a in ((0, 0.64), (1, 0.60), (2, 0.62))])
    worse = write(tmp_path / "worse", *[seeded("lora", s, a) for s, a in ((0, 0.30), (1, 0.70), (2, 0.20))])
    one_failed = write(tmp_path / "failed", seeded("lora", 0, 0.6), seeded("lora", 1, 0.6),
                       seeded("lora", 2, 0.0, status="failed"))
    ok = compare(same, base)
    assert ok.ok and ok.rows[0]["seeds"] == "3 -> 3" and ok.rows[0]["score"].startswith("62.00 -> 62.00")
    bad = compare(worse, base)       # mean 40: a 22-point drop (RTE's tolerance: 20), one seed better
    assert not bad.ok and "rte acc fell 62.00 -> 40.00" in bad.regressions[0]
    failed = compare(one_failed, base)  # one seed no longer ok: the run is not ok
    assert not failed.ok and "status ok -> failed" in failed.regressions[0]


# -- data parallel: exactness against one process (gloo, tiny model, no data) -------------------

def _dp_train(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from helpers import collate, rows, tiny_bert
    from helpers import apply_method
    from harness.train import Trainer

    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, ctx, pm = apply_method(tiny_bert(), "lora", batch_size=7, lr=1e-2, warmup_ratio=0.0,
                                  epochs=2, seed=3)
    model.train()
    result = Trainer(model, pm, ctx, rows(30), collate).fit()
    if rank == 0:
        trained = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        torch.save({"params": trained, "result": result}, out)
    if world > 1:
        dist.destroy_process_group()


def test_two_process_gloo_training_matches_one_process(tmp_path):
    import torch.multiprocessing as mp

    _dp_train(0, 1, "", str(tmp_path / "one.pt"))
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_dp_train, args=(2, init, str(tmp_path / "two.pt")), nprocs=2, join=True,
                       start_method="spawn")
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["params"].keys() == two["params"].keys() and len(one["params"]) > 2
    for k, v in one["params"].items():  # batches of 7 split 4 + 3: the same gradient, summed
        assert torch.allclose(v, two["params"][k], atol=2e-5, rtol=1e-4), k
    assert torch.allclose(torch.tensor(one["result"]["loss_curve"]), torch.tensor(two["result"]["loss_curve"]),
                          atol=1e-5)
    thr1, thr2 = one["result"]["throughput"], two["result"]["throughput"]
    assert thr1["steps"] == thr2["steps"] == 10 and thr2["samples"] == thr1["samples"] == 60  # 2 epochs
    per_device = two["result"]["memory"]["per_device"]
    assert [d["rank"] for d in per_device] == [0, 1] and sum(d["samples"] for d in per_device) == 60
    assert all(d["peak_bytes"] > 0 for d in per_device)
    assert two["result"]["memory"]["peak_bytes"] == max(d["peak_bytes"] for d in per_device)
    assert two["result"]["distributed"]["world_size"] == 2


def test_launch_configuration():
    from harness.worker import launch_command

    cmd = launch_command("/tmp/c.json", 4, progress=False)
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--multi_gpu"]
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[-4:] == ["-m", "harness.worker", "/tmp/c.json", "--no-progress"]
    # accelerate parses it as a 4-process launch of our worker
    from accelerate.commands.launch import launch_command_parser

    args = launch_command_parser().parse_args(cmd[3:])
    assert args.multi_gpu and args.num_processes == 4 and args.module
    assert args.training_script == "harness.worker"


# -- the real command line ------------------------------------------------------------------------

def _children(pid: int) -> list:
    import psutil

    try:
        return [p for p in psutil.Process(pid).children(recursive=True)
                if "harness.worker" in " ".join(p.cmdline())]
    except psutil.NoSuchProcess:
        return []


def _wait(cond, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@needs_data
def test_kill_9_mid_matrix_then_resume(tmp_path):
    import psutil

    out = tmp_path / "runs"
    cmd = harness_cmd("run", "--methods", "lora", "--task", "glue/rte", "--seeds", "0,1,2",
                      "--output-dir", str(out), *TINY)
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        first_worker = _wait(lambda: _children(proc.pid), 120, "the first run's worker")[0]
        _wait(lambda: len(record_files(out)) == 1, 300, "the first record")
        # the second run is under way: its worker process exists (a run takes several seconds)
        worker = _wait(lambda: [w for w in _children(proc.pid) if w.pid != first_worker.pid], 120,
                       "the second run's worker")[0]
        time.sleep(0.5)
        first = {p.name: p.read_text() for p in record_files(out)}
        os.kill(proc.pid, signal.SIGKILL)   # kill -9 `harness run` itself, mid-run
        proc.wait(timeout=30)
        # the run it was running does not go on behind it (it would race the restart)
        _wait(lambda: not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE,
              30, "the orphaned worker to die")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert {p.name: p.read_text() for p in record_files(out)} == first  # nothing half-written
    # a write interrupted by a kill leaves a temporary file: never a record
    (out / ".tmp-interrupted.json").write_text('{"schema_version": 1, "run_id": "glue-rte__lo')

    again = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already done") == 1          # the finished run is not repeated
    files = record_files(out)
    records = [json.loads(p.read_text()) for p in files]    # every record parses
    assert len(files) == 3 and {p.stem for p in files} == {r["run_id"] for r in records}
    assert sorted(r["config"]["train"]["seed"] for r in records) == [0, 1, 2]
    assert all(r["status"] == "ok" for r in records), [r.get("reason") for r in records]
    for name, text in first.items():
        assert (out / name).read_text() == text              # kept, not re-run
    assert "± " in again.stdout and "| lora" in again.stdout

    rep = subprocess.run(harness_cmd("report", "--output-dir", str(out)), cwd=tmp_path, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr                   # no unreadable record
    assert "unreadable" not in rep.stderr and "± " in rep.stdout
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 3


@pytest.mark.slow
@needs_data
def test_a_killed_worker_is_a_recorded_failure_and_the_matrix_goes_on(tmp_path):
    from harness.matrix import plan, run_matrix
    from harness.config import parse_overrides

    sets = [TINY[i + 1] for i, a in enumerate(TINY) if a == "--set"]
    p = plan(["lora"], "glue/rte", "smoke", {**parse_overrides(sets), "memory_budget": None},
             seeds=[0, 1], output_dir=str(tmp_path / "runs"))
    me = os.getpid()
    killed = []

    def killer():  # the out-of-memory killer's SIGKILL, on the first run's worker
        worker = _wait(lambda: _children(me), 120, "the first worker")[0]
        killed.append(worker.pid)
        worker.kill()

    t = threading.Thread(target=killer)
    t.start()
    records = run_matrix(p, progress=False, log=lambda m: None)
    t.join()
    assert killed and [r["status"] for r in records] == ["failed", "ok"]
    assert "killed by SIGKILL: often the out-of-memory killer" in records[0]["reason"]
    on_disk, problems = read_records(tmp_path / "runs")
    assert not problems and sorted(r["status"] for r in on_disk) == ["failed", "ok"]


@pytest.mark.slow
@needs_data
def test_ray_cluster_gives_the_records_of_the_local_executor(tmp_path):
    if os.environ.get("HARNESS_REQUIRE_RAY"):  # CI installs it: a skip there would hide a failure
        import ray
    else:
        ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install '.[ray]'")
    common = ["run", "--methods", "lora", "--task", "glue/rte", "--seeds", "0,1", *TINY]
    local = subprocess.run(harness_cmd(*common, "--output-dir", str(tmp_path / "local"), "--workers", "2"),
                           cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    assert local.returncode == 0, local.stderr[-3000:]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ctx = ray.init(num_cpus=2, include_dashboard=False, logging_level="error")  # the test's cluster
    try:
        address = ctx.address_info["gcs_address"]
        remote = subprocess.run(harness_cmd(*common, "--output-dir", str(tmp_path / "ray"), "--executor",
                                            "ray", "--ray-address", address),
                                cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    finally:
        ray.shutdown()
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert "submitted (1 CPU, 0 GPU)" in remote.stderr
    a = {r["run_id"]: r for r in read_records(tmp_path / "local")[0]}
    b = {r["run_id"]: r for r in read_records(tmp_path / "ray")[0]}
    assert len(a) == 2 and a.keys() == b.keys()
    for rid, ra in a.items():
        rb = b[rid]
        assert ra["status"] == rb["status"] == "ok"
        assert ra["config"]["train"] == rb["config"]["train"]
        assert ra["metrics"] == rb["metrics"]  # same seeds, same threads: the same numbers
        assert ra["loss_curve"] == pytest.approx(rb["loss_curve"], abs=1e-6)
        assert ra["throughput"]["samples"] == rb["throughput"]["samples"]
    assert "± " in remote.stdout


@pytest.mark.slow
@needs_data
def test_two_process_cpu_data_parallel_run_trains_and_reports(tmp_path):
    out = tmp_path / "runs"
    r = subprocess.run(harness_cmd("run", "--methods", "lora", "--task", "glue/rte", "--processes", "2",
                                   "--device", "cpu", "--output-dir", str(out), *TINY),
                       cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (rec,) = [json.loads(p.read_text()) for p in record_files(out)]   # one record: process 0's
    assert rec["status"] == "ok" and rec["config"]["processes"] == 2
    assert rec["distributed"]["world_size"] == 2 and rec["distributed"]["backend"] == "gloo"
    assert rec["distributed"]["launcher"] == "accelerate"
    per_device = rec["memory"]["train_per_device"]
    assert [d["rank"] for d in per_device] == [0, 1] and all(d["peak_bytes"] > 0 for d in per_device)
    thr = rec["throughput"]
    assert thr["steps"] == 2 and thr["samples"] == 16 == sum(d["samples"] for d in per_device)
    assert thr["samples_per_s"] == pytest.approx(16 / max(d["seconds"] for d in per_device))
    assert 0 <= rec["metrics"]["accuracy"] <= 1 and rec["merge"]["ok"]
    rep = subprocess.run(harness_cmd("report", "--output-dir", str(out)), cwd=tmp_path, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0 and "| lora" in rep.stdout
