"""Typed method state (`esacl_jax.harness.methods.state`): fast checks of its helpers."""

import jax
import jax.numpy as jnp

from esacl_jax.harness.methods import state as state_lib


def test_every_state_lists_its_fields_alphabetically():
    """Leaves come in the order of the dict of the same entries (same programs, checkpoints)."""
    for cls in (state_lib.NoState, state_lib.ReplayState, state_lib.EsaCLState,
                state_lib.EWCState, state_lib.CO2LState, state_lib.SparCLState,
                state_lib.PruneRetrainState):
        assert list(cls._fields) == sorted(cls._fields)
    ms = state_lib.SparCLState(fisher=jnp.ones(2), masks=jnp.zeros(3), checkpoint=jnp.ones(1))
    as_dict = {k: v for k, v in ms._asdict().items() if not state_lib.is_absent(v)}
    assert [x.shape for x in jax.tree.leaves(ms)] == [x.shape for x in jax.tree.leaves(as_dict)]


def test_replay_buffer_and_stored_entries():
    plain = state_lib.NoState()
    assert state_lib.replay_buffer(plain) is None and state_lib.stored_entries(plain) == {}
    ewc = state_lib.EWCState(checkpoint=jnp.ones(2), fisher=jnp.zeros(2))
    assert state_lib.replay_buffer(ewc) is None
    assert list(state_lib.stored_entries(ewc)) == ["checkpoint", "fisher"]
    wide = state_lib.widen(state_lib.SparCLState, state_lib.ReplayState(buffer=jnp.ones(4)),
                           masks=jnp.ones(3, bool))
    assert wide.buffer.shape == (4,) and state_lib.replay_buffer(wide) is wide.buffer
    assert list(state_lib.stored_entries(wide)) == ["masks"]  # absent fields are not counted
    assert not any(leaf is None for leaf in jax.tree.leaves(wide))
