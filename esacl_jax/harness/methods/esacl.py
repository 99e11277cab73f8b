"""EsaCL: sharpness-aware directional pruning (SDP) + intelligent data selection (IDS) + replay.

One step (METHOD.md), for the three cost variants that are configurations of this one function:
  A: clean pass (fwd+bwd) on current + replay; sharpness forward on current at w+eps; descent on
     the kept current examples + replay at w+eps.
  B: as A but the clean pass sees the current batch only (METHOD.md's reference form).
  C: (default) the ascent (clean) pass uses only the top-gamma examples by the per-example score
     table filled by earlier passes; descent on the whole current batch + replay; no extra
     forward.
The sparse start is the magnitude mask of the random init with, by default, each unit's kept
weights rescaled to its dense norm (`masks.sparse_init`, esacl.init_rescale).
The optimizer is `keep_sparse(chain(sdp_transform(...), sgd))`, exactly what users chain in their
own loops: the step supplies the clean gradient and a `grad_fn` (opaque SAM mode), and the
transform perturbs the active weights, calls `grad_fn` at w + eps and masks the result.
BatchNorm running statistics come from the clean pass only.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import optax

from esacl_jax import ids, masks, replay, sdp
from esacl_jax.harness import losses
from esacl_jax.harness.methods.base import (
    Batch,
    Pass,
    StepMetrics,
    TaskContext,
    TrainState,
    make_optimizer,
)
from esacl_jax.harness.methods.derpp import derpp_replay_loss
from esacl_jax.harness.methods.er import ReplayMethod
from esacl_jax.harness.models import forward

STEP_VARIANTS = ("A", "B", "C")
IDS_SCORES = ("sharpness", "perturbed_loss", "clean_loss", "random")
REPLAY_KINDS = ("derpp", "er", "none")


class EsaCL(ReplayMethod):
    name = "esacl"
    config_section = "esacl"
    sparse = True

    def __init__(self, config, model, benchmark):
        e = config.esacl
        if e.step_variant not in STEP_VARIANTS:
            raise ValueError(f"esacl.step_variant must be one of {STEP_VARIANTS}, "
                             f"got {e.step_variant!r}")
        if e.replay not in REPLAY_KINDS:
            raise ValueError(f"esacl.replay must be one of {REPLAY_KINDS}, got {e.replay!r}")
        if e.replay_at not in ("perturbed", "clean"):
            raise ValueError(f"esacl.replay_at must be perturbed or clean, got {e.replay_at!r}")
        if e.ids_score not in IDS_SCORES:
            raise ValueError(f"esacl.ids_score must be one of {IDS_SCORES}, got {e.ids_score!r}")
        if not 0.0 <= e.sparsity < 1.0:
            raise ValueError(f"esacl.sparsity must be in [0, 1), got {e.sparsity}")
        if not 0.0 < e.gamma <= 1.0:
            raise ValueError(f"esacl.gamma must be in (0, 1], got {e.gamma}")
        if e.rho < 0:
            raise ValueError(f"esacl.rho must be >= 0, got {e.rho}")
        for field in ("mask_update_every_epochs", "mask_update_every_steps"):
            if e[field] < 0:
                raise ValueError(f"esacl.{field} must be >= 0, got {e[field]}")
        if e.dense_to_sparse:
            if not 0.0 <= e.initial_sparsity < e.sparsity:
                raise ValueError("esacl.dense_to_sparse needs 0 <= esacl.initial_sparsity < "
                                 f"esacl.sparsity, got {e.initial_sparsity} and {e.sparsity}")
            if not 0.0 < e.prune_end_fraction <= 1.0 or e.prune_every_steps < 1:
                raise ValueError("esacl.prune_end_fraction must be in (0, 1] and "
                                 "esacl.prune_every_steps >= 1, got "
                                 f"{e.prune_end_fraction} and {e.prune_every_steps}")
            if e.distribution != "uniform":
                raise ValueError("esacl.dense_to_sparse prunes every layer to the same sparsity: "
                                 'it needs esacl.distribution="uniform"')
        if e.ids_unseen not in ids.UNSEEN_POLICIES:
            raise ValueError(f"esacl.ids_unseen must be one of {ids.UNSEEN_POLICIES}, "
                             f"got {e.ids_unseen!r}")
        every = e.mask_update_every_epochs
        if e.sdp and config.epochs > 1 and every and every >= config.epochs:
            logging.warning(
                "esacl.mask_update_every_epochs=%d never fires within a %d-epoch task (SDP then "
                "updates masks at task starts only): set it below %d, or 0 to say so",
                every, config.epochs, config.epochs)
        self.esacl = e
        if e.replay == "none":
            config = config.copy_and_resolve_references()
            with config.unlocked():
                config.buffer_size = 0
        super().__init__(config, model, benchmark)
        self.kept = ids.num_selected(config.batch_size, e.gamma)
        # Dense-to-sparse: the cubic ramp ends after this many optimizer steps (a fraction of the
        # first task's steps).
        first_task_steps = (benchmark.tasks[0].num_train // config.batch_size) * config.epochs
        self.ramp_steps = max(1, int(e.prune_end_fraction * first_task_steps))
        # Mask updates run between compiled epochs (task start, every k epochs), not in the scan.
        self._refresh_masks = jax.jit(functools.partial(sdp.refresh_masks, **self.mask_kwargs()))

    # ----- state -----
    def mask_kwargs(self) -> dict:
        e = self.esacl
        return dict(score=e.score, score_lambda=e.score_lambda, prune_fraction=e.prune_fraction,
                    regrow=e.regrow)

    def make_optimizer(self) -> optax.GradientTransformation:
        e = self.esacl
        front = sdp.sdp_transform(
            sparsity=e.initial_sparsity if e.dense_to_sparse else e.sparsity, rho=e.rho,
            distribution=e.distribution, ema_decay=e.ema_decay,
            mask_update_every_steps=e.mask_update_every_steps if e.sdp else 0,
            seed=self.config.seed, prunable=self.prunable, **self.mask_kwargs())
        return sdp.keep_sparse(optax.chain(front, make_optimizer(self.config)))

    def init_method_state(self, params: Any) -> Any:
        state = super().init_method_state(params)
        if self.esacl.step_variant == "C":
            capacity = max(t.num_train for t in self.benchmark.tasks)
            state["example_stats"] = ids.init_example_stats(capacity)
        return state

    def init(self, key: jax.Array) -> TrainState:
        state = super().init(key)
        # Start from the exactly sparse magnitude-pruned network the transform's masks describe.
        sdp_state = sdp.find_sdp_state(state.opt_state)
        sparse = masks.sparse_init(state.params, sdp_state.masks, rescale=self.esacl.init_rescale)
        return state.replace(params=sparse)

    # ----- replay -----
    def replay_loss(self, params, batch_stats, state, key):
        buffer = state.method_state["buffer"]
        if self.esacl.replay == "derpp":
            return derpp_replay_loss(self, params, batch_stats, buffer, key,
                                     self.config.der_alpha, self.config.der_beta)
        if self.esacl.replay == "er":
            logits, (_, y, _, _, valid) = self.replay_logits(params, batch_stats, key, buffer)
            return replay.er_loss(logits, y, valid)
        return jnp.zeros((), jnp.float32)

    # ----- the step: one function per variant, then a shared update -----
    def train_step(self, state: TrainState, batch: Batch, ctx: TaskContext,
                   key: jax.Array) -> tuple[TrainState, StepMetrics]:
        replay_key, insert_key, select_key = jax.random.split(key, 3)
        variant = {"A": self._clean_pass_step, "B": self._clean_pass_step,
                   "C": self._score_table_step}[self.esacl.step_variant]
        return variant(state, batch, ctx, replay_key, insert_key, select_key)

    def _no_sam(self) -> bool:
        return isinstance(self.esacl.rho, (int, float)) and self.esacl.rho == 0.0

    def _replay_at_clean(self) -> bool:
        """B and C may take the replay gradient at w instead of w + eps (A has it in the clean
        pass already)."""
        e = self.esacl
        return e.replay_at == "clean" and e.step_variant in ("B", "C") and not self._no_sam()

    def _current_ce(self, params, stats, x, y, mask):
        logits, new_stats = forward(self.model, params, stats, x, train=True)
        return losses.cross_entropy(logits, y, mask), logits, new_stats

    def _perturbed(self, state: TrainState, clean_grads: Any) -> Any:
        """w + eps (w itself when rho == 0): the transform's own point (`sdp.perturbed_params`),
        where this step takes the descent gradient it hands to the transform."""
        if self._no_sam():
            return state.params
        return sdp.perturbed_params(clean_grads, sdp.find_sdp_state(state.opt_state).masks,
                                    state.params, self.esacl.rho)

    def _descent(self, state, params, x, y, mask, replay_key, with_replay: bool):
        """Loss, per-example CE, logits and gradient of the descent objective at `params`."""

        def loss_fn(p):
            per_example, logits, _ = self._current_ce(p, state.batch_stats, x, y, mask)
            total = per_example.mean()
            if with_replay:
                total = total + self.replay_loss(p, state.batch_stats, state, replay_key)
            return total, (per_example, logits)

        (loss, (per_example, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, per_example, logits, grads

    def _clean_replay(self, state, replay_key):
        """(value, gradient) of the replay loss at the clean w."""
        return jax.value_and_grad(
            lambda p: self.replay_loss(p, state.batch_stats, state, replay_key))(state.params)

    def _clean_pass_step(self, state, batch, ctx, replay_key, insert_key, select_key):
        """Variants A and B: a clean pass on the current batch (A: plus replay) gives the ascent
        direction; the top-gamma examples by IDS score and the replay batch give the descent."""
        e, mask = self.esacl, self.current_loss_mask(ctx)
        with_replay_in_clean = e.step_variant == "A" and not self._no_sam()

        def clean_loss(params):
            per_example, logits, new_stats = self._current_ce(
                params, state.batch_stats, batch.x, batch.y, mask)
            total = per_example.mean()
            if with_replay_in_clean:
                total = total + self.replay_loss(params, state.batch_stats, state, replay_key)
            return total, (per_example, logits, new_stats)

        if self._no_sam():  # eps = 0: the clean gradient is never used, only the forward pass
            _, (clean_per_example, clean_logits, new_stats) = clean_loss(state.params)
            grads = jax.tree.map(jnp.zeros_like, state.params)
        else:
            (_, (clean_per_example, clean_logits, new_stats)), grads = jax.value_and_grad(
                clean_loss, has_aux=True)(state.params)
        perturbed = self._perturbed(state, grads)

        if e.gamma >= 1.0:
            x_kept, y_kept = batch.x, batch.y
        else:
            if e.ids_score == "clean_loss":
                scores = clean_per_example
            elif e.ids_score == "random" or self._no_sam():  # rho = 0: every sharpness is 0
                scores = jax.random.uniform(select_key, clean_per_example.shape)
            else:
                scores, _, _ = self._current_ce(perturbed, state.batch_stats, batch.x, batch.y,
                                                mask)
                if e.ids_score == "sharpness":
                    scores = scores - clean_per_example
            kept, _ = ids.select_top(jax.lax.stop_gradient(scores), e.gamma)
            x_kept, y_kept = batch.x[kept], batch.y[kept]

        replay_at_clean = self._replay_at_clean()
        loss, _, _, descent_grads = self._descent(state, perturbed, x_kept, y_kept, mask,
                                                  replay_key, with_replay=not replay_at_clean)
        if replay_at_clean:
            _, replay_grads = self._clean_replay(state, replay_key)
            descent_grads = jax.tree.map(jnp.add, descent_grads, replay_grads)
        state = self._apply(state, grads, descent_grads, new_stats)
        return self._record(state, batch, ctx, insert_key, clean_logits, loss)

    def _score_table_step(self, state, batch, ctx, replay_key, insert_key, select_key):
        """Variant C: the ascent pass uses only the top-gamma examples of the per-example score
        table (filled by earlier passes); descent on the whole batch + replay at w + eps; the
        descent pass records loss, correctness and (for the selected examples) sharpness."""
        e, mask = self.esacl, self.current_loss_mask(ctx)
        table = state.method_state["example_stats"]
        if e.ids_score == "random":
            table_score = jax.random.uniform(select_key, batch.index.shape)
        else:
            kind = "estimated_sharpness" if e.ids_score == "sharpness" else "loss"
            table_score = ids.table_scores(table, batch.index, kind, unseen=e.ids_unseen)
        selected, _ = ids.select_top(table_score, e.gamma)

        def clean_loss(params):
            per_example, logits, new_stats = self._current_ce(
                params, state.batch_stats, batch.x[selected], batch.y[selected], mask)
            return per_example.mean(), (per_example, new_stats)

        (_, (clean_selected, new_stats)), grads = jax.value_and_grad(
            clean_loss, has_aux=True)(state.params)
        perturbed = self._perturbed(state, grads)

        replay_at_clean = self._replay_at_clean()
        loss, per_example, logits, descent_grads = self._descent(
            state, perturbed, batch.x, batch.y, mask, replay_key, with_replay=not replay_at_clean)
        if replay_at_clean:
            replay_value, replay_grads = self._clean_replay(state, replay_key)
            loss = loss + replay_value
            descent_grads = jax.tree.map(jnp.add, descent_grads, replay_grads)

        # One update of the table (one scatter per field): the batch's losses and correctness,
        # and the sharpness measured on the selected examples (the others keep theirs).
        _, sharpness = ids.gather_scores(table, batch.index)
        sharpness = sharpness.at[selected].set(per_example[selected] - clean_selected)
        table = ids.update_example_stats(table, batch.index, loss=per_example,
                                         sharpness=sharpness,
                                         correct=losses.correct(logits, batch.y, mask))
        state = state.replace(method_state={**state.method_state, "example_stats": table})
        state = self._apply(state, grads, descent_grads, new_stats)
        return self._record(state, batch, ctx, insert_key, logits, loss)

    def _apply(self, state: TrainState, clean_grads: Any, descent_grads: Any,
               new_stats: Any) -> TrainState:
        """The optimizer step: sdp_transform gets the clean gradient (ascent direction) and a
        `grad_fn` that is the descent gradient already taken at w + eps (the point the transform
        perturbs to, computed above with the same library functions)."""
        updates, opt_state = self.tx.update(clean_grads, state.opt_state, state.params,
                                            grad_fn=lambda _: descent_grads)
        state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              batch_stats=new_stats, opt_state=opt_state)
        return self._gradual_prune(state) if self.esacl.dense_to_sparse else state

    # ----- dense-to-sparse: prune along SDP scores on a cubic schedule, no retraining -----
    def target_sparsity(self, step: jax.Array) -> jax.Array:
        """s(t) = s_f + (s_0 - s_f) (1 - t / T)^3 (Zhu & Gupta's gradual schedule), T the ramp."""
        e = self.esacl
        t = jnp.minimum(jnp.asarray(step, jnp.float32) / self.ramp_steps, 1.0)
        return e.sparsity + (e.initial_sparsity - e.sparsity) * (1.0 - t) ** 3

    def _gradual_prune(self, state: TrainState) -> TrainState:
        """Every prune_every_steps steps of the ramp (and at its last step, which reaches the
        target exactly) keep each layer's top SDP scores among its active weights; the newly
        pruned weights become exactly 0. The rare prune runs under lax.cond: other steps skip it.
        """
        e, step = self.esacl, state.step
        do = ((step % e.prune_every_steps == 0) & (step < self.ramp_steps)) | (
            step == self.ramp_steps)

        def prune(state: TrainState) -> TrainState:
            sdp_state = sdp.find_sdp_state(state.opt_state)
            scores = masks.sdp_scores(
                state.params, sdp_state.grad_ema, kind=e.score, score_lambda=e.score_lambda,
                curvature=sdp_state.curvature_ema if e.score == "taylor" else None)
            target = self.target_sparsity(step)

            def layer(mask: jax.Array, score: jax.Array) -> jax.Array:
                if jnp.ndim(mask) == 0:  # not prunable
                    return mask
                keep = mask.size - jnp.round(target * mask.size).astype(jnp.int32)
                return masks.keep_top(jnp.where(mask, score, -jnp.inf), keep) & mask

            new_masks = jax.tree.map(layer, sdp_state.masks, scores)
            params = masks.apply_masks(state.params, new_masks)
            opt_state = sdp.replace_sdp_state(state.opt_state,
                                              sdp_state._replace(masks=new_masks))
            return state.replace(params=params, opt_state=opt_state)

        return jax.lax.cond(do, prune, lambda s: s, state)

    def _record(self, state, batch, ctx, insert_key, logits, loss):
        """Reservoir insertion with the step's logits, and the step's metrics."""
        if self.buffer_size > 0:
            buffer = replay.add_reservoir(
                state.method_state["buffer"], insert_key, batch.x_raw, batch.y,
                jax.lax.stop_gradient(logits).astype(jnp.float32), ctx.task_id)
            state = state.replace(method_state={**state.method_state, "buffer": buffer})
        accuracy = losses.correct(logits, batch.y, self.current_loss_mask(ctx)).mean()
        return state, StepMetrics(loss, accuracy)

    # ----- host-side hooks: SDP mask updates, never a retraining phase -----
    def _refresh(self, state: TrainState) -> TrainState:
        if not self.esacl.sdp:
            return state
        opt_state, params = self._refresh_masks(state.opt_state, state.params)
        return state.replace(opt_state=opt_state, params=params)

    def begin_task(self, state: TrainState, task_id: int) -> TrainState:
        state = super().begin_task(state, task_id)
        if task_id > 0:  # at task 0 there is no sharpness-aware gradient history to score with
            state = self._refresh(state)
        if self.esacl.step_variant == "C":
            stats = ids.reset_example_stats(state.method_state["example_stats"])
            state = state.replace(method_state={**state.method_state, "example_stats": stats})
        return state

    def begin_epoch(self, state: TrainState, task_id: int, epoch: int) -> TrainState:
        every = self.esacl.mask_update_every_epochs
        if every and epoch > 0 and epoch % every == 0:
            state = self._refresh(state)
        return state

    def sparse_masks(self, state: TrainState) -> Any:
        return sdp.find_sdp_state(state.opt_state).masks

    def step_passes(self) -> list[Pass]:
        """What one step executes (METHOD.md cost model: fwd = 1, fwd+bwd = 3 per example)."""
        e, batch = self.esacl, self.config.batch_size
        replay_passes = {"derpp": 2, "er": 1, "none": 0}[e.replay]
        replay = [Pass("fwd_bwd", self.replay_batch_size)] * replay_passes
        if e.step_variant == "C":  # ascent on the selected examples; descent on all + replay
            return [Pass("fwd_bwd", self.kept), Pass("fwd_bwd", batch), *replay]
        if e.rho == 0.0:  # no SAM: a clean forward (buffer logits, BN statistics) only
            return [Pass("fwd", batch), Pass("fwd_bwd", self.kept), *replay]
        clean = [Pass("fwd_bwd", batch)] + (replay if e.step_variant == "A" else [])
        sharpness = ([Pass("fwd", batch)] if e.gamma < 1.0 and e.ids_score in
                     ("sharpness", "perturbed_loss") else [])
        return [*clean, *sharpness, Pass("fwd_bwd", self.kept), *replay]

    def summary(self, state: TrainState) -> dict:
        prunable = masks.prunable_tree(state.params, self.prunable)
        return {"sparsity": masks.sparsity_summary(self.sparse_masks(state), prunable)}

