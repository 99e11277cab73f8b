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


def test_interrupted_mid_epoch_resumes_to_identical_results(tmp_path, monkeypatch):
    """Killed inside an epoch whose begin_epoch changed the state (EsaCL's mask refresh): the
    resumed run restores the state after that hook instead of running it again."""
    method = "esacl"
    from esacl_jax.harness import loop as loop_lib

    def config():
        c = config_for(method)
        c.num_tasks, c.epochs = 2, 2
        c.steps_per_call, c.checkpoint_every_steps = 4, 8
        c.esacl.mask_update_every_epochs = 1
        return c

    reference = train_and_evaluate(config(), tmp_path / "reference")
    real = loop_lib.make_train_chunk
    calls = []

    def dies_in_task_2_epoch_2(method_obj):
        run_chunk = real(method_obj)

        def counted(state, *args):
            calls.append(1)
            if len(calls) == 24:  # 7 chunks an epoch: task 2, epoch 2, its third chunk
                raise KeyboardInterrupt
            return run_chunk(state, *args)

        return counted

    monkeypatch.setattr(loop_lib, "make_train_chunk", dies_in_task_2_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(config(), tmp_path / "resumed")
    monkeypatch.undo()
    resumed = train_and_evaluate(config(), tmp_path / "resumed")
    for key in ("class_il_matrix", "task_il_matrix"):
        np.testing.assert_array_equal(np.asarray(resumed[key]), np.asarray(reference[key]))
    assert resumed["training_flops"] == reference["training_flops"]
    assert [t["train_examples_seen"] for t in resumed["per_task"]] == \
        [t["train_examples_seen"] for t in reference["per_task"]]
