"""flax glue for `sdp_transform`: a `TrainState` whose `apply_gradients` passes `grad_fn`.

Kept out of `esacl_jax/__init__.py` (the library imports only jax, optax and numpy): import it
as `from esacl_jax.flax_utils import SDPTrainState` when you use flax.

flax's `TrainState.apply_gradients(grads=...)` calls `tx.update(grads, opt_state, params)` and
has no way to hand `grad_fn` to the transform, so `sdp_transform` would raise (no grad_fn);
`SDPTrainState.apply_gradients(grads=..., grad_fn=...)` does the same update with it::

    state = SDPTrainState.create(apply_fn=model.apply, params=params, tx=tx)  # sparse start
    grads = jax.grad(loss)(state.params, batch)
    state = state.apply_gradients(grads=grads, grad_fn=lambda p: jax.grad(loss)(p, batch))
    state = state.refresh_masks()                      # e.g. every few epochs
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

try:
    from flax.training import train_state
except ModuleNotFoundError as error:  # the library installed without flax
    raise ModuleNotFoundError(
        f"esacl_jax.flax_utils needs flax ({error.name} is not installed): "
        'pip install "esacl_jax[harness]" (or flax)', name=error.name) from None

from esacl_jax import masks as masks_lib
from esacl_jax import sdp


class SDPTrainState(train_state.TrainState):
    """`flax.training.train_state.TrainState` for a `keep_sparse(chain(sdp_transform, ...))`."""

    @classmethod
    def create(cls, *, apply_fn: Any, params: Any, tx: Any, sparse_start: bool = True,
               **kwargs: Any) -> SDPTrainState:
        """As `TrainState.create`; with `sparse_start` the initially pruned weights are zeroed
        (`masks.apply_masks` with the transform's initial masks).

        Args:
          apply_fn: the model's apply function.
          params: the dense initial params.
          tx: a `keep_sparse(chain(sdp_transform, ...))` transform.
          sparse_start: zero the initially pruned weights.
          **kwargs: other `TrainState` fields.

        Returns:
          The `SDPTrainState`.
        """
        state = super().create(apply_fn=apply_fn, params=params, tx=tx, **kwargs)
        if sparse_start:
            state = state.replace(params=masks_lib.masked_start(state.params, state.masks,
                                                                 rescale=False))
        return state

    @property
    def masks(self) -> Any:
        """The current masks (bool tree like params; scalar True on non-prunable leaves)."""
        return sdp.find_sdp_state(self.opt_state).masks

    def apply_gradients(self, *, grads: Any, grad_fn: Callable[[Any], Any] | None = None,
                        **kwargs: Any) -> SDPTrainState:
        """One step: `tx.update(grads, opt_state, params, grad_fn=grad_fn)`, then
        `optax.apply_updates`; `step` + 1 and `kwargs` replaced, as flax's.

        Args:
          grads: the clean gradient at `params`.
          grad_fn: the descent gradient function (`sdp_transform`'s).
          **kwargs: fields to replace.

        Returns:
          The next `SDPTrainState`.
        """
        extra = {} if grad_fn is None else {"grad_fn": grad_fn}
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **kwargs)

    def refresh_masks(self, **kwargs: Any) -> SDPTrainState:
        """`esacl_jax.refresh_masks` on this state (the transform's own options by default).

        Args:
          **kwargs: `sdp.mask_update`'s options for this call.

        Returns:
          The state with new masks and the newly pruned weights zeroed.
        """
        opt_state, params = sdp.refresh_masks(self.opt_state, self.params, **kwargs)
        return self.replace(opt_state=opt_state, params=params)
