"""The integer-arithmetic-only (IAO) preset, with the original micronet's API.

``prepare(model, a_bits=8, w_bits=8, q_type=0, q_level=0, ...)`` keeps the original keyword meanings and
returns a model prepared by the shared mechanism (:mod:`micronet.compression.quantization.core`):

* ``q_type``: 0 symmetric, 1 asymmetric (weights and activations);
* ``q_level``: 0 per-channel weights, 1 one scale per layer;
* ``weight_observer``: 0 min/max of the current weights, 1 moving average of weight extremes;
* ``bn_fuse``: fold Conv2d→BatchNorm2d into :class:`QuantBNFuseConv2d`; ``bn_fuse_calib``: fold with running
  statistics while training (the whitepaper's correction); ``pretrained_model``: start the folded BN
  statistics from the model's BN instead of the first batch;
* ``ptq``: activation ranges from a percentile observer (``percentile``), for :func:`calibrate`;
* ``qaft``: freeze every scale and zero point (quantization-aware fine-tuning after QAT or PTQ).

Differences from the original, on purpose: rounding is half-to-even (as ONNX and torch.ao), symmetric
activations map their maximum to 127 (not 127.5), ranges always contain 0, observers never update in eval
mode, and ``q_type`` is honoured in PTQ too (the original forced symmetric).
"""

from __future__ import annotations

from torch import nn

from micronet.base_module.op import Add, Concat  # noqa: F401 - re-exported for the original's imports
from micronet.compression.quantization.core import bn_fold as _bn_fold
from micronet.compression.quantization.core import modules as _core
from micronet.compression.quantization.core.presets import use_stored_weights
from micronet.compression.quantization.core.scheme import QuantizerSpec, QuantScheme
from micronet.compression.quantization.core.workflow import calibrate, freeze
from micronet.compression.quantization.core.workflow import prepare as _prepare
from micronet.deploy.targets import DEFAULT_TARGET, get_target
from micronet.errors import QuantizationError


def _check_flags(q_type: int, q_level: int, weight_observer: int, percentile: float, learned_scale: bool,
                 signed_activations: bool) -> None:
    for flag, value in (("q_type", q_type), ("q_level", q_level), ("weight_observer", weight_observer)):
        if value not in (0, 1):
            raise QuantizationError(f"{flag} must be 0 or 1 (got {value})")
    if not 0 < percentile <= 1:
        raise QuantizationError(f"percentile must be in (0, 1] (got {percentile})")
    if learned_scale and q_type != 0:
        raise QuantizationError("learned scales (--lsq) need symmetric quantization: use q_type 0")
    if signed_activations and q_type != 0:
        raise QuantizationError("signed_activations needs symmetric quantization: use q_type 0")


WEIGHT_RANGES = ("minmax", "mse")


def _weight_observer(weight_observer: int, weight_range: str | None, ptq: bool, learned_scale: bool) -> str:
    """The weight observer's kind: ``weight_range`` "mse" searches each weight tensor's (per-channel: each
    row's) clipping range for the least squared rounding error, once, after training; "minmax" takes the
    extremes. None: minmax."""
    if weight_range is None:
        weight_range = "minmax"
    if weight_range not in WEIGHT_RANGES:
        raise QuantizationError(f"weight_range must be one of {', '.join(WEIGHT_RANGES)} (got {weight_range!r})")
    if weight_range == "mse":
        if not ptq or learned_scale or weight_observer != 0:
            raise QuantizationError("weight_range 'mse' searches the range of trained weights once: use it with "
                                    "post-training quantization (--ptq), min/max weight observer and no --lsq")
        return "mse"
    return "minmax" if weight_observer == 0 else "moving_average"


def iao_scheme(
    a_bits: int = 8,
    w_bits: int | None = None,
    q_type: int = 0,
    q_level: int = 0,
    weight_observer: int = 0,
    bn_fuse: bool = False,
    bn_fuse_calib: bool = False,
    pretrained_model: bool = False,
    ptq: bool = False,
    percentile: float = 0.9999,
    activation_observer: str | None = None,
    bn_fold_method: str | None = None,
    learned_scale: bool = False,
    signed_activations: bool = False,
    target: str = DEFAULT_TARGET,
    weight_range: str | None = None,
) -> QuantScheme:
    """The :class:`QuantScheme` the original's flags describe, for the deployment ``target``.

    ``target`` (:mod:`micronet.deploy.targets`): ``portable`` (default) quantizes weights to 7 bits (±63),
    which ONNX Runtime's u8s8 kernels sum exactly on every x86 CPU; ``vnni`` to 8 bits (exact on VNNI/AMX
    CPUs only); ``tensorrt`` to 8 bits with signed activations. ``w_bits`` (None: the target's) overrides
    the weight bits; 8-bit weights with the portable target are exported as uint8 (exact, slower kernels).

    ``bn_fold_method`` (see :data:`~micronet.compression.quantization.core.scheme.BN_FOLD_METHODS`) defaults
    to ``"running"`` with ``bn_fuse_calib`` and to the one-convolution fold otherwise (the original folded
    with exact batch statistics at the cost of a second convolution: ``bn_fold_method="batch"``).
    ``learned_scale``: train the scales (LSQ, :mod:`~micronet.compression.quantization.core.learned`),
    initialised from min/max for weights and from the least-squares histogram range for activations.
    ``signed_activations``: int8 codes with zero point 0 for every activation, also after a ReLU (TensorRT
    accepts only symmetric signed int8; the default picks unsigned codes for non-negative tensors)."""
    deployment = get_target(target)
    w_bits = deployment.weight_bits if w_bits is None else w_bits
    signed_activations = signed_activations or deployment.activation_dtype == "int8"
    _check_flags(q_type, q_level, weight_observer, percentile, learned_scale, signed_activations)
    symmetric = q_type == 0
    family = "lsq" if learned_scale else "affine"
    weight_kind = _weight_observer(weight_observer, weight_range, ptq, learned_scale)
    weight = QuantizerSpec(
        family=family,
        bits=w_bits,
        symmetric=symmetric,
        per_channel=q_level == 0,
        narrow_range=symmetric,
        signed=True if symmetric else None,
        observer=weight_kind,
        observer_options={"running": False} if weight_kind == "minmax" else {},
    )
    observer = activation_observer or ("percentile" if ptq else "histogram" if learned_scale else "moving_average")
    activation = QuantizerSpec(
        family=family,
        bits=a_bits,
        symmetric=symmetric,
        signed=True if signed_activations else None,
        observer=observer,
        observer_options={"percentile": percentile} if observer == "percentile" else {},
    )
    method = bn_fold_method or ("running" if bn_fuse_calib else "one_conv")
    fold = ({"one_conv": "bn-fold", "batch": "bn-fold-batch", "running": "bn-fold-running"}.get(method, method)
            if bn_fuse else None)
    tags = (fold, "lsq" if learned_scale else None, "signed" if signed_activations else None, "ptq" if ptq else None,
            target if target != DEFAULT_TARGET else None)
    parts = [f"iao-w{w_bits}a{a_bits}", "sym" if symmetric else "asym", "per-channel" if q_level == 0 else "per-layer"]
    return QuantScheme(
        name="-".join(parts + [tag for tag in tags if tag]),
        weight=weight,
        activation=activation,
        fold_bn=bn_fuse,
        bn_fold_method=method,
        bn_stats_from_model=pretrained_model or ptq,
        target=target,
    )


def prepare(
    model: nn.Module,
    inplace: bool = False,
    a_bits: int = 8,
    w_bits: int | None = None,
    q_type: int = 0,
    q_level: int = 0,
    weight_observer: int = 0,
    bn_fuse: bool = False,
    bn_fuse_calib: bool = False,
    quant_inference: bool = False,
    pretrained_model: bool = False,
    qaft: bool = False,
    ptq: bool = False,
    percentile: float = 0.9999,
    skip: tuple[str, ...] = (),
    signed_activations: bool = False,
    target: str = DEFAULT_TARGET,
) -> nn.Module:
    """Prepare ``model`` with the IAO preset (the original's signature).

    ``quant_inference=True`` does what the original's did: every layer uses its weight as stored, without
    the weight quantizer (inputs are still quantized) — for weights that are already quantized, e.g. those of
    :func:`~micronet.compression.quantization.core.convert`. The switch is saved with the model.
    ``w_bits=None``: the ``target``'s (7 for ``portable``, see :func:`iao_scheme`)."""
    scheme = iao_scheme(a_bits, w_bits, q_type, q_level, weight_observer, bn_fuse, bn_fuse_calib, pretrained_model, ptq, percentile,
                        signed_activations=signed_activations, target=target)
    prepared = _prepare(model, scheme, inplace=inplace, skip=skip)
    if quant_inference:
        use_stored_weights(prepared)
    return freeze(prepared) if qaft else prepared


def _with_iao_options(core_class: type) -> type:
    """A subclass of ``core_class`` whose constructor takes the original's keyword arguments."""

    def __init__(self, *args, a_bits=8, w_bits=None, q_type=0, q_level=0, weight_observer=0, qaft=False, ptq=False,
                 percentile=0.9999, quant_inference=False, bn_fuse_calib=False, pretrained_model=False, **kwargs):
        scheme = iao_scheme(a_bits, w_bits, q_type, q_level, weight_observer, bn_fuse=True, bn_fuse_calib=bn_fuse_calib,
                            pretrained_model=pretrained_model, ptq=ptq, percentile=percentile)
        core_class.__init__(self, *args, scheme=scheme, **kwargs)
        if quant_inference:
            use_stored_weights(self)
        if qaft:
            for quantizer in self.quantizers().values():
                quantizer.set_mode(2)

    return type(core_class.__name__, (core_class,), {"__init__": __init__, "__module__": __name__,
                                                      "__doc__": f"{core_class.__name__} with the IAO preset's keyword arguments."})


QuantConv1d = _with_iao_options(_core.QuantConv1d)
QuantConv2d = _with_iao_options(_core.QuantConv2d)
QuantConvTranspose2d = _with_iao_options(_core.QuantConvTranspose2d)
QuantLinear = _with_iao_options(_core.QuantLinear)
QuantMaxPool2d = _with_iao_options(_core.QuantMaxPool2d)
QuantAvgPool2d = _with_iao_options(_core.QuantAvgPool2d)
QuantAdaptiveAvgPool2d = _with_iao_options(_core.QuantAdaptiveAvgPool2d)
QuantReLU = _with_iao_options(_core.QuantReLU)
QuantReLU6 = _with_iao_options(_core.QuantReLU6)
QuantLeakyReLU = _with_iao_options(_core.QuantLeakyReLU)
QuantSigmoid = _with_iao_options(_core.QuantSigmoid)
QuantHardswish = _with_iao_options(_core.QuantHardswish)
QuantAdd = _with_iao_options(_core.QuantAdd)
QuantConcat = _with_iao_options(_core.QuantConcat)


QuantBNFuseConv2d = _with_iao_options(_bn_fold.QuantBNFuseConv2d)

__all__ = [
    "Add", "Concat", "QuantAdaptiveAvgPool2d", "QuantAdd", "QuantAvgPool2d", "QuantBNFuseConv2d", "QuantConcat",
    "QuantConv1d", "QuantConv2d",
    "QuantConvTranspose2d", "QuantHardswish", "QuantLeakyReLU", "QuantLinear", "QuantMaxPool2d", "QuantReLU",
    "QuantReLU6", "QuantSigmoid", "calibrate", "freeze", "iao_scheme", "prepare",
]
