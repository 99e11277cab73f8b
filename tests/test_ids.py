"""Tests of esacl_jax.ids: top-gamma selection and the per-example statistics table."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esacl_jax import ids


@pytest.mark.parametrize(
    "batch, gamma, expected",
    [(10, 0.3, 3), (10, 0.5, 5), (7, 0.5, 4), (5, 0.01, 1), (32, 1.0, 32), (3, 0.7, 3)],
)
def test_num_selected(batch, gamma, expected):
    assert ids.num_selected(batch, gamma) == expected


@pytest.mark.parametrize("gamma", [0.0, -0.1, 1.5])
def test_num_selected_rejects_bad_gamma(gamma):
    with pytest.raises(ValueError):
        ids.num_selected(8, gamma)


@pytest.mark.parametrize("gamma", [0.1, 0.25, 0.5, 0.9, 1.0])
def test_select_top_matches_numpy(gamma):
    scores = jax.random.normal(jax.random.key(int(gamma * 100)), (37,))
    indices, selected = jax.jit(functools.partial(ids.select_examples, gamma=gamma))(scores)
    k = int(np.ceil(gamma * 37 - 1e-9))
    want = np.argsort(-np.asarray(scores), kind="stable")[:k]
    assert indices.shape == (k,) and indices.dtype == jnp.int32
    np.testing.assert_array_equal(np.sort(np.asarray(indices)), np.sort(want))
    assert selected.dtype == jnp.bool_ and int(selected.sum()) == k
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(selected)), np.sort(want))


def test_example_stats_forgetting_sequence():
    stats = ids.init_example_stats(4)
    update = jax.jit(ids.update_example_stats)
    # Correctness of examples 0..3 over five passes (each pass sees all four examples).
    passes = [
        [True, False, True, False],
        [False, False, True, True],  # 0 forgets
        [True, True, False, True],  # 2 forgets
        [False, True, True, False],  # 0 and 3 forget
        [False, False, True, True],  # 1 forgets
    ]
    for correct in passes:
        stats = update(stats, jnp.arange(4), correct=jnp.array(correct))
    np.testing.assert_array_equal(stats.forgetting, [2, 1, 1, 1])
    np.testing.assert_array_equal(stats.seen, [5, 5, 5, 5])
    np.testing.assert_array_equal(stats.correct, passes[-1])
    # Loss untouched by correctness-only updates.
    assert np.all(np.isnan(np.asarray(stats.loss)))


def test_first_sighting_is_not_a_forgetting_event():
    stats = ids.init_example_stats(3)
    stats = ids.update_example_stats(stats, jnp.array([0, 1]), correct=jnp.array([False, False]))
    np.testing.assert_array_equal(stats.forgetting, [0, 0, 0])


def test_example_stats_fields_scores_and_padding():
    stats = ids.init_example_stats(5)
    stats = ids.update_example_stats(
        stats,
        jnp.array([4, 1, 5]),
        loss=jnp.array([0.5, 2.0, 9.0]),  # 5: padding, dropped
    )
    stats = ids.update_example_stats(stats, jnp.array([1]), sharpness=jnp.array([0.25]))
    np.testing.assert_array_equal(stats.seen, [0, 2, 0, 0, 1])
    scores = jax.jit(ids.table_scores, static_argnames="kind")(stats, jnp.array([0, 1, 4, 5]))
    np.testing.assert_array_equal(scores, [np.inf, 2.0, 0.5, -np.inf])
    sharp = ids.table_scores(stats, jnp.array([1, 4]), kind="sharpness")
    np.testing.assert_array_equal(sharp, [0.25, np.inf])
    # Never-seen examples are picked first by select_examples.
    idx, _ = ids.select_examples(scores, 0.5)
    np.testing.assert_array_equal(np.sort(np.asarray(idx)), [0, 1])
    reset = ids.reset_example_stats(stats)
    assert np.all(np.asarray(reset.seen) == 0) and np.all(np.isnan(np.asarray(reset.loss)))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), reset) == jax.tree.map(
        lambda x: (x.shape, x.dtype), stats
    )
    with pytest.raises(ValueError):
        ids.table_scores(stats, jnp.array([0]), kind="accuracy")


def test_unseen_examples_rank_at_the_mean_of_recorded_scores():
    """unseen="mean": an example scored above average beats an unscored one; "first" inverts."""
    stats = ids.init_example_stats(6)
    stats = ids.update_example_stats(stats, jnp.array([0, 1, 2]), loss=jnp.array([1.0, 2.0, 6.0]))
    idx = jnp.array([0, 2, 4, 9])  # 4 never recorded, 9 is padding
    mean = np.asarray(ids.table_scores(stats, idx, "loss", unseen="mean"))
    np.testing.assert_allclose(mean, [1.0, 6.0, 3.0, -np.inf])
    first = np.asarray(ids.table_scores(stats, idx, "loss", unseen="first"))
    np.testing.assert_allclose(first, [1.0, 6.0, np.inf, -np.inf])
    chosen, _ = ids.select_examples(jnp.asarray(mean), 0.5)
    assert sorted(np.asarray(chosen).tolist()) == [1, 2]  # 6.0, then the unseen at 3.0
    with pytest.raises(ValueError, match="unseen"):
        ids.table_scores(stats, idx, "loss", unseen="last")


def test_estimated_sharpness_scores_every_recorded_example():
    """Measured sharpness where known; elsewhere loss x (sum measured sharpness / their loss)."""
    stats = ids.init_example_stats(5)
    stats = ids.update_example_stats(stats, jnp.arange(4), loss=jnp.array([1.0, 3.0, 2.0, 4.0]))
    stats = ids.update_example_stats(stats, jnp.array([0, 1]), sharpness=jnp.array([0.5, 0.7]))
    ratio = (0.5 + 0.7) / (1.0 + 3.0)
    est = np.asarray(ids.estimated_sharpness(stats))
    np.testing.assert_allclose(est[:4], [0.5, 0.7, 2.0 * ratio, 4.0 * ratio], rtol=1e-6)
    assert np.isnan(est[4])
    scores = np.asarray(ids.table_scores(stats, jnp.arange(5), "estimated_sharpness",
                                         unseen="mean"))
    np.testing.assert_allclose(scores, [*est[:4], np.mean(est[:4])], rtol=1e-6)
    # With no measured sharpness yet the ratio is 0: every score ties and selection is random
    # over the shuffled batch.
    only_loss = ids.update_example_stats(ids.init_example_stats(3), jnp.arange(3),
                                         loss=jnp.ones(3))
    assert np.all(np.asarray(ids.estimated_sharpness(only_loss)) == 0.0)


def _brute_force_scores(stats, idx, kind, unseen):
    """table_scores as a pass over the whole table (what the running totals replace)."""
    loss, sharp = np.asarray(stats.loss, np.float64), np.asarray(stats.sharpness, np.float64)
    both = ~np.isnan(loss) & ~np.isnan(sharp)
    ratio = sharp[both].sum() / max(loss[both].sum(), 1e-12)
    table = {"loss": loss, "sharpness": sharp,
             "estimated_sharpness": np.where(np.isnan(sharp), ratio * loss, sharp)}[kind]
    recorded = table[~np.isnan(table)]
    fill = np.inf if unseen == "first" else (recorded.mean() if recorded.size else 0.0)
    out = []
    for i in np.asarray(idx):
        value = table[i] if i < table.size else -np.inf
        out.append(fill if np.isnan(value) else value)
    return np.array(out)


def test_running_totals_match_a_pass_over_the_table():
    """After many overlapping updates (re-recorded entries, padding, sharpness on subsets) the
    O(batch) scores equal the ones computed from the whole table."""
    rng = np.random.default_rng(0)
    capacity = 50
    stats = ids.init_example_stats(capacity)
    update = jax.jit(ids.update_example_stats)
    scores = jax.jit(ids.table_scores, static_argnames=("kind", "unseen"))
    for step in range(40):
        idx = rng.choice(capacity + 5, size=8, replace=False)  # > capacity: padding
        loss = rng.uniform(0.0, 3.0, 8).astype(np.float32)
        stats = update(stats, jnp.asarray(idx), loss=jnp.asarray(loss),
                       correct=jnp.asarray(loss < 1.0))
        picked = idx[:3]
        stats = update(stats, jnp.asarray(picked),
                       sharpness=jnp.asarray(rng.uniform(-0.1, 0.5, 3).astype(np.float32)))
        if step == 20:  # a reset in the middle starts the totals over
            stats = ids.reset_example_stats(stats)
            assert np.all(np.asarray(stats.totals) == 0.0)
        query = jnp.asarray(rng.choice(capacity + 3, size=12, replace=False))
        for kind in ids.SCORE_FIELDS:
            for unseen in ids.UNSEEN_POLICIES:
                np.testing.assert_allclose(np.asarray(scores(stats, query, kind, unseen)),
                                           _brute_force_scores(stats, query, kind, unseen),
                                           rtol=1e-5, atol=1e-5)
    loss, sharp = np.asarray(stats.loss), np.asarray(stats.sharpness)
    both = ~np.isnan(loss) & ~np.isnan(sharp)
    expected = [np.nansum(loss), np.sum(~np.isnan(loss)), np.nansum(sharp),
                np.sum(~np.isnan(sharp)), loss[both].sum(), sharp[both].sum(), both.sum()]
    np.testing.assert_allclose(np.asarray(stats.totals), expected, rtol=1e-5, atol=1e-4)
