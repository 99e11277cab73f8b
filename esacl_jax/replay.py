"""Reservoir replay buffer as fixed-size device arrays (a pytree inside the jit-compiled state).

Everything is pure and static-shaped, so the buffer is updated inside the compiled train step
and shards/checkpoints with the rest of the state (no host-side buffer, unlike mammoth).
Semantics follow mammoth's reservoir sampling (DER/DER++/ER and SparCL):

* `add_reservoir` offers a batch as if its examples arrived one by one: the example that is
  the n-th offered (n = num_seen + i + 1) goes to slot n - 1 while the buffer is not full,
  otherwise to a uniform j in [0, n - 1] if j < capacity (dropped else). When two examples of a
  batch hit the same slot the later one wins, exactly as sequential insertion would give.
* `sample` draws uniformly without replacement among the filled slots; when fewer are filled
  than requested it returns all of them plus padding flagged invalid (``valid`` is False).

Capacity 0 is allowed (the no-buffer variant): arrays have leading dimension 0, sampling
returns only invalid rows and both losses are exactly 0.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class ReplayBuffer(NamedTuple):
    """Reservoir buffer state; every field is a fixed-shape array (leading dim = capacity C)."""

    x: jax.Array  # [C, *input_shape], compact input dtype (uint8 images), un-augmented
    y: jax.Array  # int32 [C]
    logits: jax.Array  # float32 [C, num_classes], logits at insertion time (DER/DER++)
    task_id: jax.Array  # int32 [C]
    num_seen: jax.Array  # int32 scalar: examples offered so far (reservoir counter)


def init_buffer(
    capacity: int,
    input_shape: tuple[int, ...],
    input_dtype: Any,
    num_classes: int,
) -> ReplayBuffer:
    """An empty buffer of ``capacity`` slots (0 allowed) for inputs of one example's shape.

    Args:
      capacity: the number of slots (0: a buffer that stores nothing).
      input_shape: one example's input shape.
      input_dtype: the stored inputs' dtype (e.g. uint8 images).
      num_classes: the width of the stored logits.

    Returns:
      An empty `ReplayBuffer`.
    """
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    return ReplayBuffer(
        x=jnp.zeros((capacity, *input_shape), input_dtype),
        y=jnp.zeros((capacity,), jnp.int32),
        logits=jnp.zeros((capacity, num_classes), jnp.float32),
        task_id=jnp.zeros((capacity,), jnp.int32),
        num_seen=jnp.zeros((), jnp.int32),
    )


def capacity(buffer: ReplayBuffer) -> int:
    """Number of slots (static).

    Args:
      buffer: a buffer.

    Returns:
      The number of slots, a Python int.
    """
    return int(buffer.y.shape[0])


def num_filled(buffer: ReplayBuffer) -> jax.Array:
    """Number of filled slots: min(num_seen, capacity), int32 scalar.

    Args:
      buffer: a buffer.

    Returns:
      An int32 scalar.
    """
    return jnp.minimum(buffer.num_seen, capacity(buffer)).astype(jnp.int32)


def reservoir_draws(key: jax.Array, num_seen: jax.Array, batch_size: int) -> jax.Array:
    """The random draws of one `add_reservoir` call: j_i uniform in [0, num_seen + i] (int32).

    Exposed so tests can feed the same draws to a sequential reference implementation.

    Args:
      key: the PRNG key of the call.
      num_seen: examples offered before this batch.
      batch_size: B.

    Returns:
      int32[B] draws.
    """
    maxval = num_seen + 1 + jnp.arange(batch_size, dtype=jnp.int32)
    return jax.random.randint(key, (batch_size,), 0, maxval, dtype=jnp.int32)


def reservoir_slots(key: jax.Array, num_seen: jax.Array, batch_size: int, cap: int) -> jax.Array:
    """Target slot of each example of a batch under sequential reservoir sampling, with
    duplicates resolved (the later example wins); ``cap`` (out of range) means "not stored".

    Args:
      key: the PRNG key of the call.
      num_seen: examples offered before this batch.
      batch_size: B.
      cap: the buffer's capacity.

    Returns:
      int32[B] slots (`cap` for examples not stored).
    """
    n = num_seen + jnp.arange(batch_size, dtype=jnp.int32)  # examples seen before example i
    draws = reservoir_draws(key, num_seen, batch_size)
    slots = jnp.where(n < cap, n, draws)
    slots = jnp.where(slots < cap, slots, cap)
    # Sequential semantics: of several examples aimed at one slot only the last survives.
    # Scatter-max of the example index is order-independent, unlike a scatter of the data.
    order = jnp.arange(batch_size, dtype=jnp.int32)
    last = jnp.full((cap,), -1, jnp.int32).at[slots].max(order, mode="drop")
    wins = (slots < cap) & (last[jnp.minimum(slots, cap - 1)] == order)
    return jnp.where(wins, slots, cap)


def add_reservoir(
    buffer: ReplayBuffer,
    key: jax.Array,
    x: jax.Array,
    y: jax.Array,
    logits: jax.Array | None = None,
    task_id: jax.Array | int = 0,
) -> ReplayBuffer:
    """Offer a batch to the buffer with sequential reservoir sampling (see the module doc).

    Args:
      buffer: the current buffer.
      key: a PRNG key (one draw per example).
      x: [B, *input_shape] un-augmented inputs; cast to the buffer's dtype (e.g. uint8).
      y: [B] labels.
      logits: [B, num_classes] logits to store (DER); None stores zeros (ER).
      task_id: scalar or [B] task ids.

    Returns:
      The updated buffer; ``num_seen`` grows by B whether or not examples were stored.
    """
    batch = int(y.shape[0])
    cap = capacity(buffer)
    num_seen = buffer.num_seen + batch
    if cap == 0 or batch == 0:
        return buffer._replace(num_seen=num_seen)
    slots = reservoir_slots(key, buffer.num_seen, batch, cap)
    if logits is None:
        logits = jnp.zeros((batch, buffer.logits.shape[1]), buffer.logits.dtype)
    task_id = jnp.broadcast_to(jnp.asarray(task_id, jnp.int32), (batch,))

    def put(store: jax.Array, values: jax.Array) -> jax.Array:
        # Winning slots are unique and losers point out of range, so the scatter is exact.
        return store.at[slots].set(values.astype(store.dtype), mode="drop")

    return ReplayBuffer(
        x=put(buffer.x, x),
        y=put(buffer.y, y),
        logits=put(buffer.logits, jax.lax.stop_gradient(logits)),
        task_id=put(buffer.task_id, task_id),
        num_seen=num_seen,
    )


def sample(
    buffer: ReplayBuffer, key: jax.Array, batch_size: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Draw ``batch_size`` rows uniformly without replacement among the filled slots.

    Returns ``(x, y, logits, task_id, valid)`` with static leading dimension ``batch_size``.
    When fewer than ``batch_size`` slots are filled, all filled rows come first (in random
    order) and the rest is padding with ``valid`` False (slot 0's contents, or zeros when the
    capacity is 0). Use the losses below, which ignore invalid rows.

    Args:
      buffer: a buffer.
      key: a PRNG key.
      batch_size: the number of rows (static).

    Returns:
      `(x, y, logits, task_id, valid)`.
    """
    cap = capacity(buffer)
    if cap == 0:
        zeros = lambda a: jnp.zeros((batch_size, *a.shape[1:]), a.dtype)  # noqa: E731
        return (
            zeros(buffer.x), zeros(buffer.y), zeros(buffer.logits), zeros(buffer.task_id),
            jnp.zeros((batch_size,), bool),
        )
    filled = num_filled(buffer)
    # A random permutation of the filled slots: smallest uniform keys, unfilled slots last.
    u = jax.random.uniform(key, (cap,))
    u = jnp.where(jnp.arange(cap) < filled, u, 2.0)
    k = min(batch_size, cap)
    _, idx = jax.lax.top_k(-u, k)
    if batch_size > cap:
        idx = jnp.concatenate([idx, jnp.zeros((batch_size - cap,), idx.dtype)])
    valid = jnp.arange(batch_size) < filled
    idx = jnp.where(valid, idx, 0)
    return buffer.x[idx], buffer.y[idx], buffer.logits[idx], buffer.task_id[idx], valid


def _masked_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of ``values`` over ``valid`` rows; exactly 0 when none is valid."""
    valid = valid.astype(bool)
    total = jnp.sum(jnp.where(valid, values, 0.0))
    return total / jnp.maximum(jnp.sum(valid), 1).astype(total.dtype)


def er_loss(logits: jax.Array, y: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean cross-entropy of replayed labels over valid rows (ER, DER++'s beta term); 0 if none.

    Args:
      logits: [R, num_classes] logits of the replayed inputs.
      y: [R] their stored labels.
      valid: bool[R], the rows that hold an example.

    Returns:
      A float32 scalar.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
    return _masked_mean(ce, valid)


def joint_ce(current_ce: jax.Array, replay_logits: jax.Array, replay_y: jax.Array,
             valid: jax.Array) -> jax.Array:
    """One mean cross-entropy over the current examples and the valid replayed ones together.

    `current_ce` is the current batch's per-example CE. This is ER as the reference
    implementation computes it (current and replay examples concatenated into one batch):
    (sum current + sum replay) / (n current + n valid), which weighs every example alike, unlike
    the sum of the two means (`current_ce.mean() + er_loss(...)`).

    Args:
      current_ce: [B] per-example CE of the current batch.
      replay_logits: [R, num_classes] logits of the replayed inputs.
      replay_y: [R] their stored labels.
      valid: bool[R], the rows that hold an example.

    Returns:
      A float32 scalar.
    """
    replay_ce = optax.softmax_cross_entropy_with_integer_labels(
        replay_logits.astype(jnp.float32), replay_y)
    weights = valid.astype(jnp.float32)
    total = jnp.sum(current_ce.astype(jnp.float32)) + jnp.sum(replay_ce * weights)
    return total / (current_ce.shape[0] + jnp.sum(weights))


def der_loss(logits: jax.Array, stored_logits: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean over valid rows of the MSE (mean over classes) to the stored logits (DER's alpha
    term); 0 if none is valid.

    Args:
      logits: [R, num_classes] logits of the replayed inputs.
      stored_logits: [R, num_classes] the logits stored with them.
      valid: bool[R], the rows that hold an example.

    Returns:
      A float32 scalar.
    """
    diff = logits.astype(jnp.float32) - stored_logits.astype(jnp.float32)
    return _masked_mean(jnp.mean(jnp.square(diff), axis=-1), valid)
