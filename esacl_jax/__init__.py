"""esacl_jax: efficient continual learning of sparse models (EsaCL) in JAX and optax.

The optimizer pieces compose with any optax optimizer:

    tx = esacl_jax.keep_sparse(optax.chain(
        esacl_jax.sdp_transform(sparsity=0.9, rho=0.05), optax.sgd(0.03)))
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)

`sdp_transform` goes first in the chain: it perturbs the active weights (SAM), evaluates
`grad_fn` at w + eps, keeps the SDP masks and score averages in its state and masks the
gradient. `keep_sparse` wraps the chain so pruned weights are exactly zero after every
`optax.apply_updates`, whatever optimizer follows (momentum, Adam, AdamW's weight decay).

The top level holds the composing API (EsaCL's optimizer and step, the SDP transform and its
state, the sparse file format); the families are namespaces, as in optax:

- `esacl_jax.masks`: prunable sets, sparsity distributions, masks, scores, prune and regrow;
- `esacl_jax.ids`: intelligent data selection and the per-example score table;
- `esacl_jax.replay`: the reservoir buffer and the replay losses;
- `esacl_jax.metrics`: everything computed from the accuracy matrices;
- `esacl_jax.sharpness`: SAM's perturbation and per-example sharpness;
- `esacl_jax.sdp`, `esacl_jax.esacl`, `esacl_jax.export`: the modules of the top-level names.

The names that were at the top level before (e.g. `esacl_jax.keep_top`, `esacl_jax.sample`)
still resolve for one release, with a DeprecationWarning naming the new spelling.

This package is the optimizer library and needs only jax, optax and numpy. The continual-learning
harness (loop, methods, models, data, accounting, reporting) is `esacl_jax.harness`, installed
with the `harness` extra: `pip install "esacl_jax[harness]"`.
"""

from esacl_jax import _deprecation, ids, masks, metrics, replay, sharpness
from esacl_jax._defaults import ESACL_DEFAULTS
from esacl_jax.esacl import (
    EsaCLGradients,
    esacl_gradients,
    esacl_optimizer,
    sparse_start,
)
from esacl_jax.export import SparseFileError, load_sparse, save_dense, save_sparse
from esacl_jax.ids import init_example_stats
from esacl_jax.masks import sparsity_summary
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
)

__version__ = "0.1.0"

__all__ = [
    # EsaCL in one call: SDP + IDS + replay (the harness's step)
    "esacl_optimizer", "esacl_gradients", "EsaCLGradients", "sparse_start", "init_example_stats",
    "ESACL_DEFAULTS",
    # SDP: the optax transform and its state
    "sdp_transform", "keep_sparse", "SDPState", "refresh_masks", "find_sdp_state",
    "replace_sdp_state", "sam_radius", "perturbed_params", "accumulate_grad_fn", "STATIC_ARGS",
    "sparsity_summary",
    # export: a compact file of a sparse model
    "save_sparse", "save_dense", "load_sparse", "SparseFileError",
    # the families
    "masks", "ids", "replay", "metrics", "sharpness",
]

# Names that were at the top level before, for one release: (new home, advice).
_MOVED = {
    **{name: (f"esacl_jax.{module}:{name}", "")
       for module, names in {
           "ids": ("ExampleStats", "num_selected", "reset_example_stats", "table_scores",
                   "update_example_stats"),
           "masks": ("apply_masks", "layer_sparsities", "magnitude_masks", "name_prunable",
                     "prunable_tree", "prune_and_regrow", "sdp_scores", "structural_prunable"),
           "metrics": ("average_accuracy", "backward_transfer", "forgetting",
                       "learning_accuracy", "summarize_run"),
           "replay": ("ReplayBuffer", "add_reservoir", "der_loss", "er_loss", "init_buffer",
                      "joint_ce", "num_filled", "sample"),
           "sharpness": ("add_perturbation", "masked_global_norm", "per_example_sharpness",
                         "sam_perturbation"),
       }.items() for name in names if name not in __all__},
    "DEFAULTS": ("esacl_jax._defaults:ESACL_DEFAULTS", "use esacl_jax.ESACL_DEFAULTS"),
    "update_masks": ("esacl_jax.sdp:mask_update", "use esacl_jax.sdp.mask_update"),
    "keep_top": ("esacl_jax.masks:top_mask", "use esacl_jax.masks.top_mask"),
    "select_top": ("esacl_jax.ids:select_examples", "use esacl_jax.ids.select_examples"),
    "summarize": ("esacl_jax.metrics:summarize_matrix",
                  "use esacl_jax.metrics.summarize_matrix"),
    "sparse_init": ("esacl_jax.masks:masked_start",
                    "start sparse with esacl_jax.sparse_start(params, opt_state) (or "
                    "esacl_jax.masks.masked_start(params, masks))"),
    "default_prunable": ("esacl_jax.masks:name_prunable",
                         'it was never the default set: use esacl_jax.masks.name_prunable '
                         '(prunable="by_layer_name"), or prunable=None for the default set'),
}
__getattr__ = _deprecation.forwarding_getattr(__name__, _MOVED)
