"""Every method on two MNIST-family benchmarks, CI-sized: it runs, learns, and reports FLOPs."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from esacl_jax.harness.loop import train_and_evaluate
from esacl_jax.harness.methods import METHODS

BENCHMARKS = ("split_mnist", "split_fashion_mnist", "permuted_mnist")
SPARSE = {"esacl": "esacl", "sparcl": "sparcl", "sparcl_ewc": "sparcl", "sparcl_er": "sparcl",
          "sparcl_derpp": "sparcl", "sparcl_co2l": "sparcl", "prune_retrain": "prune_retrain"}


def _cases() -> list[tuple[str, str]]:
    """Every method on one of the three benchmarks, in turn, so each benchmark (class-IL split
    MNIST and Fashion-MNIST, domain-IL permuted MNIST) runs a third of the methods and the suite
    stays inside its time budget (every method also runs as a seed group on split_digits:
    tests/test_seed_group_methods.py)."""
    return [(method, BENCHMARKS[i % len(BENCHMARKS)]) for i, method in enumerate(sorted(METHODS))]


@pytest.mark.parametrize(("method", "benchmark"), _cases())
def test_method_runs_and_learns(tmp_path, shared_data_dir, benchmark, method):
    config = importlib.import_module(f"experiments.configs.{benchmark}").get_config(method)
    config.data_dir = str(shared_data_dir)
    config.num_tasks = 2
    config.max_train_per_task = 2000
    config.max_test_per_task = 300
    config.batch_size = 10
    config.replay_batch_size = min(config.replay_batch_size, 10)
    config.progress = False
    config.tensorboard = False
    result = train_and_evaluate(config, tmp_path, progress=False)
    task_il = np.asarray(result["task_il_matrix"])
    # Learning happened: every task is well above chance right after it is trained
    # (task-IL chance: 50% for the 2-class split tasks, 10% for 10-class permuted MNIST; EsaCL
    # at 90% from the plain magnitude start, the default since issue 27, reaches 55% and 48% on
    # the two permuted tasks in these 200 steps, where the rescaled start passed 50%).
    floor = 0.4 if benchmark == "permuted_mnist" else 0.8
    assert np.diag(task_il).min() > floor, task_il
    assert result["training_flops"] > 0
    assert (tmp_path / "results.json").exists()
    if method in SPARSE:
        sparsity = result["per_task"][-1].get("sparsity")
        target = config[SPARSE[method]].sparsity
        assert sparsity is not None
        assert sparsity["prunable_sparsity"] == pytest.approx(target, abs=1e-3)
