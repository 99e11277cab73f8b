"""SparCL (Wang et al., NeurIPS 2022), faithful to its official code, around a dense base method.

SparCL = a base continual method (online EWC, ER or DER++, `config.sparcl.base`; CO2L through
`SparCLCO2L`, whose docstring says what differs: the contrastive step, the projection head in
the prunable set, and DDR's correctness from nearest class means) trained with three efficiency
mechanisms (METHOD.md "SparCL"):

- TDM, task-aware dynamic masking. Weight masks live in `method_state.masks` (bool, params
  structure, sparse only on `masks.default_prunable` leaves, scalar True elsewhere), initialised
  by per-layer magnitude pruning of the random init. Score |w| + score_lambda * |g|, g the dense
  gradient of the last minibatch of the previous epoch (`method_state.last_grad`; zero before
  the first step, so the first update of a run is by magnitude). At epochs 0, tdm_every, ... of
  each task, before the freeze epoch: prune the active weights to s + tdm_extra, then regrow at
  random (zero-initialised) to exactly s. At the freeze epoch F: prune to s without regrowth and
  keep the mask fixed for the rest of the task.
  Scaling rule: F = floor(tdm_freeze_fraction * epochs + 0.5) (45 of 50 epochs). When F >= epochs
  the task has no freeze epoch; with 1-epoch tasks (MNIST protocols, F = 1) that means one
  prune-and-regrow at epoch 0 of every task, and the mask then stays fixed for the (single)
  epoch. `tdm_freeze_fraction=0` gives the other reading: a freeze at epoch 0 (prune to s, no
  regrowth), i.e. a mask that never changes after its magnitude initialisation.
  Known deviation: the official script's bounds make epochs 0-4 of each task run at s - 0.01
  (prune to s, grow to s - 0.01 at epoch 0); here every update returns to exactly s.
- DGM, dynamic gradient masking. At the first step of every epoch and every `dgm_every` steps
  after it (the official code counts minibatches within the epoch), each prunable layer's gradient
  mask is recomputed: exactly round(dgm_keep * size) entries with the largest |grad * weight_mask|
  (the official "80th percentile over the whole tensor"), intersected with the weight mask; it is
  reused until the next refresh. The applied gradient is grad * weight_mask * grad_mask.
  The refresh sits behind lax.cond, so the other steps pay nothing for it. It is an exact top-k
  without sorting: a 32-step bisection on the float32 bit patterns of |grad| (monotone for
  non-negative floats), i.e. ~32 compare-and-count passes over the prunable kernels, and a
  cumulative sum to break ties by index.
  FLOPs: gradient density min(weight density, dgm_keep) per prunable layer (0.20 at s = 0.75,
  SparCL's published g = 0.80).
- DDR, dynamic data removal. Per-example forgetting events (correct -> incorrect transitions of
  the argmax over the whole head, as the official code records them) accumulate in an
  `ids.ExampleStats` table indexed by `batch.index`. At the removal epochs the `ddr_fraction`
  of the task's examples with the fewest events are dropped from `epoch_indices` (examples never
  classified correctly count as the most forgotten, unseen ones are never dropped, ties broken at
  random), and the table is reset (the official code clears its statistics after each removal).
  Scaling rule: the official epochs `ddr_epochs` (5, 10, 15, 20 of `ddr_reference_epochs` = 50)
  map to max(1, floor(e * epochs / 50 + 0.5)); events landing on the same epoch add their
  fractions; events at or beyond the last epoch are dropped. Hence 50 epochs: 750 of 10000 at
  epochs 5, 10, 15, 20; 5 epochs: 15% at epoch 1 and 15% at epoch 2; 1 epoch: DDR never runs.

Every step: pruned weights (and their updates) are exactly zero, whatever optimizer is
configured; SparCL re-creates its optimizer at every task start (plain SGD has no state).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from esacl_jax import ids
from esacl_jax import masks as masks_lib
from esacl_jax.harness import flops as flops_lib
from esacl_jax.harness import losses
from esacl_jax.harness.methods.base import (
    Batch,
    SparseWrapperMethod,
    StepMetrics,
    TaskContext,
    TrainState,
)
from esacl_jax.harness.methods.state import SparCLState, widen

SPARCL_BASES = ("ewc", "er", "derpp")
_INF_BITS = 0x7F800000  # bit pattern of +inf in float32: the largest finite-or-inf |grad| key


# ----------------------------------------------------------------------------- pure pieces


_is_sparse_leaf = masks_lib.is_prunable_mask  # the masks convention's one rule


def _kth_largest(keys: jax.Array, k: int) -> jax.Array:
    """The k-th largest value of int32 `keys` in [-1, +inf bits] (k >= 1), by bisection.

    Finds the largest t with count(keys >= t) >= k; 32 halvings cover the 2**31 range.
    """
    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo + 1) // 2
        ok = jnp.sum(keys >= mid, dtype=jnp.int32) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (jnp.int32(-1), jnp.int32(_INF_BITS)))
    return lo


def dgm_leaf_mask(grad: jax.Array, weight_mask: jax.Array, keep: float) -> jax.Array:
    """DGM gradient mask of one layer: the round(keep * size) largest |grad| among the active
    weights (ties to the lower flat index), intersected with `weight_mask`.

    Exactly round(keep * size) True when at least that many weights are active, else the whole
    weight mask. Sort-free (bisection on float bit patterns), jit-friendly, static shapes.
    """
    size = math.prod(grad.shape)
    k = int(round(keep * size))
    active = jnp.broadcast_to(weight_mask, grad.shape).reshape(-1)
    if k <= 0:
        return jnp.zeros(grad.shape, bool)
    bits = jax.lax.bitcast_convert_type(jnp.abs(grad.astype(jnp.float32)).reshape(-1), jnp.int32)
    keys = jnp.where(active, jnp.minimum(bits, _INF_BITS), -1)  # NaN -> +inf; pruned lowest
    t = _kth_largest(keys, k)
    above = keys > t
    ties = keys == t
    need = k - jnp.sum(above, dtype=jnp.int32)
    selected = above | (ties & (jnp.cumsum(ties, dtype=jnp.int32) <= need))
    return (selected & active).reshape(grad.shape)


def dgm_masks(grads: Any, weight_masks: Any, keep: float) -> Any:
    """`dgm_leaf_mask` on every prunable leaf; scalar True elsewhere (the masks convention)."""
    return jax.tree.map(
        lambda g, m: dgm_leaf_mask(g, m, keep) if _is_sparse_leaf(m) else jnp.ones((), bool),
        grads, weight_masks)


def tdm_update(masks: Any, params: Any, grads: Any, key: jax.Array, *, sparsities: Any,
               extra: float, score_lambda: float, regrow: bool) -> tuple[Any, Any]:
    """One TDM mask update. Returns (new masks, params with every inactive weight zeroed).

    Per prunable layer of `size` weights at target sparsity s: keep the
    size - round(min(s + extra, 1) * size) active weights with the highest |w| + lambda * |g|
    (`regrow=True`) or the size - round(s * size) highest (`regrow=False`), then (`regrow=True`)
    regrow uniformly at random among all inactive weights, the just-pruned included as in the
    official code, up to exactly size - round(s * size) active. Regrown weights start at 0.
    """
    flat_masks, treedef = jax.tree.flatten(masks)
    flat_params = treedef.flatten_up_to(params)
    flat_grads = treedef.flatten_up_to(grads)
    flat_sparsity = treedef.flatten_up_to(sparsities)
    keys = jax.random.split(key, len(flat_masks))
    new_masks, new_params = [], []
    for m, w, g, s, k in zip(flat_masks, flat_params, flat_grads, flat_sparsity, keys,
                             strict=True):
        if not _is_sparse_leaf(m):
            new_masks.append(m)
            new_params.append(w)
            continue
        size = math.prod(w.shape)
        n_active = size - int(round(float(s) * size))
        n_kept = size - int(round(min(float(s) + extra, 1.0) * size)) if regrow else n_active
        score = jnp.abs(w.astype(jnp.float32)) + score_lambda * jnp.abs(g.astype(jnp.float32))
        kept = masks_lib.top_mask(jnp.where(m, score, -jnp.inf), n_kept)
        new = kept
        if regrow and n_active > n_kept:
            r = jax.random.uniform(k, w.shape, jnp.float32)
            new = kept | masks_lib.top_mask(jnp.where(kept, -jnp.inf, r), n_active - n_kept)
        new_masks.append(new)
        new_params.append(jnp.where(kept, w, jnp.zeros((), w.dtype)))
    return treedef.unflatten(new_masks), treedef.unflatten(new_params)


def tdm_schedule(epochs: int, every: int, freeze_fraction: float) -> dict[int, str]:
    """{epoch: "regrow" | "freeze"} of one task (see the module doc for the scaling rule)."""
    freeze = int(math.floor(freeze_fraction * epochs + 0.5))
    plan: dict[int, str] = {}
    for epoch in range(epochs):
        if epoch < freeze and every > 0 and epoch % every == 0:
            plan[epoch] = "regrow"
        elif epoch == freeze:
            plan[epoch] = "freeze"
    return plan


def ddr_schedule(epochs: int, ddr_epochs: tuple[int, ...], reference_epochs: int,
                 fraction: float) -> dict[int, float]:
    """{epoch: fraction of the task's examples removed at its start} (module doc: scaling)."""
    plan: dict[int, float] = {}
    for e in ddr_epochs:
        scaled = max(1, int(math.floor(e * epochs / reference_epochs + 0.5)))
        if scaled < epochs:
            plan[scaled] = plan.get(scaled, 0.0) + fraction
    return dict(sorted(plan.items()))


def ddr_removal(forgetting: np.ndarray, correct: np.ndarray, seen: np.ndarray,
                alive: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """New `alive` flags after dropping `count` alive, seen examples with the fewest forgetting
    events (never-learned examples rank as the most forgotten; random tie-break). Host-side."""
    never_learned = (forgetting == 0) & ~correct
    score = forgetting.astype(np.float64) + np.where(never_learned, np.inf, 0.0)
    candidates = alive & (seen > 0)
    score = np.where(candidates, score, np.nan)  # NaN sorts last: never removed
    count = int(min(count, candidates.sum()))
    order = np.lexsort((rng.permutation(alive.shape[0]), np.nan_to_num(score, nan=np.inf),
                        ~candidates))
    new = alive.copy()
    new[order[:count]] = False
    return new


# ----------------------------------------------------------------------------- SparCL


class SparCL(SparseWrapperMethod):
    """SparCL-{EWC, ER, DER++}: TDM + DGM + DDR around the base chosen by config.sparcl.base."""

    name = "sparcl"
    config_section = "sparcl"
    sparse = True
    uses_buffer = True  # with the default base (DER++); SparCL-EWC has none
    allowed_bases = SPARCL_BASES

    def __init__(self, config, model, benchmark):
        c = config.sparcl
        if not 0.0 <= c.sparsity < 1.0:
            raise ValueError(f"sparcl.sparsity must be in [0, 1), got {c.sparsity}")
        if not 0.0 < c.dgm_keep <= 1.0 or c.dgm_every < 1:
            raise ValueError("sparcl.dgm_keep must be in (0, 1] and sparcl.dgm_every >= 1, got "
                             f"{c.dgm_keep} and {c.dgm_every}")
        if c.tdm_every < 0 or c.tdm_extra < 0 or not 0.0 <= c.tdm_freeze_fraction <= 1.0:
            raise ValueError("sparcl.tdm_every and sparcl.tdm_extra must be >= 0 and "
                             "sparcl.tdm_freeze_fraction in [0, 1]")
        if not 0.0 <= c.ddr_fraction <= 1.0 or c.ddr_reference_epochs < 1:
            raise ValueError("sparcl.ddr_fraction must be in [0, 1] and "
                             "sparcl.ddr_reference_epochs >= 1")
        self.sp = c
        super().__init__(config, model, benchmark, base_name=c.base)
        self.tdm_plan = tdm_schedule(config.epochs, c.tdm_every, c.tdm_freeze_fraction) \
            if c.tdm else {}
        self.ddr_plan = ddr_schedule(config.epochs, tuple(c.ddr_epochs), c.ddr_reference_epochs,
                                     c.ddr_fraction) if c.ddr else {}
        self.stats_capacity = max(t.num_train for t in benchmark.tasks)
        self._pending_keep: tuple[int, int, np.ndarray] | None = None
        self._sparsities: Any = None
        self._tdm_fns: dict[bool, Any] = {}

    # ----- state -----
    def prunable_flags(self, params: Any) -> Any:
        """The bool tree of the leaves SparCL prunes (config.prunable on the params)."""
        return masks_lib.prunable_tree(params, self.prunable)

    def sparsities(self, params: Any) -> Any:
        if self._sparsities is None:
            self._sparsities = masks_lib.layer_sparsities(
                params, self.sp.sparsity, self.sp.distribution, self.prunable_flags(params))
        return self._sparsities

    def init_method_state(self, params: Any) -> Any:
        weight_masks = masks_lib.magnitude_masks(params, self.sparsities(params),
                                                 self.prunable_flags(params))
        sparse_params = self.sparse_start(params, weight_masks)
        state = widen(SparCLState, self.base.init_method_state(sparse_params), masks=weight_masks)
        state = state._replace(last_grad=jax.tree.map(
            lambda w, m: jnp.zeros(w.shape, jnp.float32) if _is_sparse_leaf(m)
            else jnp.zeros((), jnp.float32), params, weight_masks))
        if self.sp.dgm:
            state = state._replace(grad_masks=weight_masks, dgm_step=jnp.zeros((), jnp.int32))
        if self.sp.ddr:
            state = state._replace(example_stats=ids.init_example_stats(self.stats_capacity),
                                   ddr_keep=jnp.ones((self.stats_capacity,), bool))
        return state

    def init(self, key: jax.Array) -> TrainState:
        state = super().init(key)
        return state.replace(params=self.sparse_start(state.params, state.method_state.masks))

    # ----- the compiled step -----
    def sparse_update(self, state: TrainState, grads: Any) -> tuple[Any, Any, dict]:
        """The step's update from the base's dense gradient: weight masks, DGM's gradient masks,
        the optimizer. Returns (params, opt_state, method_state updates)."""
        ms = state.method_state
        weight_masks = ms.masks
        masked = masks_lib.apply_masks(grads, weight_masks)
        updates = {}
        if self.sp.dgm:
            refresh = ms.dgm_step % self.sp.dgm_every == 0
            # lax.cond, not jnp.where: the top-k runs only on refresh steps (1 in dgm_every).
            grad_masks = jax.lax.cond(
                refresh, lambda g: dgm_masks(g, weight_masks, self.sp.dgm_keep),
                lambda _: ms.grad_masks, masked)
            masked = masks_lib.apply_masks(masked, grad_masks)
            updates.update(grad_masks=grad_masks, dgm_step=ms.dgm_step + 1)
        params, opt_state = self.masked_update(state, masked, weight_masks)
        updates["last_grad"] = jax.tree.map(
            lambda g, m: g.astype(jnp.float32) if _is_sparse_leaf(m)
            else jnp.zeros((), jnp.float32), grads, weight_masks)
        return params, opt_state, updates

    def train_step(self, state: TrainState, batch: Batch, ctx: TaskContext,
                   key: jax.Array) -> tuple[TrainState, StepMetrics]:
        replay_key, after_key = jax.random.split(key)
        loss, (logits, new_stats, per_example), grads = self.loss_and_grads(state, batch, ctx,
                                                                            replay_key)
        ms = state.method_state
        params, opt_state, updates = self.sparse_update(state, grads)
        if self.sp.ddr:  # official: argmax over the whole head, before the update
            updates["example_stats"] = ids.update_example_stats(
                ms.example_stats, batch.index, correct=losses.correct(logits, batch.y))
        method_state = self.base.after_step(state, batch, ctx, logits, per_example,
                                            after_key)._replace(**updates)
        return self.finish_step(state, batch, ctx, params, new_stats, opt_state, method_state,
                                logits, loss)

    # ----- host-side hooks -----
    def begin_task(self, state: TrainState, task_id: int) -> TrainState:
        state = self.base.begin_task(state, task_id)
        ms = state.method_state
        if self.sp.ddr:
            ms = ms._replace(example_stats=ids.reset_example_stats(ms.example_stats),
                             ddr_keep=jnp.ones_like(ms.ddr_keep))
        self._pending_keep = None
        # SparCL re-creates its optimizer at every task start.
        return state.replace(opt_state=self.tx.init(state.params), method_state=ms)

    def epoch_indices(self, state: TrainState, task_id: int, epoch: int,
                      num_examples: int) -> np.ndarray | None:
        if not self.ddr_plan:  # DDR off, or no removal epoch in this budget (1-epoch tasks)
            return None
        alive = np.asarray(jax.device_get(state.method_state.ddr_keep))[:num_examples]
        if epoch in self.ddr_plan:
            stats = jax.device_get(state.method_state.example_stats)
            count = int(round(self.ddr_plan[epoch] * num_examples))
            rng = np.random.default_rng([self.config.seed, task_id, epoch])
            alive = ddr_removal(np.asarray(stats.forgetting)[:num_examples],
                                np.asarray(stats.correct)[:num_examples],
                                np.asarray(stats.seen)[:num_examples], alive, count, rng)
            self._pending_keep = (task_id, epoch, alive)
        return np.flatnonzero(alive).astype(np.int32)

    def _tdm_fn(self, regrow: bool):
        if regrow not in self._tdm_fns:
            def update(weight_masks, params, grads, key):
                return tdm_update(weight_masks, params, grads, key,
                                  sparsities=self.sparsities(params), extra=self.sp.tdm_extra,
                                  score_lambda=self.sp.score_lambda, regrow=regrow)
            self._tdm_fns[regrow] = jax.jit(update)
        return self._tdm_fns[regrow]

    def begin_epoch(self, state: TrainState, task_id: int, epoch: int) -> TrainState:
        ms = state.method_state
        params = state.params
        if self._pending_keep is not None and self._pending_keep[:2] == (task_id, epoch):
            alive = self._pending_keep[2]
            keep = np.zeros((self.stats_capacity,), bool)
            keep[: alive.shape[0]] = alive
            ms = ms._replace(ddr_keep=jnp.asarray(keep),
                             example_stats=ids.reset_example_stats(ms.example_stats))
            self._pending_keep = None
        action = self.tdm_plan.get(epoch)
        if action is not None:
            key = jax.random.fold_in(jax.random.fold_in(state.rng, 2_000_003 + task_id), epoch)
            weight_masks, params = self._tdm_fn(action == "regrow")(ms.masks, params,
                                                                    ms.last_grad, key)
            ms = ms._replace(masks=weight_masks)
        if self.sp.dgm:  # refresh at the epoch's first step
            ms = ms._replace(dgm_step=jnp.zeros((), jnp.int32))
        return state.replace(params=params, method_state=ms)

    def end_task(self, state: TrainState, task_id: int, x: np.ndarray, y: np.ndarray) -> TrainState:
        return self.base.end_task(state, task_id, x, y)

    # ----- accounting -----
    def flops_densities(self, state: TrainState) -> tuple[dict | None, dict | None]:
        """Weight densities from the masks; gradient densities min(weight density, dgm_keep)
        on prunable layers (DGM keeps round(dgm_keep * size) of the active gradients), the
        weight density elsewhere. SparCL's published g = 0.80 at s = 0.75 is this 0.20."""
        weight = flops_lib.densities_from_masks(state.method_state.masks)
        prunable = {flops_lib.path_to_str(p) for p, m in
                    jax.tree_util.tree_flatten_with_path(state.method_state.masks)[0]
                    if _is_sparse_leaf(m)}
        keep = self.sp.dgm_keep if self.sp.dgm else 1.0
        grad = {k: (min(v, keep) if k in prunable else v) for k, v in weight.items()}
        return weight, grad

    def summary(self, state: TrainState) -> dict:
        out = {"sparsity": masks_lib.sparsity_summary(state.method_state.masks)}
        out.update(self.base.summary(state))
        return out


class SparCLEWC(SparCL):
    name = "sparcl_ewc"
    uses_buffer = False
    base_name = "ewc"


class SparCLER(SparCL):
    name = "sparcl_er"
    base_name = "er"


class SparCLDERPP(SparCL):
    name = "sparcl_derpp"
    base_name = "derpp"


# ----------------------------------------------------------------------------- SparCL-CO2L


def ncm_correct(z: jax.Array, labels: jax.Array, means: jax.Array,
                available: jax.Array) -> jax.Array:
    """Nearest-class-mean correctness: the class whose (normalised) mean has the largest cosine
    similarity with each row of `z` ([n, D], normalised), among the `available` classes, is the
    row's label. A row whose class has no mean yet is incorrect."""
    sims = z.astype(jnp.float32) @ (means / jnp.maximum(
        jnp.linalg.norm(means, axis=-1, keepdims=True), 1e-12)).T
    sims = jnp.where(available[None, :], sims, -jnp.inf)
    return (jnp.argmax(sims, axis=1) == labels) & available[labels]


def ncm_update(means: jax.Array, seen: jax.Array, z: jax.Array, labels: jax.Array,
               valid: jax.Array, momentum: float) -> tuple[jax.Array, jax.Array]:
    """Class means <- momentum * mean + (1 - momentum) * the batch's mean of the class, for the
    classes with valid rows in the batch (a class's first batch mean initialises it)."""
    onehot = jax.nn.one_hot(labels, means.shape[0], dtype=jnp.float32) * valid[:, None]
    counts = jnp.sum(onehot, axis=0)
    batch = (onehot.T @ z.astype(jnp.float32)) / jnp.maximum(counts, 1.0)[:, None]
    present = counts > 0
    blended = jnp.where(seen[:, None], momentum * means + (1.0 - momentum) * batch, batch)
    return jnp.where(present[:, None], blended, means), seen | present


class SparCLCO2L(SparCL):
    """SparCL around CO2L: TDM + DGM + DDR on CO2L's contrastive step.

    - The step is CO2L's (`CO2L.loss_and_grads`: asymmetric SupCon + IRD on two views of batch
      and replay) with SparCL's masked update (`sparse_update`: weight masks, DGM); the past
      model's copy is the masked params of the previous task's end.
    - Prunable set (masks cover params with the head, `CO2L.prunable_tree`): the model's set of
      config.prunable computed on the model's params alone, plus the projection head's two
      kernels under the default "all_but_output" (co2l.prune_head=True: the head runs in
      every training pass, dense it would cost several times the 90%-sparse encoder; SparCL
      prunes what it trains, and the head is discarded at evaluation, so the evaluated model's
      sparsity is the encoder's either way). prunable="by_layer_name" keeps the head dense (its
      name filter excludes heads). The linear classifier is never pruned.
    - DDR needs per-example correctness, and CO2L has no classifier while it trains (the linear
      classifier of the last task end knows none of the current task's classes). SparCL's
      official code has no contrastive variant, so this is our choice: nearest class mean of
      the normalised projections (`ncm_correct`, view 1 of each current example, before the
      update, as SparCL records argmax correctness before it), the class means an exponential
      moving average (decay co2l.ncm_momentum) of every step's per-class means over both views
      of batch and replay (`ncm_update`), among the classes seen so far. Forgetting events are
      correct -> incorrect transitions of that, exactly as for the other bases.
    """

    name = "sparcl_co2l"
    base_name = "co2l"
    allowed_bases = ("co2l",)
    extra_config_sections = ("co2l",)

    def prunable_flags(self, params: Any) -> Any:
        return self.base.prunable_tree(params, self.prunable)

    def init_method_state(self, params: Any) -> Any:
        state = super().init_method_state(params)
        if self.sp.ddr:
            state = state._replace(
                ncm_means=jnp.zeros((self.num_classes, self.config.co2l.head_dim), jnp.float32),
                ncm_seen=jnp.zeros((self.num_classes,), bool))
        return state

    def train_step(self, state: TrainState, batch: Batch, ctx: TaskContext,
                   key: jax.Array) -> tuple[TrainState, StepMetrics]:
        loss_key, after_key = jax.random.split(key)
        loss, grads, aux = self.base.loss_and_grads(state, batch, ctx, loss_key)
        ms = state.method_state
        params, opt_state, updates = self.sparse_update(state, grads)
        if self.sp.ddr:
            b = batch.y.shape[0]
            correct = ncm_correct(aux.z[:b], aux.labels[:b], ms.ncm_means,
                                  ms.ncm_seen & ctx.seen_classes)
            updates["example_stats"] = ids.update_example_stats(ms.example_stats,
                                                                batch.index, correct=correct)
            updates["ncm_means"], updates["ncm_seen"] = ncm_update(
                ms.ncm_means, ms.ncm_seen, aux.z, jnp.concatenate([aux.labels] * 2),
                jnp.concatenate([aux.valid] * 2), self.config.co2l.ncm_momentum)
        method_state = self.base.after_step(state, batch, ctx, None, None,
                                            after_key)._replace(**updates)
        new_state = state.replace(step=state.step + 1, params=params,
                                  batch_stats=aux.batch_stats, opt_state=opt_state,
                                  method_state=method_state)
        return new_state, StepMetrics(loss, aux.accuracy)


__all__ = ["SPARCL_BASES", "SparCL", "SparCLCO2L", "SparCLDERPP", "SparCLER", "SparCLEWC",
           "ddr_removal", "ddr_schedule", "dgm_leaf_mask", "dgm_masks", "ncm_correct",
           "ncm_update", "tdm_schedule", "tdm_update"]
