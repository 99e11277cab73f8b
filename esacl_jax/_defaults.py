"""Every default of the library, written once: the signatures of `sdp_transform`,
`esacl_optimizer`, `esacl_gradients`, `sparse_start` and the mask functions read them from here,
and the harness's config (section `esacl`) reads `ESACL_DEFAULTS` (a test checks they agree)."""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

# EsaCL's published defaults (step variant C, i.e. `table=` given, is the harness's): why these
# values, docs/METHOD.md "Choices we made" and docs/RESULTS.md (the validation ablation).
# init_rescale=False: the sparse start is plain magnitude pruning, the start of every sparse
# method in the harness (config.sparse_start) and SparCL's; True rescales each unit's kept
# weights to its dense norm (docs/RESULTS.md measures both starts).
# (Read-only: a program that changed them would change every later default silently.)
ESACL_DEFAULTS: Mapping[str, Any] = types.MappingProxyType(dict(
    sparsity=0.9, rho=0.01, gamma=0.25, ids_score="sharpness", ids_unseen="mean",
    distribution="uniform", score="magnitude_gradient", score_lambda=0.5, ema_decay=0.9,
    prune_fraction=0.01, regrow="gradient", init_rescale=False, mask_update_every_epochs=5,
))

# The transform's options that are not EsaCL's choices but conventions of the API.
SDP_OPTION_DEFAULTS: Mapping[str, Any] = types.MappingProxyType(dict(
    mask_update_every_steps=0, seed=0, perturbation="global", perturbation_dtype="float32",
))
