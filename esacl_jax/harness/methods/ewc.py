"""Online EWC (Schwarz et al. 2018; mammoth's `ewc_on`): a diagonal-Fisher quadratic penalty.

At the end of every task the diagonal empirical Fisher of the task's training data is estimated
(per-example squared gradients of log p(y_true | x), averaged over the task) and accumulated as
`fisher = gamma * fisher + new`; the parameters are checkpointed. While training, the loss gets
`lambda * sum(fisher * (w - w*)**2)` (mammoth's form: no 1/2 factor). During the first task the
Fisher is exactly zero, so is the penalty.

Fisher details (choices, all documented in the config):
- per-example gradients by `vmap(grad)` in fixed-size chunks, `chunks_per_call` chunks per
  jit-compiled `lax.scan` call, so a task of any size compiles once;
- non-augmented inputs, model in eval mode (BatchNorm running statistics: per-example batch
  statistics of a single example would be meaningless), log-softmax over the whole head;
- `ewc.fisher_prob_weight=True` weights each squared gradient by p(y_true | x) as mammoth does;
  the default (False) is the plain empirical Fisher.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from esacl_jax.harness.data.base import preprocess
from esacl_jax.harness.methods.base import Method, Pass, TrainState
from esacl_jax.harness.methods.state import EWCState
from esacl_jax.harness.models import forward

FISHER_CHUNKS_PER_CALL = 8


def ewc_penalty(params: Any, fisher: Any, checkpoint: Any,
                ewc_lambda: float | jax.Array) -> jax.Array:
    """lambda * sum over all leaves of fisher * (w - w*)**2, in float32 (0 when fisher is 0)."""
    terms = jax.tree.map(
        lambda w, f, c: jnp.sum(f * jnp.square(w.astype(jnp.float32) - c.astype(jnp.float32))),
        params, fisher, checkpoint)
    return ewc_lambda * sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


def accumulate_fisher(old: Any, new: Any, gamma: float) -> Any:
    """Online EWC's running Fisher: gamma * old + new."""
    return jax.tree.map(lambda o, n: gamma * o + n, old, new)


class EWC(Method):
    """Online EWC: CE on the current task + lambda * sum(F * (w - w*)^2)."""

    name = "ewc"

    def __init__(self, config, model, benchmark):
        super().__init__(config, model, benchmark)
        e = config.ewc
        if e.ewc_lambda < 0 or not 0.0 <= e.gamma <= 1.0:
            raise ValueError("ewc.ewc_lambda must be >= 0 and ewc.gamma in [0, 1], got "
                             f"{e.ewc_lambda} and {e.gamma}")
        if e.fisher_batch_size < 1:
            raise ValueError(f"ewc.fisher_batch_size must be >= 1, got {e.fisher_batch_size}")
        self.ewc_lambda = float(e.ewc_lambda)
        self.gamma = float(e.gamma)
        self.fisher_batch_size = int(e.fisher_batch_size)
        self.fisher_prob_weight = bool(e.fisher_prob_weight)
        self._fisher_chunk = jax.jit(self._fisher_sum)

    # ----- state -----
    def init_method_state(self, params: Any) -> Any:
        zeros = jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.float32), params)
        return EWCState(checkpoint=jax.tree.map(jnp.array, params), fisher=zeros)

    def penalty(self, params: Any, method_state: Any) -> jax.Array:
        """The EWC term for `params` (exactly 0 until the first task end fills the Fisher)."""
        return ewc_penalty(params, method_state.fisher, method_state.checkpoint,
                           self.ewc_lambda)

    def replay_loss(self, params, batch_stats, state, key):
        del batch_stats, key
        return self.penalty(params, state.method_state)

    # ----- Fisher estimate -----
    def _fisher_sum(self, acc: Any, params: Any, batch_stats: Any, x: jax.Array, y: jax.Array,
                    valid: jax.Array) -> Any:
        """acc + sum over valid examples of (d log p(y|x) / dw)**2; x: [chunks, chunk, ...]."""
        b = self.benchmark

        def log_likelihood(p, xi, yi):
            logits, _ = forward(self.model, p, batch_stats, xi[None], train=False)
            return jax.nn.log_softmax(logits.astype(jnp.float32))[0, yi]

        def per_example(xi, yi):
            logp, g = jax.value_and_grad(log_likelihood)(params, xi, yi)
            weight = jnp.exp(logp) if self.fisher_prob_weight else jnp.ones((), jnp.float32)
            return jax.tree.map(lambda gi: weight * jnp.square(gi.astype(jnp.float32)), g)

        def body(acc, chunk):
            xc, yc, vc = chunk
            squares = jax.vmap(per_example)(preprocess(xc, b.mean, b.std), yc)
            weights = vc.astype(jnp.float32)
            return jax.tree.map(lambda a, s: a + jnp.tensordot(weights, s, axes=1), acc,
                                squares), None

        acc, _ = jax.lax.scan(body, acc, (x, y, valid))
        return acc

    def estimate_fisher(self, params: Any, batch_stats: Any, x: np.ndarray, y: np.ndarray) -> Any:
        """Diagonal empirical Fisher of (x, y) at `params`: mean of per-example squared grads."""
        n = int(x.shape[0])
        chunk, per_call = self.fisher_batch_size, FISHER_CHUNKS_PER_CALL
        group = chunk * per_call
        padded = max(1, math.ceil(n / group)) * group
        pad = padded - n
        xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
        yp = np.concatenate([y, np.zeros((pad,), y.dtype)]) if pad else y
        valid = np.arange(padded) < n
        acc = jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.float32), params)
        shape = (per_call, chunk)
        for start in range(0, padded, group):
            sl = slice(start, start + group)
            acc = self._fisher_chunk(
                acc, params, batch_stats, xp[sl].reshape(*shape, *x.shape[1:]),
                yp[sl].astype(np.int32).reshape(shape), valid[sl].reshape(shape))
        return jax.tree.map(lambda a: a / max(n, 1), acc)

    def end_task(self, state: TrainState, task_id: int, x: np.ndarray, y: np.ndarray) -> TrainState:
        del task_id
        new = self.estimate_fisher(state.params, state.batch_stats, x, y)
        method_state = state.method_state._replace(
            fisher=accumulate_fisher(state.method_state.fisher, new, self.gamma),
            checkpoint=jax.tree.map(jnp.array, state.params))
        return state.replace(method_state=method_state)

    # ----- accounting -----
    def end_task_passes(self, num_examples: int) -> list[Pass]:
        """The Fisher estimate: one forward + backward per training example of the task."""
        return [Pass("fwd_bwd", num_examples)]

    def summary(self, state: TrainState) -> dict:
        fisher = jax.tree.leaves(state.method_state.fisher)
        return {"ewc_fisher_sum": float(sum(float(jnp.sum(f)) for f in fisher))}


__all__ = ["EWC", "accumulate_fisher", "ewc_penalty"]
