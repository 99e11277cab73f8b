"""Accuracy-matrix metrics against numbers computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from esacl_jax import metrics

# A[i][j]: accuracy on task j after training task i. Task 0 improves after task 1 (0.9 -> 0.95)
# before dropping, so forgetting (max over earlier rows) differs from -BWT (diagonal).
A3 = np.array(
    [
        [0.90, 0.10, 0.00],
        [0.95, 0.80, 0.20],
        [0.50, 0.70, 0.95],
    ]
)


def test_average_accuracy_3x3():
    # final row: (0.50 + 0.70 + 0.95) / 3 = 2.15 / 3
    assert metrics.average_accuracy(A3) == pytest.approx(2.15 / 3)


def test_learning_accuracy_3x3():
    # diagonal: (0.90 + 0.80 + 0.95) / 3 = 2.65 / 3
    assert metrics.learning_accuracy(A3) == pytest.approx(2.65 / 3)


def test_backward_transfer_3x3():
    # tasks 0, 1: (0.50 - 0.90) + (0.70 - 0.80) = -0.40 - 0.10 = -0.50; / 2 = -0.25
    assert metrics.backward_transfer(A3) == pytest.approx(-0.25)


def test_forgetting_3x3():
    # task 0: max(A[0][0], A[1][0]) = max(0.90, 0.95) = 0.95; 0.95 - 0.50 = 0.45
    # task 1: max(A[1][1]) = 0.80; 0.80 - 0.70 = 0.10
    # mean: (0.45 + 0.10) / 2 = 0.275
    assert metrics.forgetting(A3) == pytest.approx(0.275)


def test_forgetting_excludes_final_row_and_can_be_negative():
    a = np.array([[0.5, 0.0], [0.9, 0.8]])
    # task 0: max over rows [0, T-2] = [0] -> 0.5; final 0.9; 0.5 - 0.9 = -0.4 (improved)
    assert metrics.forgetting(a) == pytest.approx(-0.4)
    # BWT: 0.9 - 0.5 = 0.4
    assert metrics.backward_transfer(a) == pytest.approx(0.4)


def test_forward_transfer_3x3():
    # A[0][1] = 0.10, A[1][2] = 0.20; baseline zeros: (0.10 + 0.20) / 2 = 0.15
    assert metrics.forward_transfer(A3) == pytest.approx(0.15)
    # baseline b = (0.0, 0.1, 0.1): (0.10 - 0.10 + 0.20 - 0.10) / 2 = 0.05
    assert metrics.forward_transfer(A3, baseline=[0.0, 0.1, 0.1]) == pytest.approx(0.05)


def test_single_task_edge_case():
    # T = 1: no earlier task, so BWT, forgetting and FWT are defined as 0.
    s = metrics.summarize_matrix([[0.7]])
    assert s["average_accuracy"] == pytest.approx(0.7)
    assert s["learning_accuracy"] == pytest.approx(0.7)
    assert s["backward_transfer"] == 0.0
    assert s["forgetting"] == 0.0
    assert s["forward_transfer"] == 0.0
    assert s["num_tasks"] == 1


def test_summarize_and_summarize_run():
    s = metrics.summarize_matrix(A3)
    assert s["average_accuracy"] == pytest.approx(2.15 / 3)
    assert s["learning_accuracy"] == pytest.approx(2.65 / 3)
    assert s["backward_transfer"] == pytest.approx(-0.25)
    assert s["forgetting"] == pytest.approx(0.275)
    assert s["forward_transfer"] == pytest.approx(0.15)
    assert s["final_accuracies"] == pytest.approx([0.50, 0.70, 0.95])
    assert all(isinstance(v, float) for k, v in s.items() if k not in ("final_accuracies",
                                                                         "num_tasks"))
    task_il = np.array([[1.0, 0.5], [0.9, 0.9]])
    run = metrics.summarize_run(A3, task_il)
    assert set(run) == {"class_il", "task_il"}
    assert run["class_il"] == s
    # task-IL: ACC (0.9 + 0.9) / 2 = 0.9; BWT 0.9 - 1.0 = -0.1; forgetting 1.0 - 0.9 = 0.1
    assert run["task_il"]["average_accuracy"] == pytest.approx(0.9)
    assert run["task_il"]["backward_transfer"] == pytest.approx(-0.1)
    assert run["task_il"]["forgetting"] == pytest.approx(0.1)
    assert metrics.summarize_run(A3)["task_il"] is None


def test_rejects_non_square():
    with pytest.raises(ValueError):
        metrics.summarize_matrix(np.zeros((2, 3)))
