"""A quantization scheme is data: which quantizer for weights, which for activations, which layers.

Presets (IAO, DoReFa, binary/ternary) are functions that return a :class:`QuantScheme`; the modules and
``prepare`` never branch on the preset. New quantizer families register a builder with
:func:`register_quantizer_family`. A scheme serialises to JSON, so a checkpoint rebuilds the exact
quantized model before loading its statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from micronet.compression.quantization.core import learned as _learned
from micronet.compression.quantization.core import lowbit as _lowbit
from micronet.compression.quantization.core.observers import build_observer
from micronet.compression.quantization.core.quantizers import AffineQuantizer, Quantizer
from micronet.errors import QuantizationError

QuantizerBuilder = Callable[["QuantizerSpec", "int | None", "int | None"], Quantizer]
_FAMILIES: dict[str, QuantizerBuilder] = {}


def register_quantizer_family(name: str, builder: QuantizerBuilder) -> None:
    """``builder(spec, ch_axis, num_channels)`` returns a :class:`Quantizer`."""
    _FAMILIES[name] = builder


@dataclass(frozen=True)
class QuantizerSpec:
    """How to quantize one kind of tensor (weights or activations)."""

    family: str = "affine"
    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False
    narrow_range: bool = False
    signed: bool | None = None  # None: unsigned while the observed data is non-negative
    observer: str = "minmax"
    observer_options: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # family-specific settings

    def build(self, ch_axis: int | None = None, num_channels: int | None = None) -> Quantizer:
        try:
            builder = _FAMILIES[self.family]
        except KeyError:
            raise QuantizationError(
                f"unknown quantizer family {self.family!r}: choose one of {', '.join(sorted(_FAMILIES))}"
            ) from None
        if not self.per_channel:
            ch_axis = num_channels = None
        return builder(self, ch_axis, num_channels)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuantizerSpec:
        return cls(**_known(cls, data, "quantizer spec"))


BN_FOLD_METHODS = {
    "one_conv": "weight folded with the running σ, batch statistics estimated from the rescaled output of "
                "that one quantized convolution (as torch.ao); one convolution per step",
    "batch": "weight folded with the batch σ_B from an extra float convolution (Jacob et al. 2018); two per step",
    "running": "weight folded with the running σ, output corrected by σ_R/σ_B from an extra float convolution "
               "(the original's bn_fuse_calib); two per step",
}


@dataclass(frozen=True)
class QuantScheme:
    """Everything ``prepare`` needs to know; stored in checkpoints as JSON."""

    name: str
    weight: QuantizerSpec
    activation: QuantizerSpec
    fold_bn: bool = False
    bn_fold_method: str = "one_conv"  # how QAT folds BN while training: see BN_FOLD_METHODS
    bn_stats_from_model: bool = True  # start BN-fold statistics from the trained BN (pretrained_model)
    quantize_pools: bool = True  # average pools: their output is a new value that needs its own range
    # Max pools only pick values, and max commutes with any monotone quantizer, so quantizing their input as
    # well as their consumer's would round twice and keep int8 runtimes from running the pool on codes.
    # Schemes written before this field existed quantized max pools with the other pools.
    quantize_max_pools: bool = False
    quantize_activations: tuple[str, ...] = ("LeakyReLU", "Sigmoid", "Hardswish")
    keep_first_float: bool = False
    keep_last_float: bool = False
    skip: tuple[str, ...] = ()
    quantize_joins: bool = True  # quantize the inputs of Add / Concat
    # Each Add input gets its own quantizer (integer adds rescale each input, as ONNX Runtime's QLinearAdd
    # and TFLite's ADD do): a ReLU'd shortcut keeps its unsigned range and is quantized exactly as its other
    # readers quantize it, so a runtime quantizes each tensor once. Concat inputs always share one quantizer
    # (the concatenated codes have one scale). Schemes written before this field shared one for Add too.
    shared_add_quantizer: bool = False
    # Activations (by float type name) between the first and the last weighted layer that are *replaced*
    # by a quantizer built from ``activation_replacement`` (e.g. ReLU → sign: a ReLU followed by a sign
    # would make every activation +1). None: activations stay as they are.
    activation_replacement: QuantizerSpec | None = None
    replaced_activations: tuple[str, ...] = ("ReLU", "ReLU6")
    # The deployment target the integer layout is chosen for (micronet.deploy.targets): the export's default.
    target: str = "portable"
    # The edges: the first and last weighted layers that keep_first_float / keep_last_float leave in float are
    # quantized with these specs instead when ``edge_weight`` is set (weights; the first layer's input, which
    # reads the image, and the average pools' inputs take ``edge_activation``). Low-bit presets use 8-bit
    # edges so that every conv of the network runs on integer kernels (see presets.edge_specs).
    edge_weight: QuantizerSpec | None = None
    edge_activation: QuantizerSpec | None = None

    def __post_init__(self) -> None:
        if self.bn_fold_method not in BN_FOLD_METHODS:
            raise QuantizationError(
                f"unknown BN fold method {self.bn_fold_method!r}: choose one of {', '.join(BN_FOLD_METHODS)}"
            )
        if (self.edge_weight is None) != (self.edge_activation is None):
            raise QuantizationError("edge_weight and edge_activation go together: set both (quantized edges) or "
                                    "neither (the edges follow keep_first_float / keep_last_float)")

    def with_skip(self, names: list[str] | tuple[str, ...]) -> QuantScheme:
        return replace(self, skip=tuple(dict.fromkeys((*self.skip, *names))))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["quantize_activations"] = list(self.quantize_activations)
        data["skip"] = list(self.skip)
        data["replaced_activations"] = list(self.replaced_activations)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuantScheme:
        data = dict(data) if isinstance(data, dict) else data
        if isinstance(data, dict) and "bn_fold_running" in data:  # schemes written before bn_fold_method
            data["bn_fold_method"] = "running" if data.pop("bn_fold_running") else "batch"
        data = _known(cls, data, "quantization scheme")
        data.setdefault("quantize_max_pools", data.get("quantize_pools", True))
        data.setdefault("shared_add_quantizer", True)
        data["weight"] = QuantizerSpec.from_json(data["weight"])
        data["activation"] = QuantizerSpec.from_json(data["activation"])
        data["quantize_activations"] = tuple(data.get("quantize_activations", ()))
        data["skip"] = tuple(data.get("skip", ()))
        for key in ("activation_replacement", "edge_weight", "edge_activation"):
            if data.get(key) is not None:
                data[key] = QuantizerSpec.from_json(data[key])
        if "replaced_activations" in data:
            data["replaced_activations"] = tuple(data["replaced_activations"])
        return cls(**data)


def _known(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise QuantizationError(f"a {what} must be a JSON object (got {type(data).__name__})")
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise QuantizationError(f"unknown {what} entries: {', '.join(sorted(unknown))}")
    return dict(data)


def _build_affine(spec: QuantizerSpec, ch_axis: int | None, num_channels: int | None) -> Quantizer:
    observer = build_observer(spec.observer, ch_axis, num_channels, **spec.observer_options)
    return AffineQuantizer(spec.bits, observer, symmetric=spec.symmetric, signed=spec.signed, narrow_range=spec.narrow_range)


register_quantizer_family("affine", _build_affine)
register_quantizer_family("lsq", lambda spec, ch_axis, num_channels: _learned.build_learned(spec, ch_axis, num_channels))
for _name, _builder in _lowbit.FAMILIES.items():
    register_quantizer_family(_name, _builder)
