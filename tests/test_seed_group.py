"""Seeds as one program (`--config.seeds`): each seed of a vmapped group ends exactly where its
separate run ends (on CPU: the same bits), resumes after an interruption, and refuses in one
line what it cannot do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from esacl_jax.harness import seed_group
from esacl_jax.harness.loop import RunInterrupted, train_and_evaluate
from esacl_jax.harness.methods.base import Method
from experiments.configs import split_digits
from tests.conftest import REPO_ROOT


def config_for(method: str, **overrides):
    config = split_digits.get_config(method)
    config.progress = config.tensorboard = False
    config.num_tasks, config.epochs = 2, 1
    for key, value in overrides.items():
        config[key] = value
    return config


def final_states(store: dict, name: str):
    def keep(task_id, method, state):
        del task_id, method
        store[name] = state
    return keep


def assert_same_run(group_result: dict, separate: dict, ignore: tuple[str, ...] = ()) -> None:
    for key in ("class_il_matrix", "task_il_matrix"):
        np.testing.assert_array_equal(np.asarray(group_result[key]), np.asarray(separate[key]))
    for key in ("seed", "training_flops", "training_flops_cumulative_per_task", "weights",
                "method", "benchmark"):
        assert group_result[key] == separate[key], key
    strip = ("host_rss_bytes",)
    assert [{k: v for k, v in t.items() if k not in strip} for t in group_result["per_task"]] == \
        [{k: v for k, v in t.items() if k not in strip} for t in separate["per_task"]]
    # its own seed, seeds empty: the config of its separate run
    assert {k: v for k, v in group_result["config"].items() if k not in ignore} == \
        {k: v for k, v in separate["config"].items() if k not in ignore}


# DER++ on per-seed subsets (the task arrays stacked by seed) in several chunks an epoch.
DERPP = {"max_train_per_task": 200, "steps_per_call": 10}


def run_group(workdir, method: str, overrides: dict) -> tuple[dict, object]:
    """The group (0, 1) of `method`: its results and its final stacked state."""
    states: dict = {}
    group = train_and_evaluate(config_for(method, seeds="0,1", **overrides), workdir,
                               on_task_end=final_states(states, "group"))
    return group, states["group"]


@pytest.fixture(scope="module")
def derpp_group(tmp_path_factory):
    """DER++'s group of two seeds: the resume test's reference."""
    workdir = tmp_path_factory.mktemp("derpp_group")
    return workdir, *run_group(workdir, "derpp", DERPP)


def test_a_two_seed_group_is_its_separate_runs_to_the_bit(tmp_path, derpp_group):
    """Seed 1 of DER++'s group (0, 1), on per-seed subsets in several chunks an epoch, against
    its separate run: the same matrices, FLOPs, summaries and final parameters, to the bit (every
    method as a five-seed group: tests/test_seed_group_methods.py)."""
    _, group, stacked = derpp_group
    states: dict = {}
    separate = train_and_evaluate(config_for("derpp", seed=1, **DERPP), tmp_path / "separate",
                                  on_task_end=final_states(states, "one"))
    assert_same_run(group["runs"][1], separate)
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[1], stacked.params)),
                    jax.tree.leaves(states["one"].params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_interrupted_group_resumes_to_the_same_bits(tmp_path, monkeypatch, derpp_group):
    """SIGINT in task 2 stops the group after its next chunk with a mid-epoch checkpoint; the
    same call resumes there and ends where an uninterrupted group ends."""
    _, reference, stacked = derpp_group
    states: dict = {"reference": stacked}
    config = config_for("derpp", seeds="0,1", checkpoint=True, **DERPP)
    original = Method.begin_epoch

    def signal_in_task_2(self, state, task_id, epoch):
        if task_id == 1 and self.config.seed == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, state, task_id, epoch)

    monkeypatch.setattr(Method, "begin_epoch", signal_in_task_2)
    with pytest.raises(RunInterrupted, match="seed group's state saved"):
        train_and_evaluate(config, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "seed0" / "results.json").exists()
    monkeypatch.setattr(Method, "begin_epoch", original)
    resumed = train_and_evaluate(config, tmp_path / "resumed",
                                 on_task_end=final_states(states, "resumed"))
    for ref, res in zip(reference["runs"], resumed["runs"], strict=True):
        assert_same_run(res, ref, ignore=("checkpoint",))
    for a, b in zip(jax.tree.leaves(states["reference"]), jax.tree.leaves(states["resumed"]),
                    strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("value, message", [
    ("0,x", "comma-separated integers"), ("1,1", "distinct"), ("-1", ">= 0")])
def test_bad_seeds_are_one_line(value, message):
    with pytest.raises(ValueError, match=message):
        seed_group.parse_seeds(value)


def test_seeds_and_a_data_parallel_mesh_refuse_in_one_line():
    with pytest.raises(ValueError, match="do not compose.*num_devices=1"):
        seed_group.check_group(config_for("derpp", seeds="0,1", num_devices=2), (0, 1))
    assert seed_group.parse_seeds("0, 1,2") == (0, 1, 2)


def test_main_refuses_bad_seeds_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.main",
         "--config=experiments/configs/split_digits.py:derpp", f"--workdir={tmp_path}",
         "--config.seeds=0,0"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: seeds must be distinct, got '0,0'"]


def test_a_sweep_runs_a_cells_seeds_as_one_group_and_resumes_per_seed(tmp_path):
    """The local launcher groups the seeds of a cell still to do: each seed's results.json lands
    where its own run writes it; a removed one is redone alone, the others skipped."""
    from esacl_jax.harness import sweep

    overrides = {"num_tasks": 2, "max_train_per_task": 60}
    runs = [sweep.Run("split_digits", "finetune", overrides, seed,
                      tmp_path / "finetune" / f"seed{seed}") for seed in (0, 1)]
    units = sweep.group_seeds(list(enumerate(runs)))
    assert [(members, unit.seeds, unit.workdir) for members, unit in units] == \
        [((0, 1), (0, 1), tmp_path / "finetune")]
    assert len(sweep.group_seeds([(0, runs[0])])) == 1
    result = sweep.run_all(runs, progress=False)
    assert [o.status for o in result.outcomes] == ["done", "done"]
    first = [json.loads(r.results_path.read_text()) for r in runs]
    assert [r["seed"] for r in first] == [0, 1]
    assert all(r["seed_group"] == [0, 1] and r["node"]["launcher"] == "local" for r in first)
    runs[1].results_path.unlink()
    result = sweep.run_all(runs, progress=False)
    assert [o.status for o in result.outcomes] == ["skipped", "done"]
    again = json.loads(runs[1].results_path.read_text())
    assert "seed_group" not in again  # alone this time, and the same result
    np.testing.assert_array_equal(again["class_il_matrix"], first[1]["class_il_matrix"])


def test_the_speed_table_pairs_a_group_with_the_sum_of_its_seeds_separate_runs():
    from experiments.bench import seed_group as bench

    def row(kind, seeds, wall, train="1", equal=""):
        return {"benchmark": "split_mnist", "method": "derpp", "kind": kind, "seeds": seeds,
                "wall_s": wall, "train_s": train, "eval_s": "0.5",
                "matrices_equal_to_separate": equal, "commit": "abc1234", "machine": "m",
                "note": ""}

    records = [row("cold_separate", "0", "10"), row("warm_separate", "0", "6"),
               row("group_cold", "0", "9", equal="yes"),
               row("cold_separate", "1", "12"), row("warm_separate", "1", "8"),
               row("group_cold", "0 1", "11", train="4", equal="yes")]
    summary = bench.summary_rows(records)
    assert [(r["n"], r["cold_s"], r["warm_s"]) for r in summary] == [(1, 10, 6), (2, 22, 14)]
    assert summary[1]["vs_cold"] == pytest.approx(0.5)
    assert summary[1]["rest_s"] == pytest.approx(11 - 4 - 0.5)
    table = bench.markdown(records)
    assert "| split_mnist | derpp | 2 | 11.0 | 22.0 | 14.0 | 0.50 | 0.79 |" in table
    assert "Commit: abc1234" in table
