"""Resumable runs: an interrupted run, restarted, ends exactly where an uninterrupted one does."""

from __future__ import annotations

import numpy as np
import pytest

from esacl_jax.harness.loop import train_and_evaluate
from esacl_jax.harness.methods import esacl as esacl_module
from experiments.configs import split_digits


def config_for(method: str):
    config = split_digits.get_config(method)
    config.progress = config.tensorboard = False
    config.num_tasks, config.epochs = 3, 1
    config.checkpoint = True
    return config


@pytest.mark.parametrize("method", ["derpp", "esacl"])
def test_interrupted_run_resumes_to_identical_results(tmp_path, monkeypatch, method):
    reference = train_and_evaluate(config_for(method), tmp_path / "reference")

    from esacl_jax.harness.methods.base import Method

    target = esacl_module.EsaCL if method == "esacl" else Method
    original = target.begin_task

    def interrupt_at_task_2(self, state, task_id):
        if task_id == 2:
            raise KeyboardInterrupt
        return original(self, state, task_id)

    monkeypatch.setattr(target, "begin_task", interrupt_at_task_2)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(config_for(method), tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "results.json").exists()
    assert (tmp_path / "resumed" / "checkpoints").is_dir()
    monkeypatch.setattr(target, "begin_task", original)

    resumed = train_and_evaluate(config_for(method), tmp_path / "resumed")
    for key in ("class_il_matrix", "task_il_matrix"):
        np.testing.assert_array_equal(np.asarray(resumed[key]), np.asarray(reference[key]))
    assert resumed["training_flops"] == pytest.approx(reference["training_flops"])
    assert len(resumed["train_time_per_task_s"]) == 3


def test_checkpoint_of_another_config_is_refused(tmp_path):
    train_and_evaluate(config_for("finetune"), tmp_path)
    other = config_for("finetune")
    other.learning_rate = 0.01
    with pytest.raises(ValueError, match="another config"):
        train_and_evaluate(other, tmp_path)
