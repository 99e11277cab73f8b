"""The harness's config schema, the benchmark protocols and the per-method protocol rows.

`base_config()` is the schema (every field with its default). `get_config(benchmark, method)`
applies a benchmark's protocol (`BENCHMARK_PROTOCOLS`) and that method's row of the benchmark's
method table (`MNIST_METHODS`, `CIFAR_METHODS`; values from docs/PROTOCOLS.md). The files in
`experiments/configs/` are one-line wrappers of `get_config`, so
`--config=experiments/configs/split_mnist.py:esacl` picks the method's row and any field is then
overridable as `--config.field=value`.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from esacl_jax import ESACL_DEFAULTS

# Fields that do not change what a run computes (where the data live, progress output, logging,
# whether the state is checkpointed, whether file checksums are verified). A stored run or a
# checkpoint that differs from a config only in these still counts as the same computation.
NON_COMPUTATIONAL_FIELDS = frozenset(
    {"data_dir", "progress", "tensorboard", "checkpoint", "checkpoint_every_steps",
     "verify_checksums",
     # How the processes of a multi-host run find each other (process_id differs between the
     # processes of one run, which compare the config with each other's checkpoints).
     "distributed", "coordinator_address", "num_processes", "process_id",
     # Whether a seed trained in a group (`harness.seed_group`): its result is its separate
     # run's (a group's checkpoint checks its seeds itself).
     "seeds"})

# Every sparse method's default target sparsity (esacl.sparsity, sparcl.sparsity,
# prune_retrain.sparsity) on every protocol: the paper's headline 0.9, the library's default.
# One value, so that a table of default runs compares the methods at the same sparsity.
DEFAULT_SPARSITY: float = ESACL_DEFAULTS["sparsity"]

# How every sparse method (esacl, the sparcl variants, prune_retrain) sets its first sparse
# weights: "magnitude" keeps the kept weights as they are (plain magnitude pruning: the paper's
# and SparCL's start), "rescaled" rescales each unit's kept weights to its dense incoming norm
# (`esacl_jax.masks.masked_start(rescale=True)`).
SPARSE_STARTS = ("magnitude", "rescaled")


def base_config() -> ml_collections.ConfigDict:
    """Every field of a run's config with its default (`get_config` then applies a protocol row).

    Returns:
      The config: the run's own fields, then one section per method family.
    """
    c = ml_collections.ConfigDict()
    _run_fields(c)
    c.esacl = _esacl_section()
    c.ewc = _ewc_section()
    c.sparcl = _sparcl_section()
    c.co2l = _co2l_section()
    c.prune_retrain = _prune_retrain_section()
    _device_and_output_fields(c)
    return c


def _run_fields(c: ml_collections.ConfigDict) -> None:
    """Data, model, optimisation and replay: the fields every method reads."""
    # data
    c.protocol = ""  # the protocol row (BENCHMARK_PROTOCOLS key) get_config built it from
    c.benchmark = "split_digits"  # the dataset benchmark (esacl_jax.harness.data.BENCHMARKS)
    c.data_dir = ""  # empty: $ESACL_DATA_DIR, else the download cache (docs/harness.md)
    c.seed = 0
    # "0,1,2,3,4": train these seeds of one config together as one vmapped program, each seed's
    # results in WORKDIR/seed<N>/ as its separate run would write them (`harness.seed_group`);
    # empty: the single `seed` above.
    c.seeds = ""
    c.class_order_seed = -1  # -1: classes go to tasks in label order
    c.num_tasks = 0  # 0: the protocol's number of tasks
    c.max_train_per_task = 0  # 0: all (a positive value takes a seeded subset, for quick runs)
    c.max_test_per_task = 0
    c.validation_fraction = 0.0  # > 0: evaluate on a held-out part of train (for tuning)
    c.verify_checksums = True  # False only for files that are not the official ones (tests)
    # model
    c.model = "mlp"
    c.mlp_widths = (100, 100)
    c.mlp_init = "xavier_uniform"  # or "lecun_normal" (flax's default); biases start at zero
    c.resnet_nf = 64
    c.dtype = "float32"
    # Which weights sparse methods prune, in the library's vocabulary (`masks.PRUNABLE_SETS`):
    # "all_but_output" (every kernel but the output layers, found structurally: the library's
    # default), "all_but_input_and_output" (the input layer dense too) or "by_layer_name"
    # (SparCL's set by layer names: on the ResNet-18 its 16 block convolutions).
    c.prunable = "all_but_output"
    # Deprecated spelling of `prunable` ("all_but_classifier" -> "all_but_output", "sparcl" ->
    # "by_layer_name"): read with one warning line; "" (default) leaves `prunable` in charge.
    c.prune_scope = ""
    # The sparse methods' start, one of SPARSE_STARTS: "magnitude" (default) or "rescaled". EsaCL
    # and every SparCL variant apply it at initialisation; prune_retrain when it prunes (the
    # kept weights of each task-end pruning). `sparse_start_of` reads it.
    c.sparse_start = "magnitude"
    # method and optimisation
    c.method = "finetune"
    c.optimizer = "sgd"
    c.learning_rate = 0.03
    c.momentum = 0.0
    c.weight_decay = 0.0
    c.reset_optimizer_per_task = False
    c.epochs = 1
    c.batch_size = 10
    c.eval_batch_size = 1000
    c.steps_per_call = 250  # steps per compiled lax.scan call (progress-bar granularity)
    c.current_task_logit_mask = False  # SparCL's use_cl_mask for the current-task CE
    # replay (er, derpp, esacl, sparcl_er, sparcl_derpp)
    c.buffer_size = 500
    c.replay_batch_size = 10
    c.der_alpha = 1.0  # logit (MSE) replay weight
    c.der_beta = 0.5  # label (CE) replay weight


def _esacl_section() -> ml_collections.ConfigDict:
    """EsaCL's knobs (METHOD.md defaults)."""
    # EsaCL (METHOD.md defaults)
    return ml_collections.ConfigDict(dict(
        # Published defaults, chosen by the ablation on a validation split
        # (docs/hidden_layer_sparsity/ablation.md, against the reference step B with plain
        # magnitude-pruned init). The values below that esacl_jax.ESACL_DEFAULTS names come from
        # it (one source for the library and the harness; tests/test_esacl_lib.py checks it).
        sparsity=DEFAULT_SPARSITY, distribution=ESACL_DEFAULTS["distribution"],
        rho=ESACL_DEFAULTS["rho"], gamma=ESACL_DEFAULTS["gamma"],
        step_variant="C",  # A: clean pass on current+replay; B: current only; C: score table
        ids_score=ESACL_DEFAULTS["ids_score"],  # sharpness | perturbed_loss | clean_loss | random
        # C: where an example with no recorded score ranks: "mean" (of the recorded scores) or
        # "first" (every example is scored once before any is ranked).
        ids_unseen=ESACL_DEFAULTS["ids_unseen"],
        replay="derpp",  # derpp | er | none
        replay_at="perturbed",  # B, C: replay gradient at w + eps (METHOD.md) or at the clean w
        # masks also update at every task start
        mask_update_every_epochs=ESACL_DEFAULTS["mask_update_every_epochs"],
        # Deprecated alias of the top-level `sparse_start` (True: "rescaled", False:
        # "magnitude"), read with one warning line; unset (None) leaves `sparse_start` in charge.
        init_rescale=config_dict.placeholder(bool),
        mask_update_every_steps=0,  # > 0: also every k optimizer steps, inside sdp_transform
        prune_fraction=ESACL_DEFAULTS["prune_fraction"], score=ESACL_DEFAULTS["score"],
        score_lambda=ESACL_DEFAULTS["score_lambda"], ema_decay=ESACL_DEFAULTS["ema_decay"],
        regrow=ESACL_DEFAULTS["regrow"],
        sdp=True,  # sdp=False: magnitude masks fixed at init (ablation)
        # Dense-to-sparse: start at initial_sparsity and prune along SDP scores to `sparsity` on
        # a cubic schedule over the first prune_end_fraction of the first task, every
        # prune_every_steps steps; SAM keeps training sharpness-aware, no retraining phase.
        dense_to_sparse=False, initial_sparsity=0.0, prune_end_fraction=1.0,
        prune_every_steps=50,
    ))


def _ewc_section() -> ml_collections.ConfigDict:
    """Online EWC's knobs."""
    # online EWC (ewc, sparcl_ewc): penalty ewc_lambda * sum(F * (w - w*)^2), F <- gamma F + new
    return ml_collections.ConfigDict(dict(
        ewc_lambda=90.0, gamma=1.0,
        fisher_batch_size=32,  # examples per vmapped per-example-gradient chunk
        fisher_prob_weight=False,  # True: weight each squared gradient by p(y|x) (mammoth)
    ))


def _sparcl_section() -> ml_collections.ConfigDict:
    """SparCL's knobs (TDM, DGM, DDR)."""
    # SparCL (sparcl with base below; sparcl_ewc / sparcl_er / sparcl_derpp fix the base)
    return ml_collections.ConfigDict(dict(
        sparsity=DEFAULT_SPARSITY, distribution="uniform",
        base="derpp",  # ewc | er | derpp (co2l: sparcl_co2l)
        # TDM: updates at epochs 0, tdm_every, ... before the freeze epoch
        # F = floor(tdm_freeze_fraction * epochs + 0.5) (45 of 50): prune to s + tdm_extra, regrow
        # at random to s; at F: prune to s, no regrowth, mask fixed for the rest of the task.
        # 1-epoch tasks: F = 1, so one prune-and-regrow at epoch 0 of every task (set
        # tdm_freeze_fraction=0 for a freeze at epoch 0 instead: no regrowth at all).
        tdm=True, tdm_every=5, tdm_extra=0.01, tdm_freeze_fraction=0.9, score_lambda=0.5,
        # DGM: keep the top dgm_keep of |grad| per prunable layer, refreshed at each epoch's first
        # step and every dgm_every steps after it.
        dgm=True, dgm_keep=0.2, dgm_every=30,
        # DDR: at epochs ddr_epochs of a ddr_reference_epochs-epoch task, scaled to
        # max(1, floor(e * epochs / ddr_reference_epochs + 0.5)) (coinciding events add up, events
        # at or past the last epoch are dropped: never with 1-epoch tasks), drop ddr_fraction of
        # the task's examples with the fewest forgetting events.
        ddr=True, ddr_epochs=(5, 10, 15, 20), ddr_reference_epochs=50, ddr_fraction=0.075,
    ))


def _co2l_section() -> ml_collections.ConfigDict:
    """CO2L's knobs."""
    # CO2L (co2l, sparcl_co2l): the official code's defaults (github.com/chaht01/Co2L, main.py,
    # run.sh, main_linear_buffer.py; CIFAR-10). The MNIST-family rows override the augmentation
    # and the temperature (METHOD.md "CO2L").
    return ml_collections.ConfigDict(dict(
        temperature=0.5,  # SupCon temperature (run.sh --temp 0.5)
        base_temperature=0.07,  # SupConLoss's default: the loss is scaled by temperature / this
        current_temp=0.2, past_temp=0.01,  # IRD temperatures (main.py defaults, run.sh)
        distill_power=1.0,  # IRD weight (main.py default)
        head_dim=128,  # projection output (SupConResNet feat_dim)
        head_hidden=0,  # projection hidden width; 0: the encoder's width (the official 'mlp' head)
        # two views: RandomResizedCrop(scale=(crop_scale_min, 1)), horizontal flip, brightness and
        # contrast jitter of this strength with probability 0.8 (0: off)
        crop_scale_min=0.2, flip=True, jitter=0.4,
        # linear classifier at every task end (main_linear_buffer.py, run.sh --learning_rate 1):
        # class-balanced draws from the task's data + the buffer's earlier tasks, SGD momentum,
        # lr x linear_decay_rate after each of linear_decay_epochs
        linear_epochs=100, linear_lr=1.0, linear_momentum=0.9, linear_batch_size=256,
        linear_decay_epochs=(60, 75, 90), linear_decay_rate=0.2,
        linear_augment=False,  # True: augmented views every epoch (official; ~epochs x costlier)
        # SparCL-CO2L: prune the projection head too under prunable="all_but_output"
        prune_head=True,
        # SparCL-CO2L's DDR: correctness by the nearest class mean of the projections, the class
        # means an exponential moving average of each step's batch means with this decay
        ncm_momentum=0.9,
    ))


def _prune_retrain_section() -> ml_collections.ConfigDict:
    """Magnitude prune-then-retrain's knobs."""
    # magnitude prune-then-retrain: dense base training, per-task magnitude pruning to sparsity
    # and retrain_epochs of masked retraining on the task's data (mask refreshed every task)
    return ml_collections.ConfigDict(dict(
        sparsity=DEFAULT_SPARSITY, distribution="uniform", retrain_epochs=1,
        base="derpp",  # finetune | ewc | er | derpp
    ))


def _device_and_output_fields(c: ml_collections.ConfigDict) -> None:
    """Devices, hosts, checkpoints and output."""
    # devices: 0 = data-parallel over every visible device (batch split along a "data" mesh axis)
    c.num_devices = 0
    # several hosts (docs/harness.md): True runs this process as one of several, joined by
    # jax.distributed.initialize before any other JAX call; the devices of all processes form one
    # data-parallel mesh (num_devices must be 0). Unset values below are left to JAX:
    # $JAX_COORDINATOR_ADDRESS, then auto-detection on Cloud TPU, SLURM and Open MPI.
    c.distributed = False
    c.coordinator_address = ""  # "host:port" of process 0's coordinator ("": from the environment)
    c.num_processes = 0  # 0: from the environment
    c.process_id = -1  # -1: from the environment
    # resumable runs: save the train state with orbax after every task, resume from workdir
    c.checkpoint = False
    # with checkpoint: also every this many optimizer steps, at the end of the compiled chunk
    # that reaches it (0: at task ends only). 2000 steps are about 6 epochs of a Split CIFAR-10
    # task (312 steps an epoch at batch 32, 15,600 in its 50 epochs): about 8 saves a task, and
    # an interruption loses at most 2000 steps, minutes at the tens of milliseconds a ResNet-18
    # step takes on a GPU. Does not change the result (resumption is exact).
    c.checkpoint_every_steps = 2000
    # output
    c.progress = True
    c.tensorboard = True

# Per-method rows shared by the MNIST-family protocols (PROTOCOLS.md, "Split MNIST").
MNIST_METHODS = {
    "finetune": dict(learning_rate=0.03),
    "joint": dict(learning_rate=0.03),
    "ewc": dict(learning_rate=0.03, ewc=dict(ewc_lambda=90.0, gamma=1.0)),
    "er": dict(learning_rate=0.1, buffer_size=500, replay_batch_size=10),
    "derpp": dict(learning_rate=0.03, buffer_size=500, replay_batch_size=10, der_alpha=1.0,
                  der_beta=0.5),
    # EsaCL starts from the benchmark's DER++ settings (its own knobs: base_config's esacl).
    "esacl": dict(learning_rate=0.03, buffer_size=500, replay_batch_size=10, der_alpha=1.0,
                  der_beta=0.5),
    "sparcl": dict(learning_rate=0.03, buffer_size=500, replay_batch_size=10, der_alpha=1.0,
                   der_beta=0.5),
    # SparCL variants: the dense base's protocol row. SparCL's official use_cl_mask (masking the
    # current-task logits) is kept only for SparCL-EWC, which has no buffer and needs it; it costs
    # every replay method class-IL, so it is off for all of them (METHOD.md "Choices we made").
    "sparcl_ewc": dict(learning_rate=0.03, buffer_size=0, current_task_logit_mask=True,
                       ewc=dict(ewc_lambda=90.0, gamma=1.0), sparcl=dict(base="ewc")),
    "sparcl_er": dict(learning_rate=0.1, buffer_size=500, replay_batch_size=10,
                      sparcl=dict(base="er")),
    "sparcl_derpp": dict(learning_rate=0.03, buffer_size=500, replay_batch_size=10,
                         der_alpha=1.0, der_beta=0.5, sparcl=dict(base="derpp")),
    "prune_retrain": dict(learning_rate=0.03, buffer_size=500, replay_batch_size=10,
                          der_alpha=1.0, der_beta=0.5),
    # CO2L on 28x28 grey digits: the official MNIST augmentation (main_domain.py:
    # RandomResizedCrop(28, scale=(0.7, 1)), no flip, no colour jitter) and temperature
    # (run_domain.sh --temp 0.1); the learning rates (SparCL-CO2L's, at sparsity 0.9, larger as
    # SparCL-DER++'s on Fashion-MNIST) and the linear classifier's chosen on the validation
    # split (METHOD.md "CO2L").
    "co2l": dict(learning_rate=0.03, buffer_size=500, replay_batch_size=10,
                 co2l=dict(temperature=0.1, crop_scale_min=0.7, flip=False, jitter=0.0,
                           linear_lr=0.01)),
    "sparcl_co2l": dict(learning_rate=0.1, buffer_size=500, replay_batch_size=10,
                        co2l=dict(temperature=0.1, crop_scale_min=0.7, flip=False, jitter=0.0,
                                  linear_lr=0.01),
                        sparcl=dict(base="co2l")),
}

CIFAR_METHODS = {
    "finetune": dict(learning_rate=0.1),
    "joint": dict(learning_rate=0.1),
    "ewc": dict(learning_rate=0.03, ewc=dict(ewc_lambda=10.0, gamma=1.0)),
    "er": dict(learning_rate=0.1, buffer_size=500, replay_batch_size=32),
    "derpp": dict(learning_rate=0.03, buffer_size=500, replay_batch_size=32, der_alpha=0.2,
                  der_beta=0.5),
    # rho 0.05, gamma 0.5: SAM's usual radius and METHOD.md's gamma; untuned here (no CIFAR
    # data on these machines).
    "esacl": dict(learning_rate=0.03, buffer_size=500, replay_batch_size=32, der_alpha=0.2,
                  der_beta=0.5, esacl=dict(rho=0.05, gamma=0.5)),
    # SparCL-DER++ official script: lr 0.03, alpha 0.1, beta 0.5 (METHOD.md).
    "sparcl": dict(learning_rate=0.03, buffer_size=500, replay_batch_size=32, der_alpha=0.1,
                   der_beta=0.5),
    # The official script's lr 0.03 for every SparCL variant (buffer minibatch = batch 32).
    "sparcl_ewc": dict(learning_rate=0.03, buffer_size=0, current_task_logit_mask=True,
                       ewc=dict(ewc_lambda=10.0, gamma=1.0), sparcl=dict(base="ewc")),
    "sparcl_er": dict(learning_rate=0.03, buffer_size=500, replay_batch_size=32,
                      sparcl=dict(base="er")),
    "sparcl_derpp": dict(learning_rate=0.03, buffer_size=500, replay_batch_size=32,
                         der_alpha=0.1, der_beta=0.5, sparcl=dict(base="derpp")),
    "prune_retrain": dict(learning_rate=0.03, buffer_size=500, replay_batch_size=32,
                          der_alpha=0.2, der_beta=0.5),
    # CO2L: the official CIFAR-10 augmentation and temperatures (base_config's co2l), SGD with
    # the official momentum 0.9; lr 0.5 at batch 512 scaled linearly to batch 32. Untuned (no
    # CIFAR data here).
    "co2l": dict(learning_rate=0.03, momentum=0.9, buffer_size=500, replay_batch_size=32),
    "sparcl_co2l": dict(learning_rate=0.03, momentum=0.9, buffer_size=500, replay_batch_size=32,
                        sparcl=dict(base="co2l")),
}


# The MNIST method rows for protocols whose replay minibatch is the protocol's own (the rows'
# replay_batch_size of 10 would override it).
_REPLAY_BATCH_FROM_PROTOCOL = {name: {k: v for k, v in row.items() if k != "replay_batch_size"}
                               for name, row in MNIST_METHODS.items()}

# split_fashion_mnist_w400: the sparse methods at lr 0.1, chosen on the validation split: the
# 90%-sparse 400-400 MLP learns each Fashion-MNIST task better with the larger step, while DER++
# is best at the protocol's 0.03 and split_mnist_w400 gains nothing from it (the paired
# differences: docs/RESULTS.md).
_FASHION_W400_METHODS = {
    **MNIST_METHODS,
    **{name: dict(MNIST_METHODS[name], learning_rate=0.1)
       for name in ("esacl", "sparcl", "sparcl_derpp")},
}

# split_fashion_mnist_cnn_e5: CO2L at lr 0.1, chosen on the validation split (METHOD.md
# "CO2L"); SparCL-CO2L at its MLP rows' 0.1 (untuned here). EWC (and SparCL-EWC) at a smaller
# ewc_lambda: the MLP rows' makes the CNN's loss NaN (the conv kernels' Fisher, summed over
# positions, is large); the value and the measurements that chose it: docs/PROTOCOLS.md.
_CNN_E5_METHODS = {
    **_REPLAY_BATCH_FROM_PROTOCOL,
    **{name: dict(_REPLAY_BATCH_FROM_PROTOCOL[name], learning_rate=0.1)
       for name in ("co2l", "sparcl_co2l")},
    **{name: dict(_REPLAY_BATCH_FROM_PROTOCOL[name], ewc=dict(ewc_lambda=3.0, gamma=1.0))
       for name in ("ewc", "sparcl_ewc")},
}

# Benchmark -> (protocol values, method table). Names and sizes: docs/PROTOCOLS.md.
_MLP_1_EPOCH = dict(model="mlp", mlp_widths=(100, 100), epochs=1, batch_size=10)
_RESNET = dict(model="resnet18", resnet_nf=64, batch_size=32, eval_batch_size=500,
               steps_per_call=100, checkpoint=True)
BENCHMARK_PROTOCOLS: dict[str, tuple[dict, dict]] = {
    # The offline default (`make run`): scikit-learn's bundled 8x8 digits, runs in seconds.
    "split_digits": (dict(model="mlp", mlp_widths=(100, 100), epochs=5, batch_size=10,
                          eval_batch_size=500, steps_per_call=50,
                          esacl=dict(mask_update_every_epochs=2)), MNIST_METHODS),
    "split_mnist": (_MLP_1_EPOCH, MNIST_METHODS),
    "split_fashion_mnist": (_MLP_1_EPOCH, MNIST_METHODS),
    # Batch 128 for current and replay examples alike.
    "permuted_mnist": (dict(model="mlp", mlp_widths=(100, 100), epochs=1, batch_size=128,
                            replay_batch_size=128),
                       _REPLAY_BATCH_FROM_PROTOCOL),
    # Our over-parameterized protocols (docs/PROTOCOLS.md): the same tasks with wider MLPs,
    # where a sparse network has room to spare. 1 epoch, batch 10: the DER protocol.
    **{f"{bench}_w{width}": (dict(_MLP_1_EPOCH, benchmark=bench, mlp_widths=(width, width)),
                             _FASHION_W400_METHODS
                             if (bench, width) == ("split_fashion_mnist", 400) else MNIST_METHODS)
       for bench in ("split_mnist", "split_fashion_mnist") for width in (400, 1000)},
    # Multi-epoch: 5 epochs a task, batch 32 (replay minibatch 32), so that IDS's score table has
    # earlier epochs to rank by and SDP's between-epoch mask updates fire (every 2 epochs).
    **{f"{bench}_w400_e5": (dict(model="mlp", benchmark=bench, mlp_widths=(400, 400), epochs=5,
                                 batch_size=32, replay_batch_size=32,
                                 esacl=dict(mask_update_every_epochs=2)),
                            _REPLAY_BATCH_FROM_PROTOCOL)
       for bench in ("split_mnist", "split_fashion_mnist")},
    # Multi-epoch convolutional protocol sized for a CPU (ours): the SmallCNN at width
    # resnet_nf=16 (conv features 8 and 16, hidden 32; nf=64 is the full SmallCNN), 5 epochs of
    # batch 32 (replay minibatch 32) on a seeded stratified 4000-example subset of each task.
    "split_fashion_mnist_cnn_e5": (
        dict(model="cnn", benchmark="split_fashion_mnist", resnet_nf=16, epochs=5,
             batch_size=32, replay_batch_size=32, max_train_per_task=4000, steps_per_call=125,
             esacl=dict(mask_update_every_epochs=2)),
        _CNN_E5_METHODS),
    "split_cifar10": (dict(_RESNET, epochs=50), CIFAR_METHODS),
    "split_cifar100": (dict(_RESNET, epochs=50), CIFAR_METHODS),
    "split_tiny_imagenet": (dict(_RESNET, epochs=100), CIFAR_METHODS),
}


def _stored_init_rescale(config: Mapping | ml_collections.ConfigDict) -> Any:
    """``esacl.init_rescale`` of a config or its plain dict (None where absent)."""
    esacl = config.get("esacl")
    return esacl.get("init_rescale") if isinstance(esacl, (Mapping,
                                                           ml_collections.ConfigDict)) else None


def sparse_start_of(config: Mapping | ml_collections.ConfigDict, warn: bool = False) -> str:
    """The sparse start a config asks for (`SPARSE_STARTS`), the deprecated alias applied.

    A config from before `sparse_start` existed (a stored results.json) has EsaCL's
    ``esacl.init_rescale`` (default True) as EsaCL's start, and "magnitude" for every other
    method. Otherwise ``esacl.init_rescale``, when set on an EsaCL run, maps to the start.

    Args:
      config: a ConfigDict or its plain dict (``results.json["config"]``).
      warn: log the deprecation of ``esacl.init_rescale`` (one line) when it is set.

    Returns:
      "magnitude" or "rescaled".

    Raises:
      ValueError: a value not in `SPARSE_STARTS`, or ``esacl.init_rescale=False`` together with
        ``sparse_start="rescaled"``.
    """
    is_esacl = config.get("method") == "esacl"
    alias = _stored_init_rescale(config)
    if "sparse_start" not in config:  # stored before the field: init_rescale was EsaCL's own
        return "rescaled" if is_esacl and alias in (True, None) else "magnitude"
    start = config.get("sparse_start")
    if start not in SPARSE_STARTS:
        raise ValueError(f"sparse_start must be one of {', '.join(SPARSE_STARTS)}, got "
                         f"{start!r}{_closest(str(start), list(SPARSE_STARTS))}")
    if alias is None or not is_esacl:
        return start
    if alias is False and start == "rescaled":
        raise ValueError("esacl.init_rescale=False contradicts sparse_start='rescaled': drop "
                         "esacl.init_rescale (deprecated) and set sparse_start alone")
    new = "rescaled" if alias else "magnitude"
    if warn:
        logging.getLogger("esacl_jax").warning(
            "config.esacl.init_rescale=%r is deprecated: use config.sparse_start=%r", alias, new)
    return new


def closest_name(name: str, known: list[str]) -> str | None:
    """The known name closest to a misspelt one (difflib), or None."""
    match = difflib.get_close_matches(name, known, n=1)
    return match[0] if match else None


def _closest(name: str, known: list[str]) -> str:
    match = closest_name(name, known)
    return f" (did you mean {match!r}?)" if match else ""


def get_config(benchmark: str, method: str = "finetune") -> ml_collections.ConfigDict:
    """`base_config()` + the benchmark's protocol + the method's protocol row."""
    if benchmark not in BENCHMARK_PROTOCOLS:
        known = sorted(BENCHMARK_PROTOCOLS)
        raise ValueError(f"unknown benchmark {benchmark!r}{_closest(benchmark, known)}; "
                         f"known: {', '.join(known)}")
    protocol, methods = BENCHMARK_PROTOCOLS[benchmark]
    method = method or "finetune"
    if method not in methods:
        raise ValueError(f"no protocol row for method {method!r}{_closest(method, list(methods))}"
                         f"; known: {', '.join(methods)}")
    c = base_config()
    c.protocol = benchmark
    for source in (dict(dict(benchmark=benchmark), **protocol), methods[method]):
        for key, value in source.items():
            if isinstance(value, dict):
                c[key].update(value)
            else:
                c[key] = value
    c.method = method
    return c


make_config = get_config
