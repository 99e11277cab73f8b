"""One sparse start and one default sparsity for every sparse method (issue 27).

`config.sparse_start` ("magnitude" or "rescaled") is read by EsaCL, every SparCL variant and
prune_retrain; `esacl.init_rescale` is its deprecated alias. Every sparse method defaults to the
same sparsity on every protocol.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from esacl_jax.harness import methods
from esacl_jax.harness.config import (
    BENCHMARK_PROTOCOLS,
    DEFAULT_SPARSITY,
    get_config,
    sparse_start_of,
)
from esacl_jax.harness.config_diff import config_differences, plain_config
from esacl_jax.harness.loop import build_config_method, load_config_benchmark, validate_config
from esacl_jax.harness.methods.base import Method

SPARSE_METHODS = [name for name in methods.METHODS if methods.sparsity_key(name)]
LAYER = "hidden_1"  # a prunable hidden layer of split_digits' MLP


def _field(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def test_every_sparse_method_defaults_to_one_sparsity_on_every_protocol():
    assert {"esacl", "sparcl_derpp", "prune_retrain"} <= set(SPARSE_METHODS)
    defaults = {}
    for protocol, (_, rows) in BENCHMARK_PROTOCOLS.items():
        for method in SPARSE_METHODS:
            if method in rows:
                defaults[(protocol, method)] = _field(get_config(protocol, method),
                                                      methods.sparsity_key(method))
    assert set(defaults.values()) == {DEFAULT_SPARSITY} == {0.9}, defaults


def _config(method: str, start: str | None = None, **esacl):
    config = get_config("split_digits", method)
    config.progress, config.tensorboard = False, False
    if start is not None:
        config.sparse_start = start
    config.esacl.update(esacl)
    return config


def _dense_and_start(method_name: str, config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dense kernel, kernel after the method's sparse start, its mask) of `LAYER`."""
    benchmark = load_config_benchmark(config)
    _, method = build_config_method(config, benchmark)
    key = jax.random.key(0)
    dense_state = Method.init(method, key)
    if method_name == "prune_retrain":  # its start is its first pruning, after dense training
        state = method.prune(dense_state)
        mask = state.method_state.masks[LAYER]["kernel"]
    else:
        state = method.init(key)
        if method_name == "esacl":
            from esacl_jax import sdp

            mask = sdp.find_sdp_state(state.opt_state).masks[LAYER]["kernel"]
        else:
            mask = state.method_state.masks[LAYER]["kernel"]
    return (np.asarray(dense_state.params[LAYER]["kernel"]),
            np.asarray(state.params[LAYER]["kernel"]), np.asarray(mask))


@pytest.mark.parametrize("method_name", ["esacl", "sparcl_derpp", "prune_retrain"])
def test_each_sparse_method_reads_the_one_start(method_name):
    dense, plain, mask = _dense_and_start(method_name, _config(method_name))
    assert mask.mean() == pytest.approx(1 - DEFAULT_SPARSITY, abs=0.01)
    # magnitude (the default): the kept weights are the dense ones, the others exactly 0
    np.testing.assert_array_equal(plain, np.where(mask, dense, 0.0))
    # rescaled: the same mask, each unit's kept weights scaled to the unit's dense norm
    dense2, rescaled, mask2 = _dense_and_start(method_name, _config(method_name, "rescaled"))
    np.testing.assert_array_equal(mask2, mask)
    np.testing.assert_array_equal(dense2, dense)
    assert np.all(rescaled[~mask] == 0.0)
    alive = mask.any(0)
    np.testing.assert_allclose((rescaled**2).sum(0)[alive], (dense**2).sum(0)[alive], rtol=1e-5)
    assert np.all((plain**2).sum(0)[alive] < (rescaled**2).sum(0)[alive])


def test_init_rescale_is_a_deprecated_alias(caplog):
    config = _config("esacl", init_rescale=True)
    with caplog.at_level("WARNING"):
        validate_config(config)
    lines = [r.getMessage() for r in caplog.records if "init_rescale" in r.getMessage()]
    assert lines == ["config.esacl.init_rescale=True is deprecated: use "
                     "config.sparse_start='rescaled'"]
    assert sparse_start_of(config) == "rescaled"
    assert sparse_start_of(_config("esacl", init_rescale=False)) == "magnitude"
    # the esacl section is EsaCL's: another method's start is its own field's
    assert sparse_start_of(_config("sparcl_derpp", init_rescale=True)) == "magnitude"


def test_conflicting_and_misspelt_starts_are_refused():
    with pytest.raises(ValueError, match=r"^esacl.init_rescale=False contradicts "
                       r"sparse_start='rescaled': drop esacl.init_rescale"):
        validate_config(_config("esacl", "rescaled", init_rescale=False))
    with pytest.raises(ValueError, match=r"^sparse_start must be one of magnitude, rescaled, got "
                       r"'rescale' \(did you mean 'rescaled'\?\)$"):
        validate_config(_config("sparcl_derpp", "rescale"))


def test_stored_configs_from_before_sparse_start_compare_as_the_start_they_ran():
    """A results.json written before `sparse_start`: EsaCL ran esacl.init_rescale (default True),
    every other method the magnitude start."""
    for method in ("esacl", "sparcl_derpp"):
        planned = plain_config(_config(method))
        old = {k: v for k, v in planned.items() if k != "sparse_start"}
        for init_rescale in (True, False):
            stored = {**old, "esacl": {**old["esacl"], "init_rescale": init_rescale}}
            ran = "rescaled" if method == "esacl" and init_rescale else "magnitude"
            assert sparse_start_of(stored) == ran
            same = plain_config(_config(method, ran))
            assert config_differences(same, stored) == []
            if ran == "rescaled":
                assert config_differences(planned, stored) == [
                    "sparse_start: 'rescaled' -> 'magnitude'"]
