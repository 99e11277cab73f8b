"""End-to-end tests of the continual loop and the experiment entry point, on real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from esacl_jax.harness.loop import TrainingError, train_and_evaluate
from experiments.configs import split_digits, split_mnist
from tests.conftest import REPO_ROOT


def digits_config(protocol_row: str = "finetune", **overrides):
    config = split_digits.get_config(protocol_row)
    config.progress = False
    config.tensorboard = False
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture(scope="module")
def finetune_result(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finetune")
    return train_and_evaluate(digits_config(), workdir, progress=False), workdir


def test_finetune_forgets_but_learns_each_task(finetune_result):
    result, workdir = finetune_result
    saved = json.loads((workdir / "results.json").read_text())
    class_il = np.asarray(saved["class_il_matrix"])
    task_il = np.asarray(saved["task_il_matrix"])
    assert class_il.shape == task_il.shape == (5, 5)
    # The process's memory after each task is recorded (growth across tasks would show).
    rss = [entry["host_rss_bytes"] for entry in saved["per_task"]]
    assert len(rss) == 5 and all(100 * 2**20 < r < 8 * 2**30 for r in rss)
    # Each task is learned when it is trained (the diagonal) ...
    assert np.diag(task_il).min() > 0.9
    # ... and class-IL collapses to roughly the last task: catastrophic forgetting.
    assert saved["metrics"]["class_il"]["average_accuracy"] < 0.4
    acc = {k: saved["metrics"][k]["average_accuracy"] for k in ("class_il", "task_il")}
    assert acc["task_il"] > acc["class_il"] + 0.2
    assert class_il[-1, -1] > 0.9 and class_il[-1, 0] < 0.2
    for key in ("config", "seed", "environment", "train_time_per_task_s", "metrics"):
        assert key in saved
    assert saved["environment"]["git_commit"]


def test_joint_is_the_upper_bound(tmp_path, finetune_result):
    result = train_and_evaluate(digits_config("joint"), tmp_path, progress=False)
    assert result["metrics"]["class_il"]["average_accuracy"] > 0.85
    finetune_acc = finetune_result[0]["metrics"]["class_il"]["average_accuracy"]
    assert result["metrics"]["class_il"]["average_accuracy"] > finetune_acc + 0.4


def test_same_seed_gives_identical_matrices(tmp_path, finetune_result):
    again = train_and_evaluate(digits_config(), tmp_path / "again", progress=False)
    np.testing.assert_array_equal(np.asarray(again["class_il_matrix"]),
                                  np.asarray(finetune_result[0]["class_il_matrix"]))
    np.testing.assert_array_equal(np.asarray(again["task_il_matrix"]),
                                  np.asarray(finetune_result[0]["task_il_matrix"]))
    other = train_and_evaluate(digits_config(seed=1), tmp_path / "other", progress=False)
    assert not np.array_equal(np.asarray(other["task_il_matrix"]),
                              np.asarray(finetune_result[0]["task_il_matrix"]))


@pytest.mark.parametrize("overrides, message", [
    (dict(batch_size=0), "batch_size"),
    (dict(epochs=0), "epochs"),
    (dict(method="nope"), "unknown method"),
    (dict(benchmark="nope"), "unknown benchmark"),
    (dict(learning_rate=-1.0), "learning_rate"),
])
def test_impossible_values_are_rejected_before_any_output(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(digits_config(**overrides), tmp_path, progress=False)
    assert not (tmp_path / "results.json").exists()


def test_nan_loss_stops_the_run_without_results(tmp_path):
    with pytest.raises(TrainingError, match="NaN"):
        train_and_evaluate(digits_config(learning_rate=1e30), tmp_path, progress=False)
    assert not (tmp_path / "results.json").exists()


def run_main(args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "experiments.main", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_cli_prints_summary_and_writes_results(tmp_path):
    proc = run_main(["--config=experiments/configs/split_digits.py", f"--workdir={tmp_path}",
                     "--config.epochs=1", "--config.progress=False"])
    assert proc.returncode == 0, proc.stderr
    assert "class_il" in proc.stdout and "task_il" in proc.stdout
    assert (tmp_path / "results.json").exists()


def test_cli_bad_value_is_one_line_error(tmp_path):
    proc = run_main(["--config=experiments/configs/split_digits.py", f"--workdir={tmp_path}",
                     "--config.batch_size=-3"])
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "batch_size" in lines[0]
    assert not (tmp_path / "results.json").exists()


def test_cli_missing_data_is_one_line_error_and_fast(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_main(["--config=experiments/configs/split_mnist.py", f"--workdir={tmp_path / 'w'}"],
                    env={"ESACL_DATA_DIR": str(empty)}, timeout=60)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "mnist" in lines[0].lower()
    assert not (tmp_path / "w" / "results.json").exists()


def test_split_mnist_slice_learns_on_real_data(tmp_path, shared_data_dir):
    config = split_mnist.get_config("finetune")
    config.data_dir = str(shared_data_dir)
    config.max_train_per_task = 2000
    config.progress = False
    config.tensorboard = False
    result = train_and_evaluate(config, tmp_path, progress=False)
    task_il = np.asarray(result["task_il_matrix"])
    assert np.diag(task_il).min() > 0.9
    assert result["metrics"]["class_il"]["average_accuracy"] < 0.5


def test_cifar_pipeline_end_to_end_on_cifar_format_files(tmp_path):
    """No CIFAR exists on these machines: run the real loader (packed python archive), the in-jit
    crop/flip augmentation, the BatchNorm ResNet-18 and EsaCL on small CIFAR-format files."""
    from experiments.configs import split_cifar10
    from tests.test_data import write_cifar

    write_cifar(tmp_path / "data", "cifar10", packed=True)
    config = split_cifar10.get_config("esacl")
    config.data_dir = str(tmp_path / "data")
    config.verify_checksums = False
    config.resnet_nf = 4
    config.num_tasks, config.epochs = 2, 1
    config.batch_size = config.replay_batch_size = 8
    config.progress = config.tensorboard = config.checkpoint = False
    result = train_and_evaluate(config, tmp_path / "run", progress=False)
    assert result["benchmark"]["name"] == "split_cifar10"
    assert np.all(np.isfinite(np.asarray(result["class_il_matrix"])))
    sparsity = result["per_task"][-1]["sparsity"]
    assert sparsity["prunable_sparsity"] == pytest.approx(0.9, abs=1e-3)
    # The default set: every kernel but the classifier (16 block convs, the stem, 3 shortcuts).
    assert len(sparsity["layers"]) == 16 + 1 + 3
    assert result["dense_forward_flops_per_example"] > 0


def test_prunable_sets_of_the_harness_models():
    """Default: every kernel but the classifier's, the library's "all_but_output" set, equal to
    "every kernel not named classifier" on every harness model; "by_layer_name": SparCL's set
    (ResNet-18: its 16 block convs; MLP and CNN: "all_but_input_and_output"). The deprecated
    prune_scope values give the same sets with one warning; anything else is one line."""
    import logging

    import jax

    from esacl_jax import masks
    from esacl_jax.harness.methods.base import prunable_set
    from esacl_jax.harness.models import build_model

    def not_classifier(path, leaf):
        names = masks.path_names(path)
        return names[-1] == "kernel" and np.ndim(leaf) >= 2 and "classifier" not in names

    config = split_digits.get_config("esacl")
    assert prunable_set(config) == "all_but_output"
    mlp = build_model("mlp", 10).init(jax.random.key(0), np.zeros((1, 784)))["params"]
    flags = masks.prunable_tree(mlp, prunable_set(config))
    assert flags["stem"]["kernel"] and flags["hidden_1"]["kernel"]
    assert not flags["classifier"]["kernel"] and not flags["stem"]["bias"]
    config.prunable = "by_layer_name"
    flags = masks.prunable_tree(mlp, prunable_set(config))
    assert not flags["stem"]["kernel"] and flags["hidden_1"]["kernel"]

    # Shapes are all the sets need: abstract init (no compilation of the networks).
    cnn = jax.eval_shape(build_model("cnn", 10).init, jax.random.key(0), np.zeros((1, 28, 28, 1)))
    res = jax.eval_shape(lambda k, x: build_model("resnet18", 10).init(k, x, train=False),
                         jax.random.key(0), np.zeros((1, 32, 32, 3)))
    for params in (mlp, cnn["params"], res["params"]):
        assert masks.prunable_tree(params) == masks.prunable_tree(params, not_classifier)
        assert masks.prunable_tree(params) == masks.prunable_tree(params, "all_but_output")
    for params in (mlp, cnn["params"]):  # SparCL's set by names = the first layer dense too
        assert masks.prunable_tree(params, "all_but_input_and_output") == masks.prunable_tree(
            params, "by_layer_name")
    chosen = jax.tree.leaves(masks.prunable_tree(res["params"], "by_layer_name"))
    assert sum(chosen) == 16

    config = split_digits.get_config("esacl")
    for old, new in (("all_but_classifier", "all_but_output"), ("sparcl", "by_layer_name")):
        config.prune_scope = old
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("esacl_jax").addHandler(handler)
        try:
            assert prunable_set(config) == new
        finally:
            logging.getLogger("esacl_jax").removeHandler(handler)
        assert len(records) == 1 and f"prunable={new!r}" in records[0].getMessage()
    config.prune_scope, config.prunable = "sparcl", "all_but_input_and_output"
    with pytest.raises(ValueError, match="contradicts"):
        prunable_set(config)
    config.prune_scope, config.prunable = "model", "all_but_output"
    with pytest.raises(ValueError, match="prune_scope is deprecated"):
        prunable_set(config)
    config.prune_scope, config.prunable = "", "sparcl"
    with pytest.raises(ValueError, match="prunable must be one of"):
        prunable_set(config)


def test_stored_prune_scope_is_the_same_computation_as_prunable():
    from esacl_jax.harness.config_diff import config_differences, plain_config

    planned = plain_config(split_digits.get_config("esacl"))
    stored = {**planned, "prune_scope": "all_but_classifier"}
    del stored["prunable"]
    assert config_differences(planned, stored) == []
    planned_sparcl = {**planned, "prunable": "by_layer_name"}
    assert config_differences(planned_sparcl, {**stored, "prune_scope": "sparcl"}) == []
    assert config_differences(planned_sparcl, stored) != []


def test_over_parameterized_protocols_name_their_dataset():
    from esacl_jax.harness.config import get_config
    from esacl_jax.harness.reporting import benchmark_of

    c = get_config("split_fashion_mnist_w400_e5", "esacl")
    assert (c.protocol, c.benchmark, tuple(c.mlp_widths)) == (
        "split_fashion_mnist_w400_e5", "split_fashion_mnist", (400, 400))
    assert (c.epochs, c.batch_size, c.replay_batch_size) == (5, 32, 32)
    assert 0 < c.esacl.mask_update_every_epochs < c.epochs  # SDP's schedule fires
    assert get_config("split_mnist_w1000", "derpp").mlp_widths == (1000, 1000)
    # The one validation-tuned row: the sparse methods at lr 0.1 on split_fashion_mnist_w400.
    lrs = {m: get_config("split_fashion_mnist_w400", m).learning_rate
           for m in ("derpp", "esacl", "sparcl_derpp")}
    assert lrs == {"derpp": 0.03, "esacl": 0.1, "sparcl_derpp": 0.1}
    assert get_config("split_mnist_w400", "esacl").learning_rate == 0.03
    # Reports group runs by protocol, so wide and narrow runs never share a row.
    assert benchmark_of({"config": c.to_dict(), "benchmark": {"name": "split_fashion_mnist"}}) == (
        "split_fashion_mnist_w400_e5")
    with pytest.raises(ValueError, match="did you mean"):
        get_config("split_mnist_w40", "esacl")


def test_epoch_shuffle_is_jax_permutation_compiled_once_per_size_bucket():
    """Bit for bit jax.random.permutation (results unchanged), with one compilation for tasks of
    different sizes in the same power-of-two bucket (a compilation per task before)."""
    import jax

    from esacl_jax.harness import loop

    key = jax.random.key(7)
    for n in (1, 2, 5, 999, 11263, 12665, 16384, 16385):
        np.testing.assert_array_equal(loop.permutation(key, n),
                                      np.asarray(jax.random.permutation(key, n)))
    # The loop's per-task and per-epoch keys, folded in inside the compiled shuffle.
    folded = jax.random.fold_in(jax.random.fold_in(key, 1_000_003 + 2), 4)
    np.testing.assert_array_equal(loop.permutation(key, 12089, folds=(1_000_003 + 2, 4)),
                                  np.asarray(jax.random.permutation(folded, 12089)))
    loop._padded_permutation.clear_cache()
    for n in (11263, 12089, 12665):  # split_mnist's task sizes: one 16384 bucket
        loop.permutation(jax.random.key(n), n, folds=(n, 0))
    assert loop._padded_permutation.cache_size() == 1


def test_cheaply_compiled_init_is_bit_identical_to_the_default_compilation():
    """`compilation.call_once` (XLA backend optimisation level 0 on CPU) gives the same train
    state, bit for bit, as the plain jit call the loop made before, for a dense and a sparse
    method with a replay buffer and per-example statistics."""
    import jax

    from esacl_jax.harness import compilation, loop
    from experiments.configs.split_digits import get_config

    for method_name in ("derpp", "esacl"):
        config = get_config(method_name)
        _, method = loop.build_config_method(config)
        key = jax.random.key(3)
        cheap = compilation.call_once(method.init, key)
        plain = jax.jit(method.init)(key)
        assert compilation.one_shot_options() == {"xla_backend_optimization_level": 0}
        for a, b in zip(jax.tree.leaves(cheap), jax.tree.leaves(plain), strict=True):
            if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
