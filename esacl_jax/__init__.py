"""esacl_jax: efficient continual learning of sparse models (EsaCL) in JAX and optax.

The optimizer pieces compose with any optax optimizer:

    tx = esacl_jax.keep_sparse(optax.chain(
        esacl_jax.sdp_transform(sparsity=0.9, rho=0.05), optax.sgd(0.03)))
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)

`sdp_transform` goes first in the chain: it perturbs the active weights (SAM), evaluates
`grad_fn` at w + eps, keeps the SDP masks and score averages in its state and masks the
gradient. `keep_sparse` wraps the chain so pruned weights are exactly zero after every
`optax.apply_updates`, whatever optimizer follows (momentum, Adam, AdamW's weight decay).

This package is the optimizer library and needs only jax, optax and numpy. The continual-learning
harness (loop, methods, models, data, accounting, reporting) is `esacl_jax.harness`, installed
with the `harness` extra: `pip install "esacl_jax[harness]"`.
"""

from esacl_jax.esacl import (
    DEFAULTS,
    EsaCLGradients,
    esacl_gradients,
    esacl_optimizer,
    sparse_start,
)
from esacl_jax.export import SparseFileError, load_sparse, save_dense, save_sparse
from esacl_jax.ids import (
    ExampleStats,
    init_example_stats,
    num_selected,
    reset_example_stats,
    select_top,
    table_scores,
    update_example_stats,
)
from esacl_jax.masks import (
    apply_masks,
    keep_top,
    layer_sparsities,
    magnitude_masks,
    name_prunable,
    prunable_tree,
    prune_and_regrow,
    sdp_scores,
    sparsity_summary,
    structural_prunable,
)
from esacl_jax.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    learning_accuracy,
    summarize,
    summarize_run,
)
from esacl_jax.replay import (
    ReplayBuffer,
    add_reservoir,
    der_loss,
    er_loss,
    init_buffer,
    joint_ce,
    num_filled,
    sample,
)
from esacl_jax.sdp import (
    STATIC_ARGS,
    SDPState,
    accumulate_grad_fn,
    find_sdp_state,
    keep_sparse,
    perturbed_params,
    refresh_masks,
    replace_sdp_state,
    sam_radius,
    sdp_transform,
    update_masks,
)
from esacl_jax.sharpness import (
    add_perturbation,
    masked_global_norm,
    per_example_sharpness,
    sam_perturbation,
)

__version__ = "0.1.0"

__all__ = [
    # EsaCL in one call: SDP + IDS + replay (the harness's step)
    "esacl_optimizer", "esacl_gradients", "EsaCLGradients", "sparse_start", "DEFAULTS",
    # SDP: the optax transform and its state
    "sdp_transform", "keep_sparse", "SDPState", "update_masks", "refresh_masks",
    "find_sdp_state", "replace_sdp_state", "accumulate_grad_fn", "perturbed_params",
    "sam_radius", "STATIC_ARGS",
    # export: a compact file of a sparse model
    "save_sparse", "save_dense", "load_sparse", "SparseFileError",
    # masks
    "name_prunable", "structural_prunable", "prunable_tree",
    "layer_sparsities", "magnitude_masks", "apply_masks",
    "keep_top", "sdp_scores", "prune_and_regrow", "sparsity_summary",
    # sharpness (SAM)
    "sam_perturbation", "add_perturbation", "masked_global_norm", "per_example_sharpness",
    # IDS
    "num_selected", "select_top", "ExampleStats", "init_example_stats", "update_example_stats",
    "reset_example_stats", "table_scores",
    # replay
    "ReplayBuffer", "init_buffer", "add_reservoir", "sample", "num_filled", "er_loss",
    "der_loss", "joint_ce",
    # metrics
    "average_accuracy", "learning_accuracy", "backward_transfer", "forgetting", "summarize",
    "summarize_run",
]



def __getattr__(name: str) -> object:
    """Deprecated names (kept for one release, with a DeprecationWarning)."""
    if name in ("sparse_init", "default_prunable"):
        from esacl_jax import masks as _masks
        return getattr(_masks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
