"""Intelligent data selection (IDS) and the per-example statistics table.

Two pieces, both pure and jit-friendly with static shapes:
- `select_top`: keep the ceil(gamma * B) examples of a batch with the highest scores (e.g. the
  per-example sharpness l_i(w + eps) - l_i(w)), via `jax.lax.top_k` with a static k.
- `ExampleStats`: fixed-size device arrays indexed by an example's position in the current task's
  training set, filled by the passes the training step makes anyway (loss, sharpness, argmax
  correctness). It serves EsaCL's score table (step variant C: choose the ascent examples from
  scores of earlier passes) and SparCL's dynamic data removal (forgetting events).

Index convention: indices >= capacity are padding and are ignored by updates (scatter mode
"drop") and get score -inf from `table_scores` (never selected).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

SCORE_FIELDS = ("loss", "sharpness", "estimated_sharpness")
UNSEEN_POLICIES = ("mean", "first")


def num_selected(batch_size: int, gamma: float) -> int:
    """ceil(gamma * batch_size) as a static Python int, in [1, batch_size].

    A 1e-9 slack absorbs float error (0.3 * 10 = 3.0000000000000004 must give 3, not 4).
    """
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return min(batch_size, max(1, math.ceil(gamma * batch_size - 1e-9)))


def select_top(scores: jax.Array, gamma: float) -> tuple[jax.Array, jax.Array]:
    """Indices (int32[k]) and selection mask (bool[B]) of the k = ceil(gamma * B) highest scores.

    `gamma` must be a static Python float (it fixes the output shape). Ties go to the lower index.
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
    """

    loss: jax.Array
    sharpness: jax.Array
    correct: jax.Array
    forgetting: jax.Array
    seen: jax.Array


def init_example_stats(capacity: int) -> ExampleStats:
    """An empty table for up to `capacity` examples (e.g. the largest task's training set)."""
    return ExampleStats(
        loss=jnp.full((capacity,), jnp.nan, jnp.float32),
        sharpness=jnp.full((capacity,), jnp.nan, jnp.float32),
        correct=jnp.zeros((capacity,), bool),
        forgetting=jnp.zeros((capacity,), jnp.int32),
        seen=jnp.zeros((capacity,), jnp.int32),
    )


def reset_example_stats(stats: ExampleStats) -> ExampleStats:
    """The empty table of the same capacity (call at a task boundary); sharding preserved."""
    return ExampleStats(
        loss=jnp.full_like(stats.loss, jnp.nan),
        sharpness=jnp.full_like(stats.sharpness, jnp.nan),
        correct=jnp.zeros_like(stats.correct),
        forgetting=jnp.zeros_like(stats.forgetting),
        seen=jnp.zeros_like(stats.seen),
    )


def update_example_stats(
    stats: ExampleStats,
    idx: jax.Array,
    *,
    loss: jax.Array | None = None,
    sharpness: jax.Array | None = None,
    correct: jax.Array | None = None,
) -> ExampleStats:
    """Record a batch's statistics at positions `idx` (int[B], distinct within the batch).

    Only the given fields change. `seen` is incremented for every index. A forgetting event is
    counted when an example recorded as correct is now incorrect (so never on a first sighting).
    """
    idx = jnp.asarray(idx, jnp.int32)
    new = stats
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
    return new._replace(seen=stats.seen.at[idx].add(1, mode="drop"))


def _nanmean(x: jax.Array) -> jax.Array:
    """Mean of the non-NaN entries; 0 when there is none."""
    ok = ~jnp.isnan(x)
    return jnp.sum(jnp.where(ok, x, 0.0)) / jnp.maximum(jnp.sum(ok), 1)


def estimated_sharpness(stats: ExampleStats) -> jax.Array:
    """A sharpness for every recorded example (float32[N], NaN where nothing is recorded).

    Where the sharpness l_i(w + eps) - l_i(w) was measured it is used as it is; elsewhere it is
    estimated from the example's recorded loss by the ratio of measured sharpness to loss over
    the examples where both are known (per-example sharpness grows with the loss), so that every
    example the training passes touched has a score to rank by.
    """
    both = ~jnp.isnan(stats.sharpness) & ~jnp.isnan(stats.loss)
    ratio = (jnp.sum(jnp.where(both, stats.sharpness, 0.0))
             / jnp.maximum(jnp.sum(jnp.where(both, stats.loss, 0.0)), 1e-12))
    return jnp.where(jnp.isnan(stats.sharpness), ratio * stats.loss, stats.sharpness)


def table_scores(stats: ExampleStats, idx: jax.Array, kind: str = "loss",
                 unseen: str = "first") -> jax.Array:
    """The batch's recorded scores (float32[B]); padding indices (>= capacity) get -inf.

    `kind`: "loss", "sharpness", or "estimated_sharpness" (measured sharpness where known, else
    estimated from the loss: `estimated_sharpness`). `unseen` places examples with no score:
    "first" gives them +inf (coverage first: every example is scored before any is ranked);
    "mean" gives them the mean of the recorded scores, so an example with a higher recorded
    score than average is chosen before an unscored one (ranking from the first recorded pass).
    """
    if kind not in SCORE_FIELDS:
        raise ValueError(f"kind must be one of {SCORE_FIELDS}, got {kind!r}")
    if unseen not in UNSEEN_POLICIES:
        raise ValueError(f"unseen must be one of {UNSEEN_POLICIES}, got {unseen!r}")
    table = {"loss": lambda: stats.loss, "sharpness": lambda: stats.sharpness,
             "estimated_sharpness": lambda: estimated_sharpness(stats)}[kind]()
    values = table.at[jnp.asarray(idx, jnp.int32)].get(mode="fill", fill_value=-jnp.inf)
    fill = jnp.inf if unseen == "first" else _nanmean(table)
    return jnp.where(jnp.isnan(values), fill, values)
