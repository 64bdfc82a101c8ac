"""The binary/ternary-weight, binary-activation preset (WbWtAb), with the original micronet's API.

``prepare(model, A=2, W=2)`` returns a model prepared by the shared mechanism
(:mod:`micronet.compression.quantization.core`) with the low-bit quantizer families
(:mod:`~micronet.compression.quantization.core.lowbit`):

* ``W``: 2 = binary weights ±α per output channel (α = mean|W|, after clipping to [−1, 1]; the original
  also centred over the input-channel axis: ``center=True``), 3 = ternary weights {−α, 0, +α} per output channel
  (Δ = 0.7·mean|W|), 32 = float weights;
* ``A``: 2 = binary activations: every ReLU / ReLU6 between the first and the last weighted layer is
  *replaced* by a :class:`SignActivation` (±1, hardtanh STE) — a ReLU followed by a sign would make every
  activation +1; 32 = the ReLUs stay;
* the first and the last weighted layers (conv, transposed conv or linear) stay float, the others are
  quantized; layer inputs are not quantized separately (the sign activations binarize them).

Differences from the original, on purpose: clipping (and the opt-in centring) act on a copy of the weight
(the original overwrote the float weights in place on every forward call), centring is off by default, linear
layers between the first and last weighted layer are quantized too, first/last are found in call order (not by counting convs),
ConvTranspose2d works, and ``quant_inference=True`` switches the weight quantizers off so stored,
already-quantized weights are used as they are.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from micronet.compression.quantization.core import modules as _core
from micronet.compression.quantization.core.lowbit import SignActivation
from micronet.compression.quantization.core.presets import preset_class, use_stored_weights, with_quantized_edges
from micronet.compression.quantization.core.schedule import ClampBinaryWeights
from micronet.compression.quantization.core.scheme import QuantizerSpec, QuantScheme
from micronet.compression.quantization.core.workflow import prepare as _prepare
from micronet.errors import QuantizationError

_FLOAT = QuantizerSpec("float", 32, observer="none")


def _weight_spec(W: int, center: bool, clip: bool) -> QuantizerSpec:  # noqa: N803 - the original's flag name
    if W == 2:
        return QuantizerSpec("binary", 1, per_channel=True, observer="none", options={"center": center, "clip": clip})
    if W == 3:
        return QuantizerSpec("ternary", 2, per_channel=True, observer="none")
    if W == 32:
        return _FLOAT
    raise QuantizationError(f"W must be 2 (binary), 3 (ternary) or 32 (float weights) (got {W})")


def _activation_spec(A: int, sign_gradient: str = "hardtanh") -> QuantizerSpec | None:  # noqa: N803
    if A == 2:
        options = {} if sign_gradient == "hardtanh" else {"gradient": sign_gradient}
        return QuantizerSpec("sign", 1, observer="none", options=options)
    if A == 32:
        return None
    raise QuantizationError(f"A must be 2 (binary activations) or 32 (float activations, ReLU kept) (got {A})")


def wbwtab_scheme(
    A: int = 2,  # noqa: N803
    W: int = 2,  # noqa: N803
    *,
    center: bool = False,
    clip: bool = True,
    keep_first_float: bool = True,
    keep_last_float: bool = True,
    sign_gradient: str = "hardtanh",
    edge_bits: int | None = None,
) -> QuantScheme:
    """The :class:`QuantScheme` of ``W`` (2/3/32) weights and ``A`` (2/32) activations.

    ``center`` / ``clip`` are the binary weights' preprocessing (the original's W_clip is both). Centring
    is off by default: it forces every output channel's signs to balance over its inputs, and cost 6.4 pt
    after one epoch of binary W / binary A on the demo NIN (69.42% vs 75.82% test accuracy on
    Fashion-MNIST). Clipping only masks the gradient of latent weights beyond ±1; train with the
    :class:`ClampBinaryWeights` hook (``--clamp-weights``) to keep them within reach of their gradient.
    ``sign_gradient`` is the sign activations' straight-through gradient: ``"hardtanh"`` or ``"approx"``
    (Bi-Real Net's ApproxSign, :class:`SignActivation`). ``edge_bits`` (e.g. 8) quantizes the first and last
    layers and the average pools as integer-arithmetic-only layers at that width instead of keeping them
    float, so that every conv runs on integer kernels
    (:func:`~micronet.compression.quantization.core.presets.with_quantized_edges`).
    """
    scheme = QuantScheme(
        name=f"wbwtab-W{W}A{A}",
        weight=_weight_spec(W, center, clip),
        activation=_FLOAT,
        quantize_pools=False,
        quantize_activations=(),
        quantize_joins=False,
        keep_first_float=keep_first_float,
        keep_last_float=keep_last_float,
        activation_replacement=_activation_spec(A, sign_gradient),
        replaced_activations=("ReLU", "ReLU6"),
    )
    return with_quantized_edges(scheme, edge_bits)


def prepare(
    model: nn.Module,
    inplace: bool = False,
    A: int = 2,  # noqa: N803
    W: int = 2,  # noqa: N803
    quant_inference: bool = False,
    *,
    edge_bits: int | None = None,
    skip: Iterable[str] = (),
) -> nn.Module:
    """Prepare ``model`` with the WbWtAb preset (the original's signature, plus ``edge_bits``)."""
    prepared = _prepare(model, wbwtab_scheme(A, W, edge_bits=edge_bits), inplace=inplace, skip=skip)
    return use_stored_weights(prepared) if quant_inference else prepared


def ActivationQuantizer(A: int = 2) -> nn.Module:  # noqa: N802, N803 - the original's class name
    """The original's activation layer: a :class:`SignActivation` for A = 2, a ReLU for A = 32.

    Prepared models hold :class:`SignActivation` modules: test ``isinstance(m, SignActivation)``.
    """
    return SignActivation() if _activation_spec(A) is not None else nn.ReLU()


def _wbwtab_class(core_class: type) -> type:
    return preset_class(core_class, lambda W: wbwtab_scheme(W=W), {"W": 2}, __name__)


QuantConv2d = _wbwtab_class(_core.QuantConv2d)
QuantConvTranspose2d = _wbwtab_class(_core.QuantConvTranspose2d)
QuantLinear = _wbwtab_class(_core.QuantLinear)

__all__ = ["ActivationQuantizer", "ClampBinaryWeights", "QuantConv2d", "QuantConvTranspose2d", "QuantLinear", "SignActivation",
           "prepare", "wbwtab_scheme"]
