"""BatchNorm folding for quantization-aware training: :class:`QuantBNFuseConv2d`.

At inference a Conv2d→BatchNorm2d pair is one convolution with the folded weight and bias

    W_f = W · γ/σ,    b_f = β + (b − μ) · γ/σ,    σ = sqrt(var + eps),

so the weight that must survive quantization is ``W_f``, not ``W``. :class:`QuantBNFuseConv2d` trains with
the fold in place (Jacob et al. 2018 §3.2 and appendix C; Krishnamoorthi 2018 §3.2.2), so the weight
quantizer sees — and its observer measures — the folded weight.

Notation: μ_B, var_B are the per-channel mean and *biased* variance of ``conv(x̂, W) + b`` over (N, H, W),
exactly what ``nn.BatchNorm2d`` normalises with; σ_B = sqrt(var_B + eps); μ_R, σ_R are the same from the
running statistics; x̂ = ``input_quantizer(x)``; Wq = ``weight_quantizer``.

Three ways to train with the fold (``scheme.bn_fold_method``; eval is the same for all):

* ``"one_conv"`` (the default, as torch.ao and the whitepaper's practical recipe): ``z = conv(x̂, Wq(W·γ/σ_R)
  / (γ/σ_R)) + b`` (≈ the unfolded conv's output), then ``y = (z − μ_B(z))·γ/σ_B(z) + β``. One convolution;
  the batch statistics include the weight's quantization noise. With the quantizers disabled this is
  conv→BN in training mode, gradients included.
* ``"batch"`` (Jacob et al. 2018 §3.2, Fig. C.8): a float convolution gives μ_B, σ_B, then
  ``y = conv(x̂, Wq(W·γ/σ_B)) + β + (b − μ_B)·γ/σ_B``. Exact batch statistics; two convolutions.
* ``"running"`` (the original's ``bn_fuse_calib``, the whitepaper's "correction"): μ_B, σ_B from a float
  convolution, ``y = conv(x̂, Wq(W·γ/σ_R)) · σ_R/σ_B + β + (b − μ_B)·γ/σ_B``. Two convolutions.
* Eval mode, ``freeze_bn_stats == 1`` or a FROZEN weight quantizer (QAFT): ``y = conv(x̂, Wq(W·γ/σ_R)) + β +
  (b − μ_R)·γ/σ_R`` — exactly :meth:`QuantBNFuseConv2d.folded_weight_and_bias`, what export writes.

In the live-statistics training paths the running statistics are updated exactly as ``nn.BatchNorm2d``
updates them (momentum, or the cumulative average when ``momentum is None``; the *unbiased* batch variance
goes into ``running_var``; ``num_batches_tracked`` counts), so without quantization they equal those of the
unfolded conv→BN fed the same inputs. σ_R in ``"one_conv"`` is taken before this step's update (the weight
must be quantized before the statistics exist); in ``"running"`` after it (as in the original).

Fixed on purpose relative to the original micronet: the variance that normalises is the biased one (the
original used ``torch.var``'s unbiased estimate, so folded and unfolded outputs differed); "copy the first
batch's statistics" (``bn_stats_from_model=False``) is tracked by a buffer, so it survives checkpoints
(the original kept a Python counter); BN statistics can be frozen (:func:`freeze_bn_statistics`).

Measured cost per QAT step: see bench/quant_overhead.py.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from micronet.compression.quantization.core.modules import WeightedQuantizedModule, default_scheme
from micronet.compression.quantization.core.quantizers import FROZEN
from micronet.compression.quantization.core.scheme import QuantScheme
from micronet.errors import QuantizationError


def _per_channel(t: Tensor) -> Tensor:
    """(C,) → (1, C, 1, 1): broadcast over an activation."""
    return t.reshape(1, -1, 1, 1)


def _per_filter(t: Tensor) -> Tensor:
    """(C,) → (C, 1, 1, 1): broadcast over a conv weight (out_channels first)."""
    return t.reshape(-1, 1, 1, 1)


class QuantBNFuseConv2d(WeightedQuantizedModule, nn.Conv2d):
    """A Conv2d with its following BatchNorm2d folded in, for QAT (see the module docstring for the math).

    Build it with :meth:`from_conv_bn`. It is an ``nn.Conv2d`` (``weight``, optional ``bias``) with
    ``input_quantizer`` and ``weight_quantizer`` like :class:`QuantConv2d`, plus the BN's state under the
    names ``bn_weight`` (γ), ``bn_bias`` (β), ``running_mean``, ``running_var``, ``num_batches_tracked``
    and the attributes ``eps`` and ``momentum``. Two uint8 buffers hold its switches, so checkpoints keep
    them: ``freeze_bn_stats`` (1: train with the running statistics and stop updating them) and
    ``bn_stats_initialized`` (0: the next training batch *copies* its statistics into the running ones —
    ``scheme.bn_stats_from_model=False``, the original's ``pretrained_model=False``).

    **Input of the statistics pass.** Both convolutions (batch statistics and output) run on the
    *quantized* input x̂ — not on the float input as in the original. The BN being folded normalises what
    the conv actually sees at inference, which is x̂; using x̂ for both makes the training output exactly
    ``BN(conv(x̂))`` when the weight quantizer is off (the folded and unfolded graphs agree), keeps the
    running statistics consistent with the deployed integer conv, and sends the statistics' gradient
    through the same input-quantizer STE as the output's.

    **Weight quantizer range.** In the ``"batch"`` path the weight observer sees W·γ/σ_B, which moves with
    every batch; in eval the weight is W·γ/σ_R with the scale from the last training step. ``"one_conv"``
    and ``"running"`` quantize the deployed running-statistics weight throughout; with ``"batch"``, freeze
    the BN statistics (:func:`freeze_bn_statistics`) for the last part of QAT.

    ``bn_fold_method`` comes from the scheme (stored in checkpoints with it). BatchNorm statistics are
    per process, as in ``nn.BatchNorm2d`` (not synchronised under DDP).
    """

    def __init__(
        self,
        *args: Any,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        scheme: QuantScheme | None = None,
        **kwargs: Any,
    ) -> None:
        """``nn.Conv2d``'s arguments, the BN's ``eps`` and ``momentum``, and the scheme (default 8-bit).

        γ starts at 1, β at 0, the running statistics at (0, 1), like a fresh ``nn.BatchNorm2d``.
        """
        if momentum is not None and not 0 <= momentum <= 1:
            raise QuantizationError(f"BN momentum must be in [0, 1] or None (got {momentum})")
        if not eps > 0:
            raise QuantizationError(f"BN eps must be positive (got {eps})")
        scheme = scheme or default_scheme()
        super().__init__(*args, scheme=scheme, **kwargs)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        channels = self.out_channels
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.bn_weight = nn.Parameter(torch.ones(channels, **factory))
        self.bn_bias = nn.Parameter(torch.zeros(channels, **factory))
        self.register_buffer("running_mean", torch.zeros(channels, **factory))
        self.register_buffer("running_var", torch.ones(channels, **factory))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=self.weight.device))
        self.register_buffer("freeze_bn_stats", torch.zeros((), dtype=torch.uint8, device=self.weight.device))
        self.register_buffer(
            "bn_stats_initialized",
            torch.tensor(int(scheme.bn_stats_from_model), dtype=torch.uint8, device=self.weight.device),
        )

    def attach_quantizers(self, scheme: QuantScheme) -> None:
        super().attach_quantizers(scheme)
        self.bn_fold_method = scheme.bn_fold_method

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_float(cls, module: nn.Module, scheme: QuantScheme) -> nn.Module:
        raise QuantizationError(
            "QuantBNFuseConv2d folds a conv and its BatchNorm: build it with "
            "QuantBNFuseConv2d.from_conv_bn(conv, bn, scheme)"
        )

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, scheme: QuantScheme) -> QuantBNFuseConv2d:
        """A new module holding *copies* of ``conv``'s and ``bn``'s state (the float modules are untouched
        and share no storage with it), in ``bn``'s training mode. A BN without affine parameters gives
        γ = 1, β = 0 that do not train (``requires_grad=False``), as in the unfolded model."""
        if not isinstance(conv, nn.Conv2d) or isinstance(conv, WeightedQuantizedModule):
            raise QuantizationError(f"from_conv_bn needs a float nn.Conv2d (got {type(conv).__name__})")
        if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            raise QuantizationError(f"from_conv_bn needs an nn.BatchNorm2d (got {type(bn).__name__})")
        if bn.num_features != conv.out_channels:
            raise QuantizationError(
                f"cannot fold a BatchNorm of {bn.num_features} channels into a conv with {conv.out_channels} "
                "output channels: the BN must directly follow the conv"
            )
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            raise QuantizationError(
                "cannot fold a BatchNorm without running statistics (track_running_stats=False): it normalises "
                "with batch statistics even in eval mode, so there is nothing to fold for inference"
            )
        device = conv.weight.device
        module = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            eps=bn.eps,
            momentum=bn.momentum,
            scheme=scheme,
            device=device,
            dtype=conv.weight.dtype,
        ).to(device)  # the quantizers are built on the CPU
        with torch.no_grad():
            module.weight.copy_(conv.weight)
            if conv.bias is not None:
                module.bias.copy_(conv.bias)
            if bn.affine:
                module.bn_weight.copy_(bn.weight)
                module.bn_bias.copy_(bn.bias)
            else:
                module.bn_weight.requires_grad_(False)
                module.bn_bias.requires_grad_(False)
            module.running_mean.copy_(bn.running_mean)
            module.running_var.copy_(bn.running_var)
            if bn.num_batches_tracked is not None:
                module.num_batches_tracked.copy_(bn.num_batches_tracked)
        module.weight.requires_grad_(conv.weight.requires_grad)
        if conv.bias is not None:
            module.bias.requires_grad_(conv.bias.requires_grad)
        module.train(bn.training)
        return module

    # ------------------------------------------------------------------ folding
    @property
    def bn_stats_frozen(self) -> bool:
        """True when the running statistics are used and left alone even in training mode: explicitly
        frozen (``freeze_bn_stats``) or quantization-aware fine-tuning (weight quantizer FROZEN)."""
        return bool(self.freeze_bn_stats.item()) or int(self.weight_quantizer.mode.item()) == FROZEN

    def _running_std(self) -> Tensor:
        return torch.sqrt(self.running_var + self.eps)

    def _centred_bias(self, mean: Tensor) -> Tensor:
        return -mean if self.bias is None else self.bias - mean

    def folded_weight_and_bias(self) -> tuple[Tensor, Tensor]:
        """(W·γ/σ_R, β + (b − μ_R)·γ/σ_R) from the running statistics, in float (not fake-quantized).

        What eval mode computes (``conv(x̂, Wq(W_f)) + b_f``) and what export writes; the tensors keep
        their autograd graph (QAFT trains through them) — detach them to export."""
        scale = self.bn_weight / self._running_std()
        weight = self.weight * _per_filter(scale)
        bias = self.bn_bias + self._centred_bias(self.running_mean) * scale
        return weight, bias

    def deployed_weight(self) -> Tensor:
        """W·γ/σ_R: the weight eval mode and export quantize."""
        return self.folded_weight_and_bias()[0]

    def quantized_weight(self) -> Tensor:
        """The fake-quantized deployed weight, Wq(W·γ/σ_R) (observes it when the quantizer is observing)."""
        return self.weight_quantizer(self.folded_weight_and_bias()[0])

    def forward_with_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        """The deployed conv (running-statistics bias) with a given, already folded and quantized weight."""
        return self._conv_forward(x, weight, self.integer_bias(self.folded_weight_and_bias()[1]))

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        x = self.input_quantizer(x)
        if not self.training or self.bn_stats_frozen:
            weight, bias = self.folded_weight_and_bias()
            return self._conv_forward(x, self.weight_quantizer(weight), self.integer_bias(bias))
        if self.bn_fold_method == "one_conv":
            return self._forward_one_conv(x)
        return self._forward_two_convs(x)

    def _batch_statistics(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, inverse std) of ``y`` per channel as BN normalises (biased variance), updating the
        running statistics on the way; both keep their gradient paths."""
        count = y.numel() // y.shape[1]
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(y.shape)}")
        var_b, mean_b = torch.var_mean(y, dim=(0, 2, 3), correction=0)
        self._update_running_stats(mean_b.detach(), var_b.detach(), count)
        return mean_b, torch.rsqrt(var_b + self.eps)

    def _forward_one_conv(self, x: Tensor) -> Tensor:
        """Quantize W·γ/σ_R, convolve once, divide the fold back out (≈ conv(x̂, W) + b) and batch-normalise
        that: the statistics carry the weight's quantization noise, the price of the second convolution."""
        inv_std_r = torch.rsqrt(self.running_var + self.eps)
        # A channel with γ = 0 folds to a zero weight; fold it with γ = 1 instead so that z still estimates
        # the conv output and γ keeps its gradient (BN then multiplies it by 0 anyway).
        scale_r = torch.where(self.bn_weight == 0, inv_std_r, self.bn_weight * inv_std_r)
        # conv(x̂, Wq(W·s))/s computed as conv(x̂, Wq(W·s)/s): dividing the weight instead of the output
        # costs a pass over a small tensor rather than over every activation.
        weight = self.weight_quantizer(self.weight * _per_filter(scale_r)) / _per_filter(scale_r)
        y = self._conv_forward(x, weight, self.bias)
        # nn.BatchNorm2d's own kernel: batch statistics with their gradients, running statistics updated.
        return F.batch_norm(y, self.running_mean, self.running_var, self.bn_weight, self.bn_bias, training=True,
                            momentum=self._next_momentum(), eps=self.eps)

    def _forward_two_convs(self, x: Tensor) -> Tensor:
        """Exact batch statistics from a float convolution, then the quantized folded convolution."""
        mean_b, inv_std_b = self._batch_statistics(self._conv_forward(x, self.weight, self.bias))
        scale_b = self.bn_weight * inv_std_b
        bias = self.bn_bias + self._centred_bias(mean_b) * scale_b
        if self.bn_fold_method == "running":
            std_r = self._running_std()  # after this step's update
            weight = self.weight * _per_filter(self.bn_weight / std_r)
            out = self._conv_forward(x, self.weight_quantizer(weight), None)
            return out * _per_channel(std_r * inv_std_b) + _per_channel(bias)
        weight = self.weight * _per_filter(scale_b)
        return self._conv_forward(x, self.weight_quantizer(weight), bias)

    @torch.no_grad()
    def _next_momentum(self) -> float:
        """Count this batch and return the weight of its statistics in the running ones (1 = copy them)."""
        self.num_batches_tracked.add_(1)
        if not self.bn_stats_initialized.item():
            self.bn_stats_initialized.fill_(1)
            return 1.0
        return 1.0 / float(self.num_batches_tracked.item()) if self.momentum is None else self.momentum

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var_biased: Tensor, count: int) -> None:
        """As ``nn.BatchNorm2d`` in training: the unbiased batch variance goes into ``running_var``."""
        factor = self._next_momentum()
        var_unbiased = var_biased * (count / (count - 1))
        self.running_mean.mul_(1 - factor).add_(mean * factor)
        self.running_var.mul_(1 - factor).add_(var_unbiased * factor)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}, momentum={self.momentum}, fold={self.bn_fold_method}"


def _set_bn_freeze(model: nn.Module, value: int) -> int:
    count = 0
    for module in model.modules():
        if isinstance(module, QuantBNFuseConv2d):
            module.freeze_bn_stats.fill_(value)
            count += 1
    return count


def freeze_bn_statistics(model: nn.Module) -> int:
    """Stop updating (and train with) the running BN statistics in every :class:`QuantBNFuseConv2d` of
    ``model`` — the "freeze BN after N epochs" step of QAT. Returns how many modules were frozen."""
    return _set_bn_freeze(model, 1)


def unfreeze_bn_statistics(model: nn.Module) -> int:
    """Undo :func:`freeze_bn_statistics`; returns how many modules were switched back to batch statistics."""
    return _set_bn_freeze(model, 0)


__all__ = ["QuantBNFuseConv2d", "freeze_bn_statistics", "unfreeze_bn_statistics"]
