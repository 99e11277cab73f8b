"""Reservoir buffer: exact sequential semantics, uniform inclusion, sampling and the losses."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esacl_jax import replay


def _batch(start: int, size: int, num_classes: int = 3):
    """Examples whose content encodes their stream index (x = y = index)."""
    idx = np.arange(start, start + size)
    x = jnp.asarray(np.stack([idx % 256, idx // 256], axis=1), jnp.uint8)
    logits = jnp.asarray(np.tile(idx[:, None], (1, num_classes)), jnp.float32)
    return x, jnp.asarray(idx, jnp.int32), logits


def _reference_slots(num_seen: int, draws: np.ndarray, cap: int) -> list[int]:
    """Pure sequential reservoir sampling (mammoth), one example at a time: -1 = not stored."""
    out = []
    for i, j in enumerate(draws):
        n = num_seen + i
        assert 0 <= j <= n
        out.append(n if n < cap else (int(j) if j < cap else -1))
    return out


def test_first_capacity_examples_fill_slots_in_order():
    buf = replay.init_buffer(10, (2,), jnp.uint8, 3)
    start = 0
    for t, size in enumerate((3, 3, 4)):
        x, y, logits = _batch(start, size)
        buf = replay.add_reservoir(buf, jax.random.key(t), x, y, logits, task_id=t)
        start += size
    np.testing.assert_array_equal(buf.y, np.arange(10))
    np.testing.assert_array_equal(buf.x[:, 0], np.arange(10))
    np.testing.assert_array_equal(buf.logits[:, 0], np.arange(10))
    np.testing.assert_array_equal(buf.task_id, [0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    assert int(buf.num_seen) == 10 and int(replay.num_filled(buf)) == 10


@pytest.mark.parametrize("cap,sizes", [(7, (5, 20, 13, 1, 64)), (1, (4, 4)), (50, (32,) * 6)])
def test_matches_sequential_numpy_reference(cap, sizes):
    """Same draws, sequential numpy insertion: contents identical (duplicates included)."""
    buf = replay.init_buffer(cap, (2,), jnp.uint8, 3)
    ref_y = np.zeros(cap, np.int64)
    ref_task = np.zeros(cap, np.int64)
    filled = np.zeros(cap, bool)
    start, collisions = 0, 0
    add = jax.jit(replay.add_reservoir)
    for t, size in enumerate(sizes):
        key = jax.random.key(100 + t)
        draws = np.asarray(replay.reservoir_draws(key, buf.num_seen, size))
        slots = _reference_slots(start, draws, cap)
        kept = [s for s in slots if s >= 0]
        collisions += len(kept) - len(set(kept))
        for i, s in enumerate(slots):  # sequential: a later example overwrites an earlier one
            if s >= 0:
                ref_y[s], ref_task[s], filled[s] = start + i, t, True
        x, y, logits = _batch(start, size)
        buf = add(buf, key, x, y, logits, t)
        start += size
        np.testing.assert_array_equal(np.asarray(buf.y)[filled], ref_y[filled])
        np.testing.assert_array_equal(np.asarray(buf.task_id)[filled], ref_task[filled])
        np.testing.assert_array_equal(np.asarray(buf.logits)[filled, 2], ref_y[filled])
        np.testing.assert_array_equal(np.asarray(buf.x)[filled, 0], ref_y[filled] % 256)
        assert int(buf.num_seen) == start
        assert int(replay.num_filled(buf)) == min(start, cap) == filled.sum()
    if cap < 50:
        assert collisions > 0, "the case must exercise two examples hitting one slot"


def _inclusion_counts(stream: int, cap: int, batch: int, trials: int, slot_fn) -> np.ndarray:
    """How often each of `stream` examples is in the buffer at the end, over `trials` runs."""

    def one_trial(key):
        buf = replay.init_buffer(cap, (1,), jnp.uint8, 1)._replace(y=jnp.full((cap,), -1))

        def step(buf, inp):
            k, start = inp
            y = start + jnp.arange(batch, dtype=jnp.int32)
            slots = slot_fn(k, buf.num_seen, batch, cap)
            return buf._replace(
                y=buf.y.at[slots].set(y, mode="drop"), num_seen=buf.num_seen + batch
            ), None

        keys = jax.random.split(key, stream // batch)
        starts = jnp.arange(0, stream, batch, dtype=jnp.int32)
        buf, _ = jax.lax.scan(step, buf, (keys, starts))
        return jnp.zeros((stream,), jnp.int32).at[buf.y].add(1, mode="drop")

    counts = jax.jit(jax.vmap(one_trial))(jax.random.split(jax.random.key(0), trials))
    return np.asarray(counts.sum(axis=0))


def _uniformity_stat(counts: np.ndarray, trials: int, p: float) -> float:
    """Pearson statistic of per-example inclusion counts against Binomial(trials, p)."""
    expected = trials * p
    return float(np.sum((counts - expected) ** 2) / (expected * (1 - p)))


@pytest.mark.parametrize("batch", [10, 1000])
def test_uniform_inclusion_probability(batch):
    """Stream N=1000 into C=100: each example must be kept with probability C/N = 0.1.

    batch=1000 offers the whole stream in one call, so most examples collide on a slot and the
    later-wins duplicate resolution is what makes the result uniform. The same statistic
    rejects a biased implementation (overwrite slot num_seen % C, i.e. keep the last C).
    """
    stream, cap, trials = 1000, 100, 2000
    p = cap / stream
    counts = _inclusion_counts(stream, cap, batch, trials, replay.reservoir_slots)
    assert counts.sum() == cap * trials  # capacity respected: exactly C kept per trial
    # ~chi-square with 999 dof: mean 999, sd ~45; 1300 is > 6 sd away.
    stat = _uniformity_stat(counts, trials, p)
    assert stat < 1300, stat
    freq = counts / trials
    assert np.max(np.abs(freq - p)) < 6 * math.sqrt(p * (1 - p) / trials)
    # First and last halves of the stream are kept equally often (no recency bias).
    assert abs(freq[:500].mean() - freq[500:].mean()) < 0.01

    def biased(key, num_seen, b, c):
        return (num_seen + jnp.arange(b, dtype=jnp.int32)) % c

    bad = _inclusion_counts(stream, cap, batch, trials, biased)
    assert _uniformity_stat(bad, trials, p) > 1e4


def test_capacity_respected_and_shapes_static():
    buf = replay.init_buffer(5, (4, 4, 3), jnp.uint8, 10)
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), buf)
    for t in range(6):
        x = jnp.full((8, 4, 4, 3), t, jnp.uint8)
        buf = replay.add_reservoir(buf, jax.random.key(t), x, jnp.full((8,), t), None, t)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), buf) == shapes
    assert int(buf.num_seen) == 48 and int(replay.num_filled(buf)) == 5
    np.testing.assert_array_equal(buf.logits, 0.0)  # logits=None stores zeros (ER)
    # x keeps the label's value: rows moved together.
    np.testing.assert_array_equal(np.asarray(buf.x)[:, 0, 0, 0], buf.y)


def test_jit_round_trip_and_device_put():
    buf = replay.init_buffer(6, (2,), jnp.uint8, 3)
    x, y, logits = _batch(0, 9)
    eager = replay.add_reservoir(buf, jax.random.key(3), x, y, logits, 1)
    jitted = jax.jit(replay.add_reservoir)(buf, jax.random.key(3), x, y, logits, 1)
    moved = jax.device_put(jitted, jax.devices()[0])
    passed = jax.jit(lambda b: b)(moved)
    for other in (jitted, moved, passed):
        assert isinstance(other, replay.ReplayBuffer)
        jax.tree.map(np.testing.assert_array_equal, eager, other)
    assert passed.x.dtype == jnp.uint8 and passed.num_seen.dtype == jnp.int32


def test_sample_partial_full_and_oversized():
    buf = replay.init_buffer(10, (2,), jnp.uint8, 3)
    xs, ys, logits = _batch(0, 3)
    buf = replay.add_reservoir(buf, jax.random.key(0), xs, ys, logits, 2)
    x, y, z, t, valid = jax.jit(replay.sample, static_argnums=2)(buf, jax.random.key(1), 5)
    assert x.shape == (5, 2) and y.shape == (5,) and z.shape == (5, 3) and valid.shape == (5,)
    np.testing.assert_array_equal(valid, [True, True, True, False, False])
    assert sorted(np.asarray(y)[:3].tolist()) == [0, 1, 2]  # all filled rows, no repeats
    np.testing.assert_array_equal(np.asarray(z)[:3, 0], np.asarray(y)[:3])
    np.testing.assert_array_equal(np.asarray(t)[:3], 2)

    xs, ys, logits = _batch(3, 7)
    buf = replay.add_reservoir(buf, jax.random.key(1), xs, ys, logits, 3)  # now full: 0..9
    seen = set()
    for k in range(20):
        _, y, _, _, valid = replay.sample(buf, jax.random.key(k), 4)
        assert bool(valid.all()) and len(set(np.asarray(y).tolist())) == 4  # no replacement
        seen |= set(np.asarray(y).tolist())
    assert seen == set(range(10))
    _, y, _, _, valid = replay.sample(buf, jax.random.key(0), 16)  # batch > capacity
    assert int(valid.sum()) == 10 and sorted(np.asarray(y)[:10].tolist()) == list(range(10))


def test_sample_draws_uniformly():
    buf = replay.init_buffer(8, (2,), jnp.uint8, 3)
    xs, ys, logits = _batch(0, 8)
    buf = replay.add_reservoir(buf, jax.random.key(0), xs, ys, logits, 0)
    keys = jax.random.split(jax.random.key(5), 4000)
    y = jax.vmap(lambda k: replay.sample(buf, k, 2)[1])(keys)
    counts = np.bincount(np.asarray(y).ravel(), minlength=8)
    # each slot drawn with probability 2/8 per sample: expected 1000, sd ~27
    assert np.max(np.abs(counts - 1000)) < 150, counts


def test_empty_and_zero_capacity_buffers():
    logits = jnp.full((4, 3), 7.0)
    for cap in (0, 5):
        buf = replay.init_buffer(cap, (2,), jnp.uint8, 3)
        x, y, z, _, valid = replay.sample(buf, jax.random.key(0), 4)
        assert x.shape == (4, 2) and not bool(valid.any())
        assert float(replay.er_loss(logits, y, valid)) == 0.0
        assert float(replay.der_loss(logits, z, valid)) == 0.0
    buf = replay.init_buffer(0, (2,), jnp.uint8, 3)
    assert buf.x.shape == (0, 2)
    xs, ys, zs = _batch(0, 6)
    buf = jax.jit(replay.add_reservoir)(buf, jax.random.key(0), xs, ys, zs, 0)
    assert int(buf.num_seen) == 6 and int(replay.num_filled(buf)) == 0
    _, y, z, _, valid = jax.jit(replay.sample, static_argnums=2)(buf, jax.random.key(0), 3)
    assert not bool(valid.any())
    grad = jax.grad(lambda lg: replay.er_loss(lg, y, valid) + replay.der_loss(lg, z, valid))
    np.testing.assert_array_equal(grad(jnp.ones((3, 3))), 0.0)


def test_er_and_der_losses_by_hand():
    logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0], [100.0, -100.0]])
    y = jnp.array([0, 0, 1])
    valid = jnp.array([True, True, False])
    # row 0: p(y)=1/2 -> CE = ln 2; row 1: p(y) = 3/(3+1) -> CE = ln(4/3); row 2 invalid.
    expected = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
    assert float(replay.er_loss(logits, y, valid)) == pytest.approx(expected, rel=1e-6)

    out = jnp.array([[1.0, 2.0], [3.0, 5.0], [100.0, 100.0]])
    stored = jnp.array([[0.0, 0.0], [3.0, 3.0], [0.0, 0.0]])
    # row 0: (1 + 4) / 2 = 2.5; row 1: (0 + 4) / 2 = 2.0; row 2 invalid -> mean 2.25.
    assert float(replay.der_loss(out, stored, valid)) == pytest.approx(2.25)
    assert float(replay.der_loss(out, stored, jnp.ones(3, bool))) == pytest.approx(
        (2.5 + 2.0 + 10000.0) / 3
    )


def test_reservoir_draws_cover_inclusive_range():
    """Example i of a batch draws j uniformly in [0, num_seen + i], both ends included."""
    keys = jax.random.split(jax.random.key(0), 3000)
    draws = np.asarray(jax.vmap(lambda k: replay.reservoir_draws(k, jnp.int32(2), 2))(keys))
    for i, n in enumerate((2, 3)):  # example 0 has seen 2 before it, example 1 has seen 3
        counts = np.bincount(draws[:, i], minlength=n + 1)
        assert counts.shape == (n + 1,)  # never above num_seen + i
        np.testing.assert_allclose(counts / 3000, 1 / (n + 1), atol=0.04)


def test_joint_ce_is_one_mean_over_current_and_valid_replay_rows():
    """ER's loss as the reference computes it: the concatenated batch's mean CE, by hand."""
    current_ce = jnp.array([0.5, 1.5, 1.0])
    logits = jnp.array([[2.0, 0.0], [0.0, 0.0], [5.0, -5.0]])
    y = jnp.array([0, 1, 1])
    valid = jnp.array([True, True, False])  # the third replay row is padding
    replay_ce = [math.log(1 + math.exp(-2.0)), math.log(2.0)]
    expected = (0.5 + 1.5 + 1.0 + sum(replay_ce)) / 5
    assert float(replay.joint_ce(current_ce, logits, y, valid)) == pytest.approx(expected, 1e-6)
    # Not the sum of the two means (what ER computed before): that doubles the replay weight.
    two_means = float(current_ce.mean() + replay.er_loss(logits, y, valid))
    assert two_means == pytest.approx(1.0 + sum(replay_ce) / 2, 1e-6)
    assert abs(two_means - expected) > 0.3
    # An empty buffer leaves the current mean.
    none = jnp.zeros(3, bool)
    assert float(replay.joint_ce(current_ce, logits, y, none)) == pytest.approx(1.0)
