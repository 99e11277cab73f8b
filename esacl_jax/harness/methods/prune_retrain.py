"""Magnitude prune-then-retrain: the expensive retraining EsaCL avoids, as a baseline.

Per task: train the base method (`config.prune_retrain.base`, DER++ by default) densely; at the
task end prune every prunable layer (`Method.prunable`) to `sparsity` by weight magnitude and
retrain the surviving weights for `retrain_epochs` epochs on the task's data with the mask fixed
(masked gradients and updates, pruned weights exactly zero), through the loop's own compiled
chunk of steps (`methods.base.make_train_chunk`: base loss, replay insertion, per-step keys).
Evaluation uses the sparse weights.

Mask policy (a choice): the mask is refreshed per task, not accumulated. The next task starts
from the sparse weights and trains densely again (pruned weights restart from zero), and its end
prunes afresh by magnitude. This is the plain "dense training + one-shot pruning + fine-tuning"
pipeline applied at every task boundary; it keeps the network's capacity for later tasks, and
forgetting is handled by the base method's replay, as in the dense baseline.

FLOPs: training epochs are dense (`flops_densities` -> None until the task ends); after the task
end `flops_densities` gives the mask densities, and `end_task_passes` counts the retraining
(every base pass, for each retraining step) plus the base's own end-of-task passes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from esacl_jax import masks as masks_lib
from esacl_jax.harness import flops as flops_lib
from esacl_jax.harness.methods.base import (
    Batch,
    Pass,
    SparseWrapperMethod,
    StepMetrics,
    TaskContext,
    TrainState,
    make_train_chunk,
    task_context,
)
from esacl_jax.harness.methods.state import PruneRetrainState, widen

PRUNE_RETRAIN_BASES = ("finetune", "ewc", "er", "derpp")


class PruneRetrain(SparseWrapperMethod):
    """Dense base training, then per-task magnitude pruning + masked retraining."""

    name = "prune_retrain"
    config_section = "prune_retrain"
    sparse = True
    uses_buffer = True  # with the default base (DER++)
    allowed_bases = PRUNE_RETRAIN_BASES

    def __init__(self, config, model, benchmark):
        c = config.prune_retrain
        if not 0.0 <= c.sparsity < 1.0:
            raise ValueError(f"prune_retrain.sparsity must be in [0, 1), got {c.sparsity}")
        if c.retrain_epochs < 0:
            raise ValueError(f"prune_retrain.retrain_epochs must be >= 0, got {c.retrain_epochs}")
        self.pr = c
        super().__init__(config, model, benchmark, base_name=c.base)
        self._retrain_chunk = None  # the loop's compiled chunk of steps, built on first use

    # ----- state -----
    def dense_masks(self, params: Any) -> Any:
        """All-True masks in the masks convention (full arrays on prunable leaves)."""
        prunable = masks_lib.prunable_tree(params, self.prunable)
        return jax.tree.map(lambda w, p: jnp.ones(w.shape, bool) if p else jnp.ones((), bool),
                            params, prunable)

    def init_method_state(self, params: Any) -> Any:
        return widen(PruneRetrainState, self.base.init_method_state(params),
                     masks=self.dense_masks(params), pruned=jnp.zeros((), bool))

    # ----- the compiled step (dense while masks are all True, masked while retraining) -----
    def train_step(self, state: TrainState, batch: Batch, ctx: TaskContext,
                   key: jax.Array) -> tuple[TrainState, StepMetrics]:
        replay_key, after_key = jax.random.split(key)
        loss, (logits, new_stats, per_example), grads = self.loss_and_grads(state, batch, ctx,
                                                                            replay_key)
        weight_masks = state.method_state.masks
        params, opt_state = self.masked_update(
            state, masks_lib.apply_masks(grads, weight_masks), weight_masks)
        method_state = self.base.after_step(state, batch, ctx, logits, per_example, after_key)
        return self.finish_step(state, batch, ctx, params, new_stats, opt_state, method_state,
                                logits, loss)

    # ----- host-side hooks -----
    def begin_task(self, state: TrainState, task_id: int) -> TrainState:
        state = self.base.begin_task(state, task_id)
        ms = state.method_state._replace(masks=self.dense_masks(state.params),
                                         pruned=jnp.zeros((), bool))
        return state.replace(method_state=ms)

    def prune(self, state: TrainState) -> TrainState:
        """Per-layer magnitude pruning of the current weights to `prune_retrain.sparsity`; with
        config.sparse_start="rescaled" each unit's kept weights are rescaled to the unit's norm
        before the pruning (the sparse start, applied where this method sets its sparse
        weights)."""
        prunable = masks_lib.prunable_tree(state.params, self.prunable)
        sparsities = masks_lib.layer_sparsities(state.params, self.pr.sparsity,
                                                self.pr.distribution, prunable)
        weight_masks = masks_lib.magnitude_masks(state.params, sparsities, prunable)
        return state.replace(params=self.sparse_start(state.params, weight_masks),
                             method_state=state.method_state._replace(
                                 masks=weight_masks, pruned=jnp.ones((), bool)))

    def retrain_steps(self, num_examples: int) -> int:
        return (num_examples // self.config.batch_size) * int(self.pr.retrain_epochs)

    def end_task(self, state: TrainState, task_id: int, x: np.ndarray, y: np.ndarray) -> TrainState:
        state = self.prune(state)
        steps = x.shape[0] // self.config.batch_size
        if self.pr.retrain_epochs > 0 and steps > 0:
            ctx = task_context(self.benchmark, task_id)
            if self._retrain_chunk is None:
                self._retrain_chunk = make_train_chunk(self)
            x_dev, y_dev = jax.device_put(x), jax.device_put(np.asarray(y, np.int32))
            for epoch in range(int(self.pr.retrain_epochs)):
                key = jax.random.fold_in(jax.random.fold_in(state.rng, 3_000_017 + task_id), epoch)
                order = np.asarray(jax.random.permutation(key, x.shape[0]), np.int32)
                batch_idx = order[: steps * self.config.batch_size].reshape(steps, -1)
                state, _ = self._retrain_chunk(state, x_dev, y_dev, batch_idx,
                                               np.ones((steps,), bool), ctx)
        return self.base.end_task(state, task_id, x, y)

    # ----- accounting -----
    def flops_densities(self, state: TrainState) -> tuple[dict | None, dict | None]:
        if not bool(state.method_state.pruned):
            return None, None
        weight = flops_lib.densities_from_masks(state.method_state.masks)
        return weight, weight

    def end_task_passes(self, num_examples: int) -> list[Pass]:
        steps = self.retrain_steps(num_examples)
        retrain = [Pass(p.kind, p.examples * steps) for p in self.base.step_passes()]
        return [p for p in retrain if p.examples > 0] + self.base.end_task_passes(num_examples)

    def summary(self, state: TrainState) -> dict:
        return {"sparsity": masks_lib.sparsity_summary(state.method_state.masks),
                **self.base.summary(state)}


__all__ = ["PRUNE_RETRAIN_BASES", "PruneRetrain"]
