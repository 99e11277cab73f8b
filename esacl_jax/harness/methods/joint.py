"""joint: at every task, train on all the data seen so far (the upper bound)."""

from __future__ import annotations

import numpy as np

from esacl_jax.harness.methods.base import Method


class Joint(Method):
    """Trains task t on the union of tasks 0..t (current-task logit masking would be wrong here)."""

    name = "joint"

    def __init__(self, config, model, benchmark):
        super().__init__(config, model, benchmark)
        self.use_task_logit_mask = False

    def training_data(self, task_id: int) -> tuple[np.ndarray, np.ndarray]:
        tasks = self.benchmark.tasks[: task_id + 1]
        return (np.concatenate([t.x_train for t in tasks]),
                np.concatenate([t.y_train for t in tasks]))
