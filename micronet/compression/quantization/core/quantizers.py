"""Quantizers: small modules that observe, derive their parameters and fake-quantize.

Every quantizer family (affine integer here; DoReFa, binary, ternary and sign build on the same base)
shares the :class:`Quantizer` mode machinery, and everything that matters lives in buffers:

* ``mode`` — ``QAT`` (observe while the module trains), ``CALIBRATE`` (observe in any mode; set by
  :func:`~micronet.compression.quantization.core.calibrate`) or ``FROZEN`` (never observe: QAFT and deployment);
* ``enabled`` — fake-quantization on/off (off = identity, for sensitivity analysis);
* ``bits`` — checked against the checkpoint on load: a checkpoint never silently changes a bit width.

Observers update only in ``CALIBRATE`` mode or in ``QAT`` mode while training, never in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from micronet.compression.quantization.core.affine import (
    NonFiniteInputError,
    affine_qparams,
    affine_qparams_scalar,
    fake_quantize,
    observed_channel_fake_quantize,
    quant_range,
)
from micronet.compression.quantization.core.native import activation_kernels, native_ready
from micronet.compression.quantization.core.observers import MinMaxObserver, Observer, in_distributed_run
from micronet.errors import QuantizationError

QAT, CALIBRATE, FROZEN = 0, 1, 2


@dataclass(frozen=True)
class ActivationGrid:
    """What an activation quantizer computes, in the terms a deployment writes (each family describes
    itself, so an exporter needs no list of quantizer classes).

    ``kind``: ``"float"`` (the quantizer writes nothing), ``"sign"`` (±1 with sign(0) = +1) or ``"codes"``:
    integer codes round(x / ``scale``) + ``zero_point`` kept within [``code_min``, ``code_max``] and read back
    at ``read_scale`` (``None``: at ``scale``; DoReFa reads its codes at 1/n after quantizing at 1/(p·n)).
    ``bits``, ``per_channel`` and ``calibrated`` let the exporter refuse what it cannot write."""

    kind: str
    scale: float = 1.0
    zero_point: int = 0
    code_min: int = 0
    code_max: int = 0
    read_scale: float | None = None
    bits: int = 8
    per_channel: bool = False
    calibrated: bool = True


@dataclass(frozen=True)
class WeightCodes:
    """A quantized tensor as integer codes: ``dequantized = (codes − zero_point) · scale``.

    ``codes`` are non-negative integers below ``2**bits`` (int64); ``scale`` and ``zero_point`` are float32
    tensors that broadcast against ``codes`` (shape (C, 1, ...) along the channel axis, or scalars).
    Every quantizer family computes its fake-quant output with exactly this formula, so unpacking the
    codes reproduces the quantized weight bit for bit (packed artifacts, export, integer inference).
    """

    codes: torch.Tensor
    bits: int
    scale: torch.Tensor
    zero_point: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return (self.codes.to(torch.float32) - self.zero_point) * self.scale
MODE_NAMES = {QAT: "qat", CALIBRATE: "calibrate", FROZEN: "frozen"}


class Quantizer(nn.Module):
    """Base class. Subclasses implement :meth:`observe` and :meth:`quantize`."""

    observes = False  # whether the class overrides observe(): quantizers without statistics skip the mode check

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.observes = cls.observe is not Quantizer.observe

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.register_buffer("bits", torch.tensor(int(bits), dtype=torch.int32))
        self.register_buffer("mode", torch.tensor(QAT, dtype=torch.uint8))
        self.register_buffer("enabled", torch.ones((), dtype=torch.uint8))
        self.qualified_name = ""  # set by prepare(); only used in error messages

    # ------------------------------------------------------------------ modes
    def set_mode(self, mode: int) -> None:
        self.mode.fill_(mode)

    @property
    def observing(self) -> bool:
        mode = int(self.mode.item())
        return mode == CALIBRATE or (mode == QAT and self.training)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled.item():
            return x
        if self.observes and self.observing:
            self._observe_checked(x)
        return self.quantize(x)

    def forward_shared(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Quantize several tensors with one set of parameters (inputs of an add or a concat)."""
        if not self.enabled.item():
            return list(tensors)
        if self.observes and self.observing:
            self._observe_checked(tensors)  # observers take several tensors as one
        return [self.quantize(t) for t in tensors]

    def _observe_checked(self, x: torch.Tensor) -> None:
        try:
            self.observe(x)
        except NonFiniteInputError as error:
            raise QuantizationError(
                f"quantizer {self.qualified_name or type(self).__name__} received {error.kind} values: "
                "fix the model or data upstream (e.g. lower the learning rate) before quantizing"
            ) from None

    def observe(self, x: torch.Tensor) -> None:
        """Update statistics and parameters from ``x``."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_codes(self, w: torch.Tensor) -> WeightCodes:
        """The integer codes of ``quantize(w)`` with the current parameters (no observation)."""
        raise QuantizationError(f"{type(self).__name__} does not produce integer codes")

    def activation_grid(self) -> ActivationGrid:
        """What this quantizer computes on activations, for exporters (see :class:`ActivationGrid`)."""
        raise QuantizationError(f"{type(self).__name__} does not describe its activation grid")

    # ------------------------------------------------------------------ loading
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "bits"
        if key in state_dict and int(state_dict[key]) != int(self.bits):
            raise QuantizationError(
                f"checkpoint has {int(state_dict[key])}-bit values for {self.qualified_name or prefix.rstrip('.')} "
                f"but the model was prepared with {int(self.bits)} bits: prepare with the checkpoint's bit widths"
            )
        frozen = int(self.mode.item()) == FROZEN
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if frozen:  # loading statistics never un-freezes a quantizer the user froze (QAFT after QAT)
            self.mode.fill_(FROZEN)

    def describe(self) -> dict[str, Any]:
        return {"bits": int(self.bits), "mode": MODE_NAMES[int(self.mode)], "enabled": bool(self.enabled)}


class AffineQuantizer(Quantizer):
    """Uniform integer quantization (symmetric or asymmetric, per tensor or per channel).

    ``signed=None`` decides from the data: unsigned codes (e.g. uint8, zero point 0 when symmetric) as long
    as everything observed is non-negative, as after a ReLU; signed codes otherwise. ``narrow_range`` drops
    the most negative code (−127..127), as symmetric int8 weights usually do.
    """

    def __init__(
        self,
        bits: int,
        observer: Observer,
        *,
        symmetric: bool = True,
        signed: bool | None = None,
        narrow_range: bool = False,
    ) -> None:
        quant_range(bits, True, narrow_range)  # validates the bit width
        super().__init__(bits)
        self.observer = observer
        self.symmetric = symmetric
        self.signed_policy = signed
        self.narrow_range = narrow_range
        shape = observer.min_val.shape
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.register_buffer("signed", torch.tensor(1 if signed is None or signed else 0, dtype=torch.uint8))

    @property
    def ch_axis(self) -> int | None:
        return self.observer.ch_axis

    @property
    def quant_min_max(self) -> tuple[int, int]:
        return quant_range(int(self.bits), bool(self.signed.item()), self.narrow_range)

    @property
    def calibrated(self) -> bool:
        """Whether the scale comes from data (an observer that saw some)."""
        return bool(self.observer.is_initialized)

    def activation_grid(self) -> ActivationGrid:
        quant_min, quant_max = self.quant_min_max
        per_channel = self.ch_axis is not None
        if not self.calibrated or per_channel:
            return ActivationGrid("codes", bits=int(self.bits), per_channel=per_channel, calibrated=self.calibrated)
        zero_point = 0 if self.symmetric else int(self.zero_point.item())
        return ActivationGrid("codes", float(self.scale.detach().reshape(()).item()), zero_point, quant_min, quant_max,
                              bits=int(self.bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observes_channels_in_one_call(x):
            return self._observe_and_quantize_channels(x)
        return super().forward(x)

    def _observes_channels_in_one_call(self, x: torch.Tensor) -> bool:
        """Per-channel min/max weights in a training (or calibration) step, where the C++ kernels run."""
        observer, cls = self.observer, type(self)
        own_steps = cls.observe is AffineQuantizer.observe and cls.quantize is AffineQuantizer.quantize  # not LSQ
        return (own_steps and observer.ch_axis == 0 and type(observer) is MinMaxObserver and isinstance(x, torch.Tensor)
                and x.dim() >= 1 and x.is_contiguous() and native_ready(x) and not in_distributed_run()
                and activation_kernels() is not None and bool(self.enabled.item()) and self.observing)

    def _observe_and_quantize_channels(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`observe` then :meth:`quantize` as one call of the kernels (same float32 operations, same
        state afterwards)."""
        observer = self.observer
        if x.shape[0] != observer.min_val.shape[0]:
            raise QuantizationError(f"observer expects {observer.min_val.shape[0]} channels on axis 0, got {x.shape[0]}")
        running = observer.running and observer.is_initialized
        try:
            out, lo, hi, scale, zero_point, signed = observed_channel_fake_quantize(
                x, observer.min_val if running else None, observer.max_val if running else None, int(self.bits),
                self.narrow_range, self.signed_policy, self.symmetric)
        except NonFiniteInputError as error:
            raise QuantizationError(
                f"quantizer {self.qualified_name or type(self).__name__} received {error.kind} values: "
                "fix the model or data upstream (e.g. lower the learning rate) before quantizing"
            ) from None
        with torch.no_grad():
            observer.min_val.copy_(lo)
            observer.max_val.copy_(hi)
            observer.initialized.fill_(1)
            self.signed.copy_(signed)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        return out

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        extremes = self.observer.observe_extremes(x)
        if extremes is None:
            self.observer(x)
            self.calculate_qparams()
            return
        lo, hi = extremes  # per tensor: the same parameters in scalar arithmetic
        if self.signed_policy is None:
            self.signed.fill_(int(lo < 0))
        quant_min, quant_max = self.quant_min_max
        scale, zero_point = affine_qparams_scalar(lo, hi, quant_min, quant_max, self.symmetric)
        self.scale.fill_(scale)
        self.zero_point.fill_(zero_point)

    @torch.no_grad()
    def calculate_qparams(self) -> None:
        if self.signed_policy is None:
            self.signed.fill_(int(bool((self.observer.min_val < 0).any())))
        quant_min, quant_max = self.quant_min_max
        lo, hi = self.observer.range(quant_min, quant_max, self.symmetric)
        scale, zero_point = affine_qparams(lo, hi, quant_min, quant_max, self.symmetric)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    @torch.no_grad()
    def reobserve(self, x: torch.Tensor) -> bool:
        """Re-derive scale and zero point from ``x`` alone, when this quantizer is in QAT mode, has a range, and
        its observer keeps only the latest tensor (min/max of the current weights). Weights change in every
        ``optimizer.step()`` after the forward that observed them, so without this the scales used in eval,
        freeze, convert and export would be one step stale and the largest weights would clip.
        Returns whether it did."""
        if not (self.enabled.item() and int(self.mode.item()) == QAT and self.observer.is_initialized
                and self.observer.keeps_latest_only):
            return False
        try:
            self.observer.set_range_from(x)
        except NonFiniteInputError as error:
            raise QuantizationError(f"quantizer {self.qualified_name or type(self).__name__} received {error.kind} "
                                    "weights: the training diverged (lower the learning rate)") from None
        self.calculate_qparams()
        return True

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.observer.is_initialized:
            raise QuantizationError(
                f"quantizer {self.qualified_name or 'AffineQuantizer'} has no range yet: calibrate the model "
                "(calibrate(model, data)) or train it in QAT mode before evaluating"
            )
        quant_min, quant_max = self.quant_min_max
        zero_point = None if self.symmetric else self.zero_point
        return fake_quantize(x, self.scale, zero_point, quant_min, quant_max, self.ch_axis)

    @torch.no_grad()
    def weight_codes(self, w: torch.Tensor) -> WeightCodes:
        quant_min, quant_max = self.quant_min_max
        scale, zero_point = self.scale.float(), self.zero_point.float()
        if self.ch_axis is not None:
            shape = [1] * w.dim()
            shape[self.ch_axis] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        q = torch.clamp(torch.round(w.float() * (1.0 / scale)) + zero_point, quant_min, quant_max)  # as torch's kernel
        return WeightCodes((q - quant_min).to(torch.int64), int(self.bits), scale, zero_point - quant_min)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "symmetric": self.symmetric, "signed": bool(self.signed), "ch_axis": self.ch_axis}

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        sign = "auto-signed" if self.signed_policy is None else ("signed" if self.signed_policy else "unsigned")
        return f"bits={int(self.bits)}, {kind}, {sign}" + (", narrow" if self.narrow_range else "")


def quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    """Every quantizer of ``model`` with its module path."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Quantizer)]


def is_prepared(model: nn.Module) -> bool:
    """Whether ``model`` holds quantizers (went through ``prepare``)."""
    return any(True for _ in quantizers(model))
