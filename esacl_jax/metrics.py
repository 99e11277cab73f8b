"""Continual-learning metrics, all computed from one accuracy matrix.

``A[i][j]`` is the accuracy on task j after training task i (a T x T array; every task is
evaluated after every task, so entries with j > i are zero-shot accuracies on future tasks).
Indices are 0-based here: the final row is ``A[T-1]``.

* average accuracy  ACC = mean_j A[T-1][j]
* learning accuracy LA  = mean_j A[j][j]                 (accuracy right after learning j)
* backward transfer BWT = mean_{j<T-1} (A[T-1][j] - A[j][j])
* forgetting        FGT = mean_{j<T-1} (max_{j<=i<=T-2} A[i][j] - A[T-1][j])
  (Chaudhry et al. 2018 / avalanche: the best accuracy reached on j at any evaluation after
  learning it and before the last task, minus the final accuracy)
* forward transfer  FWT = mean_{j>=1} (A[j-1][j] - b_j)   (GEM; b = baseline accuracies of a
  randomly initialised model, zeros when not given)

With T = 1 there is no earlier task: BWT, forgetting and FWT are defined as 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from esacl_jax import _deprecation


def _as_matrix(acc_matrix: Any) -> np.ndarray:
    a = np.asarray(acc_matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be a non-empty T x T array, got shape {a.shape}")
    return a


def _over_earlier_tasks(acc_matrix: Any, term: Any) -> float:
    """mean_{j<T-1} term(A, j), and 0 when T = 1 (no earlier task)."""
    a = _as_matrix(acc_matrix)
    if a.shape[0] == 1:
        return 0.0
    return float(np.mean([term(a, j) for j in range(a.shape[0] - 1)]))


def average_accuracy(acc_matrix: Any) -> float:
    """Mean accuracy over all tasks after training the last one: mean_j A[T-1][j].

    Args:
      acc_matrix: the T x T accuracy matrix.

    Returns:
      ACC, a float: the mean of the last row.
    """
    return float(np.mean(_as_matrix(acc_matrix)[-1]))


def learning_accuracy(acc_matrix: Any) -> float:
    """Mean accuracy on each task right after learning it: mean_j A[j][j].

    Args:
      acc_matrix: the T x T accuracy matrix (only its diagonal is read).

    Returns:
      LA as a float.
    """
    return float(np.mean(np.diag(_as_matrix(acc_matrix))))


def backward_transfer(acc_matrix: Any) -> float:
    """mean_{j<T-1} (A[T-1][j] - A[j][j]); negative means forgetting. 0 when T = 1.

    Args:
      acc_matrix: the T x T accuracy matrix.

    Returns:
      BWT, a float.
    """
    return _over_earlier_tasks(acc_matrix, lambda a, j: a[-1, j] - a[j, j])


def forgetting(acc_matrix: Any) -> float:
    """mean_{j<T-1} (max_{j<=i<=T-2} A[i][j] - A[T-1][j]). 0 when T = 1.

    Args:
      acc_matrix: the T x T accuracy matrix.

    Returns:
      FGT, a float.
    """
    return _over_earlier_tasks(acc_matrix, lambda a, j: np.max(a[j:-1, j]) - a[-1, j])


def forward_transfer(acc_matrix: Any, baseline: Any = None) -> float:
    """mean_{j>=1} (A[j-1][j] - b_j), b = ``baseline`` (per-task accuracies of a randomly
    initialised model; zeros when None). 0 when T = 1.

    Args:
      acc_matrix: the T x T accuracy matrix.
      baseline: per-task accuracies of a randomly initialised model (None: zeros).

    Returns:
      FWT, a float.
    """
    b = 0.0 if baseline is None else np.asarray(baseline, dtype=np.float64)
    return _over_earlier_tasks(acc_matrix,
                               lambda a, j: a[j, j + 1] - (b if np.ndim(b) == 0 else b[j + 1]))


def summarize_matrix(acc_matrix: Any, baseline: Any = None) -> dict[str, Any]:
    """All metrics of one accuracy matrix, as plain Python floats (JSON-ready).

    (Called `summarize` before; that name is a deprecated alias.)

    Args:
      acc_matrix: the T x T accuracy matrix ``A[i][j]``.
      baseline: per-task accuracies of a randomly initialised model for forward transfer
        (None: zeros).

    Returns:
      ``{"average_accuracy", "learning_accuracy", "backward_transfer", "forgetting",
      "forward_transfer", "final_accuracies", "num_tasks"}``.
    """
    a = _as_matrix(acc_matrix)
    return {
        "average_accuracy": average_accuracy(a),
        "learning_accuracy": learning_accuracy(a),
        "backward_transfer": backward_transfer(a),
        "forgetting": forgetting(a),
        "forward_transfer": forward_transfer(a, baseline),
        "final_accuracies": [float(v) for v in a[-1]],
        "num_tasks": int(a.shape[0]),
    }


def summarize_run(class_il: Any, task_il: Any | None = None) -> dict[str, Any]:
    """Metrics of a run's two accuracy matrices (`summarize_matrix` of each).

    Args:
      class_il: the class-IL accuracy matrix.
      task_il: the task-IL accuracy matrix, or None (e.g. domain-IL runs).

    Returns:
      ``{"class_il": ..., "task_il": ...}`` (``task_il`` None when not given).
    """
    return {
        "class_il": summarize_matrix(class_il),
        "task_il": None if task_il is None else summarize_matrix(task_il),
    }


__getattr__ = _deprecation.forwarding_getattr(__name__, {
    "summarize": ("esacl_jax.metrics:summarize_matrix", ""),
})
