"""Intelligent data selection (IDS) and the per-example statistics table.

Two pieces, both pure and jit-friendly with static shapes:
- `select_examples`: keep the ceil(gamma * B) examples of a batch with the highest scores (e.g. the
  per-example sharpness l_i(w + eps) - l_i(w)), via `jax.lax.top_k` with a static k.
- `ExampleStats`: fixed-size device arrays indexed by an example's position in the current task's
  training set, filled by the passes the training step makes anyway (loss, sharpness, argmax
  correctness). It serves EsaCL's score table (step variant C: choose the ascent examples from
  scores of earlier passes) and SparCL's dynamic data removal (forgetting events).

Index convention: indices >= capacity are ignored by updates (scatter mode "drop") and get
score -inf from `table_scores` (never selected). `table_positions` is the checked entry point
(`esacl_gradients` uses it): there a negative index marks a padding row, and an index >= the
capacity (e.g. a global dataset row id) is refused, since IDS would silently rank nothing.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from esacl_jax import _deprecation

SCORE_FIELDS = ("loss", "sharpness", "estimated_sharpness")
UNSEEN_POLICIES = ("mean", "first")


def num_selected(batch_size: int, gamma: float) -> int:
    """ceil(gamma * batch_size) as a static Python int, in [1, batch_size].

    A 1e-9 slack absorbs float error (0.3 * 10 = 3.0000000000000004 must give 3, not 4).

    Args:
      batch_size: B, the batch's size (>= 1).
      gamma: the fraction kept, in (0, 1].

    Returns:
      k = ceil(gamma * B), a Python int.
    """
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return min(batch_size, max(1, math.ceil(gamma * batch_size - 1e-9)))


def select_examples(scores: jax.Array, gamma: float) -> tuple[jax.Array, jax.Array]:
    """IDS's choice: the k = ceil(gamma * B) examples of a batch with the highest scores.

    Ties go to the lower index. (Called `select_top` before; that name is a deprecated alias.)

    Args:
      scores: float[B], one score per example of the batch.
      gamma: the fraction kept, a static Python float in (0, 1] (it fixes the output shape).

    Returns:
      `(indices, selected)`: int32[k] positions in the batch and the bool[B] selection mask.
    """
    batch = scores.shape[0]
    k = num_selected(batch, gamma)
    _, indices = jax.lax.top_k(jnp.asarray(scores, jnp.float32), k)
    indices = indices.astype(jnp.int32)
    selected = jnp.zeros((batch,), bool).at[indices].set(True)
    return indices, selected


class ExampleStats(NamedTuple):
    """Per-example statistics of the current task, indexed by position in its training set.

    Attributes:
      loss: float32[N], last recorded per-example loss (NaN = never recorded).
      sharpness: float32[N], last recorded l_i(w + eps) - l_i(w) (NaN = never recorded).
      correct: bool[N], last recorded argmax correctness.
      forgetting: int32[N], number of correct -> incorrect transitions (forgetting events).
      seen: int32[N], number of updates that touched the example.
      totals: float32[7], running sums over the recorded entries (`TOTALS` names them), kept up
        to date by `update_example_stats` from the batch's entries alone, so that scoring a
        batch costs O(batch) and not a pass over the whole table at every step.
    """

    loss: jax.Array
    sharpness: jax.Array
    correct: jax.Array
    forgetting: jax.Array
    seen: jax.Array
    totals: jax.Array


# The entries of ExampleStats.totals: sums and counts over recorded losses, recorded sharpnesses,
# and the entries where both are recorded.
TOTALS = ("loss_sum", "loss_count", "sharpness_sum", "sharpness_count", "both_loss_sum",
          "both_sharpness_sum", "both_count")


def _contributions(loss: jax.Array, sharpness: jax.Array) -> jax.Array:
    """float32[7]: the `TOTALS` of the given entries (NaN entries are unrecorded)."""
    has_loss, has_sharpness = ~jnp.isnan(loss), ~jnp.isnan(sharpness)
    both = has_loss & has_sharpness
    zero = jnp.zeros_like(loss)
    return jnp.stack([
        jnp.sum(jnp.where(has_loss, loss, zero)), jnp.sum(has_loss, dtype=jnp.float32),
        jnp.sum(jnp.where(has_sharpness, sharpness, zero)),
        jnp.sum(has_sharpness, dtype=jnp.float32),
        jnp.sum(jnp.where(both, loss, zero)), jnp.sum(jnp.where(both, sharpness, zero)),
        jnp.sum(both, dtype=jnp.float32)])


def init_example_stats(capacity: int) -> ExampleStats:
    """An empty table for up to `capacity` examples (e.g. the largest task's training set).

    Args:
      capacity: the number of positions (the largest task's training-set size).

    Returns:
      An `ExampleStats` with nothing recorded.
    """
    return ExampleStats(
        loss=jnp.full((capacity,), jnp.nan, jnp.float32),
        sharpness=jnp.full((capacity,), jnp.nan, jnp.float32),
        correct=jnp.zeros((capacity,), bool),
        forgetting=jnp.zeros((capacity,), jnp.int32),
        seen=jnp.zeros((capacity,), jnp.int32),
        totals=jnp.zeros((len(TOTALS),), jnp.float32),
    )


def reset_example_stats(stats: ExampleStats) -> ExampleStats:
    """The empty table of the same capacity (call at a task boundary); sharding preserved.

    Args:
      stats: a table.

    Returns:
      An empty `ExampleStats` of the same capacity.
    """
    return ExampleStats(
        loss=jnp.full_like(stats.loss, jnp.nan),
        sharpness=jnp.full_like(stats.sharpness, jnp.nan),
        correct=jnp.zeros_like(stats.correct),
        forgetting=jnp.zeros_like(stats.forgetting),
        seen=jnp.zeros_like(stats.seen),
        totals=jnp.zeros_like(stats.totals),
    )


def update_example_stats(
    stats: ExampleStats,
    idx: jax.Array,
    *,
    loss: jax.Array | None = None,
    sharpness: jax.Array | None = None,
    correct: jax.Array | None = None,
    recorded: tuple[jax.Array, jax.Array] | None = None,
) -> ExampleStats:
    """Record a batch's statistics at positions `idx` (int[B], distinct within the batch).

    Only the given fields change. `seen` is incremented for every index; `totals` follows the
    loss and sharpness entries (distinct indices are what keeps it exact). A forgetting event is
    counted when an example recorded as correct is now incorrect (so never on a first sighting).
    `recorded`: `gather_scores(stats, idx)` when the caller has it already (one gather less).

    Args:
      stats: the table.
      idx: int[B] positions (>= capacity: padding, ignored).
      loss: float[B] losses to record, or None.
      sharpness: float[B] sharpness values to record (NaN: none measured), or None.
      correct: bool[B] argmax correctness to record (counts forgetting events), or None.
      recorded: `gather_scores(stats, idx)`, when the caller has it.

    Returns:
      The updated `ExampleStats`.
    """
    idx = jnp.asarray(idx, jnp.int32)
    new = stats
    scored = loss is not None or sharpness is not None
    if scored:  # the batch's old entries leave the totals (padding gathers NaN: no contribution)
        old_loss, old_sharpness = gather_scores(stats, idx) if recorded is None else recorded
        before = _contributions(old_loss, old_sharpness)
    if loss is not None:
        new = new._replace(loss=stats.loss.at[idx].set(jnp.asarray(loss, jnp.float32), mode="drop"))
    if sharpness is not None:
        new = new._replace(
            sharpness=stats.sharpness.at[idx].set(jnp.asarray(sharpness, jnp.float32), mode="drop")
        )
    if correct is not None:
        correct = jnp.asarray(correct, bool)
        was_correct = stats.correct.at[idx].get(mode="fill", fill_value=False)
        forgot = (was_correct & ~correct).astype(jnp.int32)
        new = new._replace(
            correct=stats.correct.at[idx].set(correct, mode="drop"),
            forgetting=stats.forgetting.at[idx].add(forgot, mode="drop"),
        )
    new = new._replace(seen=stats.seen.at[idx].add(1, mode="drop"))
    if scored:  # ... and their new entries join them (what the scatter stored at idx, read from
        # the written values: padding indices store nothing, so they count as unrecorded)
        stored = idx < stats.loss.shape[0]

        def written(values: jax.Array | None, old: jax.Array) -> jax.Array:
            if values is None:
                return old
            return jnp.where(stored, jnp.asarray(values, jnp.float32), jnp.nan)

        new = new._replace(totals=stats.totals - before + _contributions(
            written(loss, old_loss), written(sharpness, old_sharpness)))
    return new


def gather_scores(stats: ExampleStats, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The recorded (loss, sharpness) at `idx`; NaN where unrecorded and for padding indices.

    Args:
      stats: the table.
      idx: int[B] positions.

    Returns:
      `(loss, sharpness)`, two float32[B] arrays.
    """
    get = lambda table: table.at[idx].get(mode="fill", fill_value=jnp.nan)  # noqa: E731
    return get(stats.loss), get(stats.sharpness)


def _sharpness_per_loss(stats: ExampleStats) -> jax.Array:
    """Measured sharpness per unit of loss over the entries where both are recorded."""
    t = dict(zip(TOTALS, stats.totals, strict=True))
    return t["both_sharpness_sum"] / jnp.maximum(t["both_loss_sum"], 1e-12)


def _estimate(loss: jax.Array, sharpness: jax.Array, ratio: jax.Array) -> jax.Array:
    return jnp.where(jnp.isnan(sharpness), ratio * loss, sharpness)


def estimated_sharpness(stats: ExampleStats) -> jax.Array:
    """A sharpness for every recorded example (float32[N], NaN where nothing is recorded).

    Where the sharpness l_i(w + eps) - l_i(w) was measured it is used as it is; elsewhere it is
    estimated from the example's recorded loss by the ratio of measured sharpness to loss over
    the examples where both are known (per-example sharpness grows with the loss), so that every
    example the training passes touched has a score to rank by.

    Args:
      stats: the table.

    Returns:
      float32[N], one sharpness per position.
    """
    return _estimate(stats.loss, stats.sharpness, _sharpness_per_loss(stats))


def _mean_score(stats: ExampleStats, kind: str) -> jax.Array:
    """The mean of the table's recorded `kind` scores, from the running totals (0 if none)."""
    t = dict(zip(TOTALS, stats.totals, strict=True))
    if kind == "loss":
        total, count = t["loss_sum"], t["loss_count"]
    elif kind == "sharpness":
        total, count = t["sharpness_sum"], t["sharpness_count"]
    else:  # measured sharpness where recorded, else the loss-based estimate
        only_loss = t["loss_sum"] - t["both_loss_sum"]
        total = t["sharpness_sum"] + _sharpness_per_loss(stats) * only_loss
        count = t["sharpness_count"] + t["loss_count"] - t["both_count"]
    return total / jnp.maximum(count, 1.0)


def table_scores(stats: ExampleStats, idx: jax.Array, kind: str = "loss",
                 unseen: str = "first",
                 recorded: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """The batch's recorded scores (float32[B]); padding indices (>= capacity) get -inf.

    `kind`: "loss", "sharpness", or "estimated_sharpness" (measured sharpness where known, else
    estimated from the loss: `estimated_sharpness`). `unseen` places examples with no score:
    "first" gives them +inf (coverage first: every example is scored before any is ranked);
    "mean" gives them the mean of the recorded scores, so an example with a higher recorded
    score than average is chosen before an unscored one (ranking from the first recorded pass).
    Costs O(batch): the table-wide quantities come from `stats.totals`. `recorded`:
    `gather_scores(stats, idx)` when the caller has it already.

    Args:
      stats: the table.
      idx: int[B] positions of the batch's examples.
      kind: the score: "loss", "sharpness" or "estimated_sharpness".
      unseen: where examples with no score rank: "first" or "mean".
      recorded: `gather_scores(stats, idx)`, when the caller has it.

    Returns:
      float32[B] scores, higher ranked first.
    """
    if kind not in SCORE_FIELDS:
        raise ValueError(f"kind must be one of {SCORE_FIELDS}, got {kind!r}")
    if unseen not in UNSEEN_POLICIES:
        raise ValueError(f"unseen must be one of {UNSEEN_POLICIES}, got {unseen!r}")
    idx = jnp.asarray(idx, jnp.int32)
    loss, sharpness = gather_scores(stats, idx) if recorded is None else recorded
    values = {"loss": lambda: loss, "sharpness": lambda: sharpness,
              "estimated_sharpness": lambda: _estimate(loss, sharpness,
                                                       _sharpness_per_loss(stats))}[kind]()
    padding = idx >= stats.loss.shape[0]
    fill = jnp.inf if unseen == "first" else _mean_score(stats, kind)
    values = jnp.where(jnp.isnan(values), fill, values)
    return jnp.where(padding, -jnp.inf, values)


def _outside_message(capacity: int, count: int, largest: int) -> str:
    return (f"example_index holds {count} value(s) >= the score table's capacity {capacity} "
            f"(largest {largest}): those examples are never recorded nor ranked, so IDS would "
            "select blindly; pass each example's position in the task's training set "
            f"(0..{capacity - 1}; a negative index marks a padding row), or a larger table "
            "(init_example_stats(capacity))")


def _warn_outside(capacity: int, count: np.ndarray, largest: np.ndarray) -> None:
    """Host side of `table_positions`' check under jit (one warning per call site)."""
    count, largest = np.asarray(count), np.asarray(largest)
    if np.any(count > 0):
        warnings.warn(_outside_message(capacity, int(count.max()), int(largest.max())),
                      UserWarning, stacklevel=2)


def table_positions(stats: ExampleStats, idx: jax.Array, *, check: bool = True) -> jax.Array:
    """Checked table positions of a batch: `idx` with padding (negative) mapped past the end.

    Args:
      stats: the score table.
      idx: int[B] each example's position in the task's training set; a negative value marks
        a padding row (ignored, never selected).
      check: refuse positions >= the table's capacity. With concrete `idx` it raises at once;
        under `jit` a step that meets one warns (a host callback inside `lax.cond`, so other
        steps pay one comparison; a program holding a host callback is not stored in JAX's
        persistent compilation cache, so pass `check=False` once your indices are right).

    Returns:
      int32[B] positions for `gather_scores` / `update_example_stats` / `table_scores`.

    Raises:
      ValueError: a concrete `idx` holds a value >= the capacity (with `check`).
    """
    capacity = stats.loss.shape[0]
    idx = jnp.asarray(idx, jnp.int32)
    if check:
        try:
            values = np.asarray(idx)
        except jax.errors.TracerArrayConversionError:
            values = None
        if values is not None:
            count = int(np.sum(values >= capacity))
            if count:
                raise ValueError(_outside_message(capacity, count, int(values.max())))
        else:
            count, largest = jnp.sum(idx >= capacity, dtype=jnp.int32), jnp.max(idx)
            jax.lax.cond(
                count > 0,
                lambda c, m: jax.debug.callback(
                    lambda c, m: _warn_outside(capacity, c, m), c, m),
                lambda c, m: None, count, largest)
    return jnp.where(idx < 0, capacity, idx)


__getattr__ = _deprecation.forwarding_getattr(__name__, {
    "select_top": ("esacl_jax.ids:select_examples", ""),
})
