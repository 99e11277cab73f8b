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
    indices, selected = jax.jit(functools.partial(ids.select_top, gamma=gamma))(scores)
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
    # Never-seen examples are picked first by select_top.
    idx, _ = ids.select_top(scores, 0.5)
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
    chosen, _ = ids.select_top(jnp.asarray(mean), 0.5)
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
