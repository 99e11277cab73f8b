"""Training-FLOPs accounting (RigL/SparCL convention, METHOD.md "Training FLOPs").

F is the dense forward cost of one example: the multiply-adds of every conv and dense layer,
counted as 2 FLOPs each (BatchNorm, activations, pooling and biases are ignored, as in RigL and
SparCL). Per example a training step costs three passes:

* forward:             F_s = sum_l density_w(l) * F_l
* activation gradient: F_s
* weight gradient:     F_g = sum_l density_g(l) * F_l   (density_g = density_w unless the
                       gradients are masked more sparsely, e.g. SparCL's DGM)

so a forward+backward on n examples costs n * (2 F_s + F_g) and a forward-only pass n * F_s.
Published dense figures (EWC 3F, ER 4F, DER++ 5F per current example) count each replay
minibatch as one extra forward per current example; see `method_step_cost`.

Layer shapes come from running the flax model abstractly (`jax.eval_shape`) under
`flax.linen.intercept_methods`, so the count follows the real module, never a hand table.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from esacl_jax import masks as masks_lib

PathLike = str | tuple[Any, ...]

# Replay-minibatch forwards per current example in SparCL's published accounting (the replay
# minibatch is as large as the current batch): EWC/finetune 3F, ER 4F, DER++ 5F.
REPLAY_FORWARDS: dict[str, int] = {"finetune": 0, "ewc": 0, "er": 1, "derpp": 2}


@dataclasses.dataclass(frozen=True)
class LayerFlops:
    """One conv/dense call: its kernel's param path ("a/b/kernel"), shapes, and dense FLOPs.

    ``output_shape`` excludes the batch dimension; ``flops`` is the dense forward cost of ONE
    example (2 * multiply-adds). A module called several times yields one entry per call.
    """

    path: str
    kind: str  # "conv" or "dense"
    kernel_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    flops: float


def path_to_str(path: PathLike) -> str:
    """Normalise a param path (``"a/b/kernel"``, ``("a", "b", "kernel")`` or a tuple of
    jax tree keys such as ``DictKey``) to the ``"a/b/kernel"`` form used as dict keys here."""
    if isinstance(path, str):
        return path.strip("/")
    return masks_lib.path_string(tuple(path))  # the library's one path formatter


def default_apply_kwargs(model: nn.Module) -> dict[str, Any]:
    """``train=False`` when the model's ``__call__`` takes a ``train`` argument."""
    try:
        params = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return {}
    return {"train": False} if "train" in params else {}


def abstract_variables(
    model: nn.Module,
    variables_or_params: Mapping[str, Any] | None,
    sample_input: Any,
    apply_kwargs: Mapping[str, Any],
) -> Mapping[str, Any]:
    """Variables for an abstract apply: given variables are used as they are; a bare params
    tree (no "params" key) gets the model's other collections (e.g. batch_stats) from an
    abstract init; None initialises everything abstractly (no FLOPs, no memory)."""
    if variables_or_params is not None and "params" in variables_or_params:
        return variables_or_params
    init = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, **apply_kwargs), sample_input
    )
    if variables_or_params is None:
        return init
    return {**init, "params": variables_or_params}


def layer_forward_flops(
    model: nn.Module,
    variables_or_params: Mapping[str, Any] | None,
    sample_input: Any,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> list[LayerFlops]:
    """Dense forward FLOPs per example of every ``nn.Conv``/``nn.Dense`` call of ``model``.

    Args:
      model: a flax linen module.
      variables_or_params: the variables dict (with "params"), a bare params tree, or None
        (shapes from an abstract init). Arrays or ``jax.ShapeDtypeStruct`` both work.
      sample_input: a batch (leading batch dimension) of inputs; only its shape matters.
      apply_kwargs: extra call arguments; default ``{"train": False}`` when accepted.

    Returns:
      One `LayerFlops` per conv/dense call, in call order. Conv FLOPs are
      ``2 * kh * kw * cin / groups * cout * Hout * Wout``, dense ``2 * in * out``.
    """
    kwargs = dict(default_apply_kwargs(model) if apply_kwargs is None else apply_kwargs)
    variables = abstract_variables(model, variables_or_params, sample_input, kwargs)
    records: list[LayerFlops] = []

    def interceptor(next_fun, args, kw, context):
        out = next_fun(*args, **kw)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, nn.Conv | nn.Dense):
            kernel = module.get_variable("params", "kernel")
            kernel_shape = tuple(int(d) for d in kernel.shape)
            out_shape = tuple(int(d) for d in out.shape[1:])
            # prod(kernel) = kh*kw*(cin/groups)*cout (or in*out); times output positions.
            positions = math.prod(out_shape[:-1])
            flops = 2.0 * math.prod(kernel_shape) * positions
            kind = "conv" if isinstance(module, nn.Conv) else "dense"
            path = "/".join((*module.path, "kernel"))
            records.append(LayerFlops(path, kind, kernel_shape, out_shape, flops))
        return out

    def run(v, x):
        with nn.intercept_methods(interceptor):
            return model.apply(v, x, **kwargs)

    jax.eval_shape(run, variables, sample_input)
    return records


def forward_flops(
    layers: list[LayerFlops], densities: Mapping[PathLike, float] | None = None
) -> float:
    """Forward FLOPs of one example: ``sum_l density(l) * F_l`` (missing layers: density 1).

    ``densities`` maps kernel paths (any form `path_to_str` accepts) to the fraction of nonzero
    weights (1 - sparsity), or of nonzero gradient entries for the weight-gradient pass.
    """
    dens = {path_to_str(k): float(v) for k, v in (densities or {}).items()}
    return float(sum(layer.flops * dens.get(layer.path, 1.0) for layer in layers))


def densities_from_masks(masks: Any) -> dict[str, float]:
    """Fraction of ones of every mask leaf, keyed by "a/b/kernel" (None leaves are skipped).

    Host-side (call outside jit): the result feeds `forward_flops`/`FlopsCounter`.
    """
    leaves = jax.tree_util.tree_flatten_with_path(masks)[0]
    return {path_to_str(p): float(np.mean(np.asarray(m) != 0)) for p, m in leaves}


def pass_flops(f_fwd: float, f_wgrad: float, n_examples: float, kind: str = "fwd_bwd") -> float:
    """FLOPs of one pass over ``n_examples``: "fwd" = n * F_s; "fwd_bwd" = n * (2 F_s + F_g)."""
    if kind == "fwd":
        return float(n_examples) * f_fwd
    if kind == "fwd_bwd":
        return float(n_examples) * (2.0 * f_fwd + f_wgrad)
    raise ValueError(f"kind must be 'fwd' or 'fwd_bwd', got {kind!r}")


def step_cost_per_example(
    f_fwd: float, f_wgrad: float | None = None, replay_forwards: float = 0.0
) -> float:
    """Cost per current example in the published convention: forward + activation gradient
    (F_s each) + weight gradient (F_g), plus ``replay_forwards`` forward passes (F_s each)
    standing for the replay minibatches (one per minibatch as large as the current batch)."""
    f_wgrad = f_fwd if f_wgrad is None else f_wgrad
    return 2.0 * f_fwd + f_wgrad + replay_forwards * f_fwd


def method_step_cost(method: str, f_fwd: float, f_wgrad: float | None = None) -> float:
    """Per-current-example cost of "finetune"/"ewc" (3F), "er" (4F) or "derpp" (5F), dense
    when ``f_wgrad`` is None and ``f_fwd`` = F, sparse with F_s/F_g (SparCL-EWC/ER/DER++)."""
    return step_cost_per_example(f_fwd, f_wgrad, REPLAY_FORWARDS[method])


def training_flops(
    per_example_step_cost: float,
    examples_per_epoch: float,
    epochs: float,
    tasks: int,
    data_fraction: float = 1.0,
) -> float:
    """Total training FLOPs: cost per example x examples used (data_fraction of each epoch's
    examples, e.g. 0.775 for SparCL's DDR) x epochs x tasks."""
    return per_example_step_cost * examples_per_epoch * data_fraction * epochs * tasks


class FlopsCounter:
    """Run-time FLOPs accumulator for the training loop (host side, plain Python floats).

    The loop tells it the current weight/gradient densities whenever masks change
    (`set_densities`) and, per step, how many examples each pass touched (`forward`,
    `forward_backward`); data selection is accounted for by passing the examples actually used.
    EsaCL's ascent pass, IDS sharpness forward and descent pass are each one call. A pass that
    runs through part of the layers only (CO2L: encoder and projection head, or the linear
    classifier alone) names their top-level modules (`modules=`).
    """

    def __init__(
        self,
        layers: list[LayerFlops],
        weight_densities: Mapping[PathLike, float] | None = None,
        grad_densities: Mapping[PathLike, float] | None = None,
    ) -> None:
        self.layers = list(layers)
        self.dense_forward = forward_flops(self.layers)
        self.total = 0.0
        self.f_fwd = self.dense_forward
        self.f_wgrad = self.dense_forward
        self.set_densities(weight_densities, grad_densities)

    def set_densities(
        self,
        weight_densities: Mapping[PathLike, float] | None = None,
        grad_densities: Mapping[PathLike, float] | None = None,
    ) -> None:
        """Update F_s (weights) and F_g (gradients; defaults to the weight densities)."""
        self.weight_densities = dict(weight_densities or {})
        self.grad_densities = dict(
            self.weight_densities if grad_densities is None else grad_densities
        )
        self.f_fwd = forward_flops(self.layers, self.weight_densities)
        self.f_wgrad = forward_flops(self.layers, self.grad_densities)

    def costs(self, modules: Iterable[str] | None = None) -> tuple[float, float]:
        """(F_s, F_g) per example of the layers under the top-level modules named (the first
        component of their kernel paths, e.g. "stem" or "projection_head"); None: all layers."""
        if modules is None:
            return self.f_fwd, self.f_wgrad
        names = set(modules)
        layers = [layer for layer in self.layers if layer.path.split("/", 1)[0] in names]
        return (forward_flops(layers, self.weight_densities),
                forward_flops(layers, self.grad_densities))

    def forward(self, n_examples: float, modules: Iterable[str] | None = None) -> float:
        """Count a forward-only pass over ``n_examples`` (through ``modules`` only, when
        given); returns the FLOPs added."""
        return self.add(pass_flops(*self.costs(modules), n_examples, "fwd"))

    def forward_backward(self, n_examples: float,
                         modules: Iterable[str] | None = None) -> float:
        """Count a forward + backward pass over ``n_examples`` (through ``modules`` only, when
        given); returns the FLOPs added."""
        return self.add(pass_flops(*self.costs(modules), n_examples, "fwd_bwd"))

    def add(self, flops: float) -> float:
        """Add raw FLOPs (e.g. a cost computed elsewhere); returns them."""
        self.total += float(flops)
        return float(flops)


__all__ = [
    "REPLAY_FORWARDS",
    "FlopsCounter",
    "LayerFlops",
    "abstract_variables",
    "default_apply_kwargs",
    "densities_from_masks",
    "forward_flops",
    "layer_forward_flops",
    "method_step_cost",
    "pass_flops",
    "path_to_str",
    "step_cost_per_example",
    "training_flops",
]
