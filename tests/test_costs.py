"""Cost accounting (`esacl_jax.harness.methods.costs`) and the loop's run record: fast checks."""

import jax.numpy as jnp
import numpy as np

from esacl_jax.harness import flops as flops_lib
from esacl_jax.harness.loop import RunRecord
from esacl_jax.harness.methods import Method, costs


class _Counter:
    def __init__(self):
        self.calls = []

    def forward(self, n, layers):
        self.calls.append(("fwd", n, layers))

    def forward_backward(self, n, layers):
        self.calls.append(("fwd_bwd", n, layers))


def test_count_passes_scales_each_pass_by_the_repeats():
    counter = _Counter()
    costs.count_passes(counter, [costs.Pass("fwd_bwd", 10), costs.Pass("fwd", 4, ("head",))], 3)
    assert counter.calls == [("fwd_bwd", 30, None), ("fwd", 12, ("head",))]


def test_weight_counts_cover_every_parameter():
    counts = costs.weight_counts({"a": jnp.array([0.0, 1.0, 2.0]), "b": jnp.zeros((1,))})
    assert counts == {"total": 4, "nonzero": 2, "sparsity": 0.5}


def test_methods_have_the_cost_hooks():
    assert issubclass(Method, costs.CostHooks)
    assert Method.step_passes is costs.CostHooks.step_passes


def test_run_record_snapshot_restores_what_it_saved():
    record = RunRecord.empty(2, flops_lib.FlopsCounter([]))
    record.class_il[0] = [0.5, np.nan]
    record.task_il[0] = [0.75, np.nan]
    record.train_times.append(1.0)
    record.eval_times.append(0.5)
    record.per_task.append({"task": 0})
    record.flops_per_task.append(7.0)
    record.counter.total = 7.0
    done = record.snapshot(1, None, start=0.0)
    again = RunRecord.empty(2, flops_lib.FlopsCounter([]))
    assert again.restore(done) == (1, None)
    np.testing.assert_array_equal(again.class_il, record.class_il)
    np.testing.assert_array_equal(again.task_il, record.task_il)
    assert (again.train_times, again.per_task, again.counter.total) == ([1.0], [{"task": 0}], 7.0)
    assert again.earlier_wall_time == done["wall_time_s"]
