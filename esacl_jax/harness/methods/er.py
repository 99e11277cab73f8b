"""ER: experience replay with a reservoir buffer (label replay), and the shared replay machinery."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from esacl_jax import replay
from esacl_jax.harness.methods.base import Batch, Method, Pass, TaskContext, TrainState
from esacl_jax.harness.methods.state import ReplayState
from esacl_jax.harness.models import forward


class ReplayMethod(Method):
    """A method whose method_state holds a reservoir buffer (its `buffer` field) filled with
    every example seen."""

    uses_buffer = True

    def __init__(self, config, model, benchmark):
        super().__init__(config, model, benchmark)
        if config.buffer_size < 0 or config.replay_batch_size < 1:
            raise ValueError("buffer_size must be >= 0 and replay_batch_size >= 1, got "
                             f"{config.buffer_size} and {config.replay_batch_size}")
        self.buffer_size = int(config.buffer_size)
        self.replay_batch_size = int(config.replay_batch_size)

    def init_method_state(self, params: Any) -> Any:
        x_dtype = self.benchmark.tasks[0].x_train.dtype
        return ReplayState(buffer=replay.init_buffer(
            self.buffer_size, self.benchmark.input_shape, np.dtype(x_dtype), self.num_classes))

    def replay_logits(self, params: Any, batch_stats: Any, key: jax.Array, buffer) -> tuple:
        """Draws a replay minibatch and returns (logits, sample) for it."""
        draw_key, aug_key = jax.random.split(key)
        sample = replay.sample(buffer, draw_key, self.replay_batch_size)
        x = self.prepare_inputs(aug_key, sample[0])
        logits, _ = forward(self.model, params, batch_stats, x, train=True)
        return logits, sample

    def after_step(self, state: TrainState, batch: Batch, ctx: TaskContext, logits: jax.Array,
                   per_example_loss: jax.Array, key: jax.Array) -> Any:
        buffer = replay.add_reservoir(state.method_state.buffer, key, batch.x_raw, batch.y,
                                      jax.lax.stop_gradient(logits).astype(jnp.float32),
                                      ctx.task_id)
        return state.method_state._replace(buffer=buffer)


class ER(ReplayMethod):
    """Experience replay (Chaudhry et al. 2019): one CE averaged over the current batch and a
    replay minibatch together, as the reference implementation concatenates them."""

    name = "er"

    def step_passes(self) -> list[Pass]:
        return [Pass("fwd_bwd", self.config.batch_size), Pass("fwd_bwd", self.replay_batch_size)]

    def objective(self, current_per_example, params, batch_stats, state, key):
        logits, (_, y, _, _, valid) = self.replay_logits(params, batch_stats, key,
                                                         state.method_state.buffer)
        return replay.joint_ce(current_per_example, logits, y, valid)

    def replay_loss(self, params, batch_stats, state, key):
        """The replay CE alone (mean over valid rows); ER's step loss is `objective`."""
        logits, (_, y, _, _, valid) = self.replay_logits(params, batch_stats, key,
                                                         state.method_state.buffer)
        return replay.er_loss(logits, y, valid)
