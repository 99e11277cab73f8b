"""Every registered method as a group of five seeds (`--config.seeds=0,1,2,3,4`): each seed ends
where its separate run ends. On CPU that is usually the same bits; where XLA's batched kernels
round a five-seed program differently in the last bits, training amplifies them (a mask's or a
buffer's discrete choices), and the test asks the seed's accuracy matrices to stay within two test
examples per entry of its separate run's (the statistical comparison at scale, paired by seed
with standard errors: docs/speed/seed_group.md)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from esacl_jax.harness.loop import load_config_benchmark, train_and_evaluate
from esacl_jax.harness.methods import METHODS
from tests.test_seed_group import DERPP, assert_same_run, config_for, final_states

SEEDS = (0, 1, 2, 3, 4)
ALL_METHODS = sorted(METHODS)
# EsaCL, SparCL and SparCL-DER++ (mask work on the host, seed by seed) on the arrays the seeds
# share; the others on per-seed subsets (the task arrays stacked by seed; DER++ in several
# chunks an epoch).
SHARED = ("esacl", "sparcl", "sparcl_derpp")
CASES = {m: {"max_train_per_task": 120} for m in METHODS if m not in SHARED} | {"derpp": DERPP}


def assert_same_or_last_bits(group: dict, separate: dict, mine, one, test_sizes) -> str:
    """`group` (one seed of a group) against `separate`: "bits" when equal to the bit, else
    "last bits" after checking the nearness the module docstring states."""
    try:
        assert_same_run(group, separate)
        for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(one), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        return "bits"
    except AssertionError:
        pass
    two_examples = 2.0 / np.asarray(test_sizes, float)[None, :]
    for key in ("class_il_matrix", "task_il_matrix"):
        diff = np.abs(np.asarray(group[key], float) - np.asarray(separate[key], float))
        assert np.all(np.nan_to_num(diff) <= two_examples + 1e-12), (key, diff)
    for key in ("seed", "training_flops", "weights", "method", "benchmark"):
        assert group[key] == separate[key], key
    del mine, one
    return "last bits"


@pytest.mark.parametrize("method", ALL_METHODS)
def test_each_seed_of_a_five_seed_group_is_its_separate_run(tmp_path, method):
    """One seed of the group (a different position of the seed axis for each method, so the
    methods together cover all five) against its separate run."""
    compared = SEEDS[ALL_METHODS.index(method) % len(SEEDS)]
    overrides = CASES.get(method, {})
    states: dict = {}
    group = train_and_evaluate(config_for(method, seeds=",".join(map(str, SEEDS)), **overrides),
                               tmp_path / "group", on_task_end=final_states(states, "group"))
    separate = train_and_evaluate(config_for(method, seed=compared, **overrides),
                                  tmp_path / "separate", on_task_end=final_states(states, "one"))
    assert group["seeds"] == list(SEEDS)
    written = json.loads((tmp_path / "group" / f"seed{compared}" / "results.json").read_text())
    assert written["seed"] == compared and written["seed_group"] == list(SEEDS)
    assert all((tmp_path / "group" / f"seed{s}" / "results.json").is_file() for s in SEEDS)
    assert not (tmp_path / "group" / "results.json").exists()
    position = SEEDS.index(compared)
    mine = jax.tree.map(lambda x: x[position], states["group"].params)
    benchmark = load_config_benchmark(config_for(method, seed=compared, **overrides))
    test_sizes = [task.y_test.shape[0] for task in benchmark.tasks]
    assert_same_or_last_bits(group["runs"][position], separate, mine, states["one"].params,
                             test_sizes)
    # The seeds trained differently (the seed axis is not one seed copied).
    assert not all(np.array_equal(np.asarray(x[0]), np.asarray(x[1]))
                   for x in jax.tree.leaves(states["group"].params))
