"""DER++: dark experience replay with logits (MSE) and labels (CE) from two buffer draws."""

from __future__ import annotations

import jax

from esacl_jax import replay
from esacl_jax.harness.methods.base import Pass
from esacl_jax.harness.methods.er import ReplayMethod


def derpp_replay_loss(method: ReplayMethod, params, batch_stats, buffer, key: jax.Array,
                      alpha: float, beta: float) -> jax.Array:
    """alpha * MSE(f(x1), z1) + beta * CE(f(x2), y2), two independent draws (Buzzega et al.)."""
    key1, key2 = jax.random.split(key)
    logits1, (_, _, z1, _, valid1) = method.replay_logits(params, batch_stats, key1, buffer)
    logits2, (_, y2, _, _, valid2) = method.replay_logits(params, batch_stats, key2, buffer)
    return (alpha * replay.der_loss(logits1, z1, valid1)
            + beta * replay.er_loss(logits2, y2, valid2))


class DERPP(ReplayMethod):
    name = "derpp"

    def step_passes(self) -> list[Pass]:
        replay_pass = Pass("fwd_bwd", self.replay_batch_size)
        return [Pass("fwd_bwd", self.config.batch_size), replay_pass, replay_pass]

    def replay_loss(self, params, batch_stats, state, key):
        return derpp_replay_loss(self, params, batch_stats, state.method_state.buffer, key,
                                 self.config.der_alpha, self.config.der_beta)
