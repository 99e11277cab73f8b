"""EsaCL in one call: SDP + IDS (+ your replay loss) for your own training loop.

The harness's EsaCL step is this module; a user's loop calls the same two functions::

    tx = esacl_jax.esacl_optimizer(optax.sgd(0.03))           # keep_sparse(chain(sdp, sgd))
    opt_state = tx.init(params)
    params = esacl_jax.sparse_start(params, opt_state)         # the exactly sparse start
    table = esacl_jax.init_example_stats(max_task_size)        # IDS score table (variant C)

    def loss_fn(p, batch):                                     # per-example losses [B], aux
        logits = model(p, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]), logits

    g = esacl_jax.esacl_gradients(loss_fn, params, batch, opt_state, table=table,
                                  example_index=batch["index"], replay_loss_fn=replay_term)
    updates, opt_state = tx.update(g.ascent_grads, opt_state, params, grad_fn=g.grad_fn)
    params, table = optax.apply_updates(params, updates), g.table

`esacl_gradients` does the step's gradient work (METHOD.md's step, docs/METHOD.md):
  1. IDS selects k = ceil(gamma * B) examples of the batch: by the per-example score `table`
     filled by earlier passes (variant C, the default: `table=` and `example_index=` given) or by
     the batch's own per-example sharpness l_i(w + eps) - l_i(w) (variants A/B: no table);
  2. the clean (ascent) gradient g at w (C: on the selected examples only);
  3. w + eps with eps = rho * g / ||g|| on the active weights (`sdp.perturbed_params`, the point
     `sdp_transform` perturbs to, to the bit);
  4. the descent gradient at w + eps of mean(loss over the current examples; C: all of them,
     A/B: the selected ones) + `replay_loss_fn`;
  5. (C) the table records the batch's losses at w + eps and the selected examples' sharpness.
`tx.update(g.ascent_grads, opt_state, params, grad_fn=g.grad_fn)` then masks the descent
gradient, keeps the SDP score averages and applies your optimizer; pruned weights stay exactly 0
(`keep_sparse`). rho is set once, in `esacl_optimizer`: `esacl_gradients` reads it from
`opt_state` (`sdp.sam_radius`).

Cost per step in forward-equivalents (forward 1, forward+backward 3): C is 3 k + 3 B + replay,
i.e. 3 gamma + 3 + 6 = 9.75 per current example at gamma 0.25 with DER++'s two replay minibatches
as large as the batch (DER++ alone: 9; k = ceil(gamma B) rounds up: 9.9 at B = 10); B is
3 B + B + 3 k + replay. Everything has static shapes (k is a
Python int), so it jits, shards (`jax.jit` with a batch sharded over a mesh: the gradient is
global) and runs inside `jax.shard_map` (reduce `g.descent_grads` yourself, or give `sdp_transform`
`batch_axis_name=`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from esacl_jax import _deprecation, _guards, ids, masks, sdp
from esacl_jax._defaults import ESACL_DEFAULTS, SDP_OPTION_DEFAULTS
from esacl_jax.masks import PrunableFn, PyTree

__all__ = ["ESACL_DEFAULTS", "EsaCLGradients", "esacl_gradients", "esacl_optimizer",
           "sparse_start"]

IDS_SCORES = ("sharpness", "perturbed_loss", "clean_loss", "random")
REPLAY_AT = ("perturbed", "clean")

LossFn = Callable[[PyTree, Any], tuple[jax.Array, Any]]


class EsaCLGradients(NamedTuple):
    """What `esacl_gradients` computed for one step.

    Attributes:
      ascent_grads: the clean gradient g at w, SAM's ascent direction: `tx.update`'s `updates`
        (the transform perturbs along it; it is not the gradient applied).
      descent_grads: the descent gradient at w + eps (current examples + replay): the gradient
        applied, handed to `tx.update` through `grad_fn=g.grad_fn`.
      loss: the descent objective's value (mean current loss + replay loss).
      per_example: float32[n] current-example losses at w + eps (n = B for C, k for A/B).
      aux: `loss_fn`'s aux at the descent pass (e.g. logits).
      ascent_aux: `loss_fn`'s aux at the clean pass (e.g. BatchNorm statistics to keep).
      selected: int32[k] positions in the batch that IDS chose for the ascent (C) or descent (A/B).
      table: the score table after this step (the one passed in, unchanged, without C).
    """

    ascent_grads: PyTree
    descent_grads: PyTree
    loss: jax.Array
    per_example: jax.Array
    aux: Any
    ascent_aux: Any
    selected: jax.Array
    table: ids.ExampleStats | jax.Array

    @property
    def grads(self) -> PyTree:
        """Deprecated name of `ascent_grads` (it is not the gradient applied)."""
        warnings.warn("EsaCLGradients.grads is deprecated (it is the ascent gradient, not the "
                      "one applied): use g.ascent_grads", DeprecationWarning, stacklevel=2)
        return self.ascent_grads

    def grad_fn(self, _params: PyTree) -> PyTree:
        """`tx.update`'s `grad_fn`: the descent gradient, already taken at w + eps.

        Args:
          _params: the point `tx.update` asks about (ignored: the gradient is already taken there).

        Returns:
          `descent_grads`.
        """
        return self.descent_grads


def esacl_optimizer(
    optimizer: optax.GradientTransformation,
    *,
    sparsity: float = ESACL_DEFAULTS["sparsity"],
    rho: Any = ESACL_DEFAULTS["rho"],
    prunable: PrunableFn | PyTree | str | None = None,
    distribution: str = ESACL_DEFAULTS["distribution"],
    score: str = ESACL_DEFAULTS["score"],
    score_lambda: Any = ESACL_DEFAULTS["score_lambda"],
    ema_decay: Any = ESACL_DEFAULTS["ema_decay"],
    prune_fraction: Any = ESACL_DEFAULTS["prune_fraction"],
    regrow: str = ESACL_DEFAULTS["regrow"],
    mask_update_every_steps: Any = SDP_OPTION_DEFAULTS["mask_update_every_steps"],
    seed: int = SDP_OPTION_DEFAULTS["seed"],
    batch_axis_name: Any = None,
    perturbation: str = SDP_OPTION_DEFAULTS["perturbation"],
    perturbation_dtype: Any = SDP_OPTION_DEFAULTS["perturbation_dtype"],
) -> optax.GradientTransformationExtraArgs:
    """`keep_sparse(chain(sdp_transform(...), optimizer))` with EsaCL's defaults.

    Every argument but `optimizer` is keyword-only and is `sdp_transform`'s (see its docstring).
    It works under `optax.inject_hyperparams(esacl_optimizer, static_args=esacl_jax.STATIC_ARGS)`
    (rho and the other numeric options become mutable; sparsity, seed and prunable stay static);
    a rho schedule goes here as `rho=schedule`. Learning-rate schedules belong to `optimizer`
    (`optax.sgd(schedule)`, or `optax.inject_hyperparams(optax.sgd)(learning_rate=...)`).

    Args:
      optimizer: any optax optimizer (not `optax.MultiSteps`: see `accumulate_grad_fn`).
      sparsity: fraction of each prunable layer pruned (init only).
      rho: SAM radius: a Python float or a schedule `count -> rho`; `esacl_gradients` reads
        it from the optimizer state (`sdp.sam_radius`).
      prunable: None or "all_but_output" (every kernel but the output layers),
        "all_but_input_and_output" (the first layer dense too), "by_layer_name"
        (`masks.PRUNABLE_SETS`), a `(path, leaf) -> bool` filter or a bool tree.
      distribution: "uniform" or "erk" per-layer sparsities.
      score: "magnitude_gradient" or "taylor" (mask-update score).
      score_lambda: lambda of the magnitude_gradient score.
      ema_decay: decay of the score averages.
      prune_fraction: fraction of each layer pruned and regrown per mask update.
      regrow: "gradient" or "random".
      mask_update_every_steps: 0 (masks change only through `refresh_masks`) or k > 0.
      seed: seed of the regrowth key (init only).
      batch_axis_name: the mapped axis under `jax.shard_map` / `pmap`, or None.
      perturbation: "global" or "per_device" (with `batch_axis_name`).
      perturbation_dtype: dtype of w + eps for low-precision params ("float32").

    Returns:
      An `optax.GradientTransformationExtraArgs`; its `update` takes `grad_fn=`.
    """
    _guards.check_not_multisteps(optimizer)
    front = sdp.sdp_transform(
        sparsity, rho, prunable=prunable, distribution=distribution, score=score,
        score_lambda=score_lambda, ema_decay=ema_decay, prune_fraction=prune_fraction,
        regrow=regrow, mask_update_every_steps=mask_update_every_steps, seed=seed,
        batch_axis_name=batch_axis_name, perturbation=perturbation,
        perturbation_dtype=perturbation_dtype)
    return sdp.keep_sparse(optax.chain(front, optimizer))


def sparse_start(params: PyTree, opt_state: Any, *,
                 rescale: bool = ESACL_DEFAULTS["init_rescale"]) -> PyTree:
    """The exactly sparse initial params of the transform's masks: the one way to start sparse.

    Args:
      params: the dense initial params.
      opt_state: `tx.init(params)` of a transform holding one `sdp_transform` (its masks are the
        magnitude masks of `params`).
      rescale: keep each unit's dense incoming norm by rescaling its kept weights
        (`masks.masked_start`); False (the default, the harness's `sparse_start="magnitude"`)
        only zeroes the pruned weights.

    Returns:
      The params with every pruned weight exactly 0.
    """
    return masks.masked_start(params, sdp.find_sdp_state(opt_state).masks, rescale=rescale)


def _gather(batch: Any, positions: jax.Array) -> Any:
    return jax.tree.map(lambda a: a[positions], batch)


def _shared_options(opt_state: Any, rho: Any, perturbation_dtype: Any) -> tuple[Any, Any]:
    """rho and perturbation_dtype from the transform's state; a value passed must agree."""
    state_rho = sdp.sam_radius(opt_state)
    if rho is not None:
        given, own = masks.concrete(rho), masks.concrete(state_rho)
        if given is None or own is None or given != own:
            raise ValueError(
                f"esacl_gradients(rho={rho!r}) differs from the optimizer's rho "
                f"({'an array' if own is None else own}): leave rho out, esacl_gradients reads "
                "it from opt_state (set it once, in esacl_optimizer / sdp_transform)")
    state_dtype = sdp.find_sdp_state(opt_state).perturbation_dtype
    if perturbation_dtype is not None and perturbation_dtype != state_dtype:
        raise ValueError(
            f"esacl_gradients(perturbation_dtype={perturbation_dtype!r}) differs from the "
            f"optimizer's ({state_dtype!r}): leave it out, it is read from opt_state")
    return state_rho, state_dtype


def _check_arguments(ids_score: str, replay_at: str, key: Any, table: Any,
                     example_index: Any) -> None:
    """One line for each argument combination `esacl_gradients` cannot honour."""
    if ids_score not in IDS_SCORES:
        raise ValueError(f"ids_score must be one of {IDS_SCORES}, got {ids_score!r}")
    if replay_at not in REPLAY_AT:
        raise ValueError(f"replay_at must be one of {REPLAY_AT}, got {replay_at!r}")
    if ids_score == "random" and key is None:
        raise ValueError('ids_score="random" needs key=')
    if table is not None and example_index is None:
        raise ValueError("a score table needs example_index= (each example's position in the "
                         "task's training set)")


@dataclasses.dataclass(frozen=True)
class _Passes:
    """The passes of one step over the current examples (and the replay term), at w or w + eps."""

    loss_fn: LossFn
    params: PyTree
    masks: PyTree
    rho: Any
    perturbation_dtype: Any
    replay: Callable[[PyTree], jax.Array] | None
    replay_at_clean: bool  # the replay gradient taken at w instead of w + eps

    @property
    def no_sam(self) -> bool:
        return sdp.static_zero(self.rho)

    def perturb(self, grads: PyTree) -> PyTree:
        """w + eps along `grads` on the active weights (w itself when rho is a static 0)."""
        if self.no_sam:
            return self.params
        return sdp.perturbed_params(grads, self.masks, self.params, self.rho,
                                    perturbation_dtype=self.perturbation_dtype)

    def objective(self, rows: Any, with_replay: bool) -> Callable[[PyTree], tuple[jax.Array, Any]]:
        """params -> (mean loss over `rows` [+ replay], (per-example losses, aux))."""
        def fn(p):
            per_example, aux = self.loss_fn(p, rows)
            total = per_example.mean()
            if with_replay:
                total = total + self.replay(p)
            return total, (per_example, aux)

        return fn

    def descent(self, point: PyTree, rows: Any) -> tuple[jax.Array, jax.Array, Any, PyTree]:
        """(loss, per-example losses, aux, gradient) of the descent objective at `point`, the
        replay term's gradient taken there or, with `replay_at_clean`, at w."""
        with_replay = self.replay is not None and not self.replay_at_clean
        (loss, (per_example, aux)), grads = jax.value_and_grad(
            self.objective(rows, with_replay), has_aux=True)(point)
        if self.replay_at_clean:
            value, replay_grads = jax.value_and_grad(self.replay)(self.params)
            loss, grads = loss + value, jax.tree.map(jnp.add, grads, replay_grads)
        return loss, per_example, aux, grads


def esacl_gradients(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    opt_state: Any,
    *,
    table: ids.ExampleStats | None = None,
    example_index: jax.Array | None = None,
    rho: Any = None,
    gamma: float = ESACL_DEFAULTS["gamma"],
    ids_score: str = ESACL_DEFAULTS["ids_score"],
    unseen: str = ESACL_DEFAULTS["ids_unseen"],
    replay_loss_fn: Callable[[PyTree], jax.Array] | None = None,
    replay_at: str = REPLAY_AT[0],
    replay_in_ascent: bool = False,
    correct_fn: Callable[[Any], jax.Array] | None = None,
    key: jax.Array | None = None,
    perturbation_dtype: Any = None,
    check_index: bool = True,
) -> EsaCLGradients:
    """One EsaCL step's gradients: IDS selection, SAM ascent, descent at w + eps, table update.

    Args:
      loss_fn: `(params, batch) -> (per_example_loss float[n], aux)` on the current examples;
        called on the whole batch and on row subsets of it (`batch` leaves indexed on axis 0).
      params: w.
      batch: a pytree of arrays with the batch on the leading axis (size B).
      opt_state: an optimizer state holding one `sdp_transform` state (its masks give the
        active weights the perturbation moves).
      table: the IDS score table (`init_example_stats`), for variant C (default in the harness);
        None: variants A/B, ranking by the batch's own scores (one extra forward at w + eps).
      example_index: int[B] each example's position in the task's training set (C); a
        negative index marks a padding row (never selected nor recorded). A position >= the
        table's capacity (e.g. a global dataset row id) is refused (`ids.table_positions`:
        ValueError for concrete indices, a warning from inside `jit`).
      rho: leave it out: the SAM radius is read from `opt_state` (`sdp.sam_radius`: the
        transform's float, its schedule at this step, or the injected hyperparameter), so
        the step and the transform cannot use two. A value given must equal the optimizer's
        (else ValueError). A static 0 skips the perturbation.
      gamma: fraction of the batch IDS keeps (a static Python float: k = ceil(gamma * B)).
      ids_score: "sharpness" (default), "perturbed_loss", "clean_loss" or "random" (control).
        With a table, "sharpness" ranks by the recorded (or loss-estimated) sharpness and the
        others by the recorded loss at w + eps.
      unseen: with a table, where examples with no recorded score rank: "mean" or "first".
      replay_loss_fn: `params -> scalar` replay term (e.g. DER++'s `der_loss` + `er_loss` on a
        buffer sample), added to the descent objective.
      replay_at: "perturbed" (at w + eps, default) or "clean" (its gradient at w).
      replay_in_ascent: also add the replay term to the clean pass (variant A).
      correct_fn: `aux -> bool[B]` argmax correctness at the descent pass, recorded in the table
        (forgetting events); None leaves `table.correct` as it was.
      key: PRNG key, needed only by `ids_score="random"`.
      perturbation_dtype: leave it out: read from `opt_state` (the transform's); a value given
        must equal it.
      check_index: check `example_index` against the table's capacity (`ids.table_positions`;
        False drops the check's host callback from the compiled step).

    Returns:
      An `EsaCLGradients`; pass `g.ascent_grads` and `grad_fn=g.grad_fn` to `tx.update`.
    """
    _check_arguments(ids_score, replay_at, key, table, example_index)
    rho, perturbation_dtype = _shared_options(opt_state, rho, perturbation_dtype)
    passes = _Passes(
        loss_fn, params, sdp.find_sdp_state(opt_state).masks, rho, perturbation_dtype,
        replay_loss_fn,
        replay_at_clean=(replay_loss_fn is not None and replay_at == "clean"
                         and not sdp.static_zero(rho)))
    ascent_replay = replay_in_ascent and replay_loss_fn is not None
    if table is not None:
        return _table_step(passes, batch, table, example_index, gamma=gamma,
                           ids_score=ids_score, unseen=unseen, ascent_replay=ascent_replay,
                           correct_fn=correct_fn, key=key, check_index=check_index)
    return _batch_step(passes, batch, gamma=gamma, ids_score=ids_score,
                       ascent_replay=ascent_replay and not passes.no_sam, key=key)


def _table_step(passes: _Passes, batch: Any, table: ids.ExampleStats, example_index: jax.Array,
                *, gamma: float, ids_score: str, unseen: str, ascent_replay: bool,
                correct_fn: Callable[[Any], jax.Array] | None, key: jax.Array | None,
                check_index: bool) -> EsaCLGradients:
    """Variant C: the ascent on the table's top-gamma examples, the descent on the whole batch,
    and one table update (one scatter per field) with what the passes measured."""
    example_index = ids.table_positions(table, example_index, check=check_index)
    recorded = ids.gather_scores(table, example_index)  # the batch's (loss, sharpness)
    if ids_score == "random":
        table_score = jax.random.uniform(key, jnp.shape(example_index))
    else:
        kind = "estimated_sharpness" if ids_score == "sharpness" else "loss"
        table_score = ids.table_scores(table, example_index, kind, unseen=unseen,
                                       recorded=recorded)
    selected, _ = ids.select_examples(table_score, gamma)

    clean = passes.objective(_gather(batch, selected), ascent_replay)
    (_, (clean_selected, ascent_aux)), grads = jax.value_and_grad(
        clean, has_aux=True)(passes.params)
    loss, per_example, aux, descent_grads = passes.descent(passes.perturb(grads), batch)
    # The batch's losses at w + eps and correctness, the sharpness measured on the selected.
    sharpness = recorded[1].at[selected].set(per_example[selected] - clean_selected)
    table = ids.update_example_stats(
        table, example_index, loss=per_example, sharpness=sharpness,
        correct=None if correct_fn is None else correct_fn(aux), recorded=recorded)
    return EsaCLGradients(grads, descent_grads, loss, per_example, aux, ascent_aux,
                          selected, table)


def _batch_step(passes: _Passes, batch: Any, *, gamma: float, ids_score: str,
                ascent_replay: bool, key: jax.Array | None) -> EsaCLGradients:
    """Variants A/B: a clean pass on the whole batch, IDS on the batch's own scores, the
    descent on the selected examples."""
    clean = passes.objective(batch, ascent_replay)
    if passes.no_sam:  # eps = 0: the clean gradient is never used, only the forward pass
        _, (clean_per_example, ascent_aux) = clean(passes.params)
        grads = jax.tree.map(jnp.zeros_like, passes.params)
    else:
        (_, (clean_per_example, ascent_aux)), grads = jax.value_and_grad(
            clean, has_aux=True)(passes.params)
    point = passes.perturb(grads)
    selected, rows = _batch_selection(passes, batch, point, clean_per_example, gamma=gamma,
                                      ids_score=ids_score, key=key)
    loss, per_example, aux, descent_grads = passes.descent(point, rows)
    return EsaCLGradients(grads, descent_grads, loss, per_example, aux, ascent_aux, selected,
                          jnp.zeros((), jnp.float32))


def _batch_selection(passes: _Passes, batch: Any, point: PyTree, clean_per_example: jax.Array,
                     *, gamma: float, ids_score: str, key: jax.Array | None
                     ) -> tuple[jax.Array, Any]:
    """The positions IDS keeps and their rows, ranked by the batch's own scores (one more
    forward pass at w + eps for the sharpness and the perturbed loss)."""
    batch_size = clean_per_example.shape[0]
    if gamma >= 1.0:
        return jnp.arange(batch_size, dtype=jnp.int32), batch
    if ids_score == "clean_loss":
        scores = clean_per_example
    elif ids_score == "random" or passes.no_sam:  # rho = 0: every sharpness is 0
        if key is None:
            raise ValueError("rho=0 ranks a random subset: esacl_gradients needs key=")
        scores = jax.random.uniform(key, clean_per_example.shape)
    else:
        scores, _ = passes.loss_fn(point, batch)
        if ids_score == "sharpness":
            scores = scores - clean_per_example
    selected, _ = ids.select_examples(jax.lax.stop_gradient(scores), gamma)
    return selected, _gather(batch, selected)


__getattr__ = _deprecation.forwarding_getattr(__name__, {
    "DEFAULTS": ("esacl_jax._defaults:ESACL_DEFAULTS", "use esacl_jax.ESACL_DEFAULTS"),
})
