"""EsaCL: sharpness-aware directional pruning (SDP) + intelligent data selection (IDS) + replay.

The step is the library's (`esacl_jax.esacl_gradients`, one implementation for the harness and
users' own loops); this class adds what the harness owns: the model's forward pass with its class
mask and BatchNorm statistics, the DER++/ER replay terms on the reservoir buffer, the score table
in the train state, mask refreshes between compiled epochs, dense-to-sparse pruning and the FLOPs
model. Three cost variants are configurations of the one step:
  A: clean pass (fwd+bwd) on current + replay; sharpness forward on current at w+eps; descent on
     the kept current examples + replay at w+eps.
  B: as A but the clean pass sees the current batch only (METHOD.md's reference form).
  C: (default) the ascent (clean) pass uses only the top-gamma examples by the per-example score
     table filled by earlier passes; descent on the whole current batch + replay; no extra
     forward.
The sparse start is the magnitude mask of the random init (`esacl_jax.sparse_start`), its kept
weights as they are or, with config.sparse_start="rescaled", each unit's rescaled to its dense
norm (the same start every sparse method reads from config.sparse_start). The optimizer
is `esacl_jax.esacl_optimizer(sgd)` = `keep_sparse(chain(sdp_transform(...), sgd))`, exactly what
users chain in their own loops. BatchNorm running statistics come from the clean pass only.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

import jax
import jax.numpy as jnp
import optax

from esacl_jax import esacl as esacl_lib
from esacl_jax import ids, masks, replay, sdp
from esacl_jax.harness import compilation, losses
from esacl_jax.harness.config import sparse_start_of
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
from esacl_jax.harness.methods.state import EsaCLState
from esacl_jax.harness.models import forward

STEP_VARIANTS = ("A", "B", "C")
IDS_SCORES = esacl_lib.IDS_SCORES
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
        self._refresh_compiling: threading.Thread | None = None
        # One compiled program (not one small compilation per field) empties the score table.
        self._reset_table = jax.jit(ids.reset_example_stats)

    # ----- state -----
    def mask_kwargs(self) -> dict:
        e = self.esacl
        return dict(score=e.score, score_lambda=e.score_lambda, prune_fraction=e.prune_fraction,
                    regrow=e.regrow)

    def make_optimizer(self) -> optax.GradientTransformation:
        e = self.esacl
        return esacl_lib.esacl_optimizer(
            make_optimizer(self.config),
            sparsity=e.initial_sparsity if e.dense_to_sparse else e.sparsity, rho=e.rho,
            distribution=e.distribution, ema_decay=e.ema_decay,
            mask_update_every_steps=e.mask_update_every_steps if e.sdp else 0,
            seed=self.config.seed, prunable=self.prunable, **self.mask_kwargs())

    def init_method_state(self, params: Any) -> Any:
        state = EsaCLState(buffer=super().init_method_state(params).buffer)
        if self.esacl.step_variant == "C":
            capacity = max(t.num_train for t in self.benchmark.tasks)
            state = state._replace(example_stats=ids.init_example_stats(capacity))
        return state

    def init(self, key: jax.Array) -> TrainState:
        state = super().init(key)
        # Start from the exactly sparse magnitude-pruned network the transform's masks describe.
        rescale = sparse_start_of(self.config) == "rescaled"
        return state.replace(params=esacl_lib.sparse_start(state.params, state.opt_state,
                                                           rescale=rescale))

    # ----- replay -----
    def replay_loss(self, params, batch_stats, state, key):
        buffer = state.method_state.buffer
        if self.esacl.replay == "derpp":
            return derpp_replay_loss(self, params, batch_stats, buffer, key,
                                     self.config.der_alpha, self.config.der_beta)
        if self.esacl.replay == "er":
            logits, (_, y, _, _, valid) = self.replay_logits(params, batch_stats, key, buffer)
            return replay.er_loss(logits, y, valid)
        return jnp.zeros((), jnp.float32)

    # ----- the step: the library's esacl_gradients for every variant, then the optimizer -----
    def _no_sam(self) -> bool:
        return sdp.static_zero(self.esacl.rho)

    def _replay_at_clean(self) -> bool:
        """B and C may take the replay gradient at w instead of w + eps (A has it in the clean
        pass already)."""
        e = self.esacl
        return e.replay_at == "clean" and e.step_variant in ("B", "C") and not self._no_sam()

    def train_step(self, state: TrainState, batch: Batch, ctx: TaskContext,
                   key: jax.Array) -> tuple[TrainState, StepMetrics]:
        """The library's composed step (`esacl_jax.esacl_gradients`) on the harness's model,
        class mask and replay buffer; BatchNorm statistics come from the clean pass."""
        replay_key, insert_key, select_key = jax.random.split(key, 3)
        e, mask = self.esacl, self.current_loss_mask(ctx)

        def loss_fn(params, rows):
            x, y = rows
            logits, new_stats = forward(self.model, params, state.batch_stats, x, train=True)
            return losses.cross_entropy(logits, y, mask), (logits, new_stats)

        table_c = e.step_variant == "C"
        g = esacl_lib.esacl_gradients(
            loss_fn, state.params, (batch.x, batch.y), state.opt_state,
            table=state.method_state.example_stats if table_c else None,
            example_index=batch.index if table_c else None,
            gamma=e.gamma, ids_score=e.ids_score, unseen=e.ids_unseen, check_index=False,
            replay_loss_fn=lambda p: self.replay_loss(p, state.batch_stats, state, replay_key),
            replay_at="clean" if self._replay_at_clean() else "perturbed",
            replay_in_ascent=e.step_variant == "A",
            correct_fn=lambda aux: losses.correct(aux[0], batch.y, mask), key=select_key)
        if table_c:
            state = state.replace(method_state=state.method_state._replace(example_stats=g.table))
            logits = g.aux[0]
        else:  # the buffer stores the clean pass's logits of the whole batch
            logits = g.ascent_aux[0]
        state = self._apply(state, g.ascent_grads, g.descent_grads, g.ascent_aux[1])
        return self._record(state, batch, ctx, insert_key, logits, g.loss)

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
                if not masks.is_prunable_mask(mask):
                    return mask
                keep = mask.size - jnp.round(target * mask.size).astype(jnp.int32)
                return masks.top_mask(jnp.where(mask, score, -jnp.inf), keep) & mask

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
                state.method_state.buffer, insert_key, batch.x_raw, batch.y,
                jax.lax.stop_gradient(logits).astype(jnp.float32), ctx.task_id)
            state = state.replace(method_state=state.method_state._replace(buffer=buffer))
        accuracy = losses.correct(logits, batch.y, self.current_loss_mask(ctx)).mean()
        return state, StepMetrics(loss, accuracy)

    # ----- host-side hooks: SDP mask updates, never a retraining phase -----
    def _refresh(self, state: TrainState) -> TrainState:
        if not self.esacl.sdp:
            return state
        if self._refresh_compiling is not None:  # compiled in the background: wait for it
            self._refresh_compiling.join()
            self._refresh_compiling = None
        opt_state, params = self._refresh_masks(state.opt_state, state.params)
        return state.replace(opt_state=opt_state, params=params)

    def _compile_refresh_in_background(self, state: TrainState) -> None:
        """Compile the mask update while the first task trains (it is first used at the next
        task start, or a few epochs in), so its compilation is off the run's critical path on a
        machine with a spare core. Same program, same results; if this fails, the first call
        compiles it as before."""
        def spec(x: Any) -> Any:  # the call's signature: a committed array's sharding is part of it
            committed = getattr(x, "committed", False)
            return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x),
                                        sharding=x.sharding if committed else None)

        specs = jax.tree.map(spec, (state.opt_state, state.params))

        # The run's owner joins the thread however the run ends (`compilation`).
        owner = compilation.current_owner()
        self._refresh_compiling = owner.start(
            lambda: compilation.compile_unless_stopping(self._refresh_masks, specs, owner),
            name="esacl-mask-refresh-compile")

    def begin_task(self, state: TrainState, task_id: int) -> TrainState:
        state = super().begin_task(state, task_id)
        refreshes = self.esacl.sdp and (len(self.benchmark.tasks) > 1 or (
            self.esacl.mask_update_every_epochs
            and self.esacl.mask_update_every_epochs < self.config.epochs))
        if task_id == 0 and refreshes and self._refresh_compiling is None:
            self._compile_refresh_in_background(state)
        if task_id > 0:  # at task 0 there is no sharpness-aware gradient history to score with
            state = self._refresh(state)
        if self.esacl.step_variant == "C":
            stats = self._reset_table(state.method_state.example_stats)
            state = state.replace(method_state=state.method_state._replace(example_stats=stats))
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
        if self._no_sam():  # no SAM: a clean forward (buffer logits, BN statistics) only
            return [Pass("fwd", batch), Pass("fwd_bwd", self.kept), *replay]
        clean = [Pass("fwd_bwd", batch)] + (replay if e.step_variant == "A" else [])
        sharpness = ([Pass("fwd", batch)] if e.gamma < 1.0 and e.ids_score in
                     ("sharpness", "perturbed_loss") else [])
        return [*clean, *sharpness, Pass("fwd_bwd", self.kept), *replay]

    def summary(self, state: TrainState) -> dict:
        prunable = masks.prunable_tree(state.params, self.prunable)
        return {"sparsity": masks.sparsity_summary(self.sparse_masks(state), prunable)}

