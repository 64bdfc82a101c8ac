"""Building blocks shared by the models: conv-BN-activation, channel shuffle, weight initialisation."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelBias", "ChannelRepeat", "ChannelShuffle", "ConvBNAct", "ConvBNReLU", "init_weights"]


class ChannelShuffle(nn.Module):
    """ShuffleNet channel shuffle: view (N, g, C/g, H, W), swap axes 1 and 2, flatten back.

    Channel ``i * (C/g) + j`` of the input becomes channel ``j * g + i`` of the output. It is a module
    (not an inline reshape) so that pruning can see the permutation it applies to the channel axis.
    """

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No Python-level shape reads, so torch.fx can trace it and ONNX export keeps the batch dynamic.
        return x.unflatten(1, (self.groups, -1)).transpose(1, 2).flatten(1, 2)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class ChannelBias(nn.Module):
    """Adds a learned per-channel bias (``bias``, zeros at start). In front of a sign it is the sign's
    learned threshold (ReActNet's RSign); in front of a ReLU, the ReLU's learned shift."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"channels={self.bias.numel()}"


class ChannelRepeat(nn.Module):
    """Widens ``in_channels`` to ``out_channels`` by repeating them cyclically: output channel ``c`` is input
    channel ``c % in_channels``. A parameter-free shortcut into a wider layer (Bi-Real Net and ReActNet widen
    their shortcuts the same way): each output channel carries one input channel unchanged."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if not 0 < in_channels <= out_channels:
            raise ValueError(f"ChannelRepeat widens: it needs 0 < in_channels <= out_channels (got {in_channels} → "
                             f"{out_channels})")
        self.in_channels, self.out_channels = in_channels, out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        whole, rest = divmod(self.out_channels, self.in_channels)
        parts = [x] * whole + ([x[:, :rest]] if rest else [])
        return torch.cat(parts, dim=1) if len(parts) > 1 else x

    def extra_repr(self) -> str:
        return f"{self.in_channels} → {self.out_channels}"


_ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6}


class ConvBNAct(nn.Module):
    """[ChannelShuffle] → Conv2d → BatchNorm2d → activation, as named submodules.

    Submodules: ``shuffle`` (only when ``shuffle_groups`` is given), ``conv``, ``bn`` and ``act`` (a
    ReLU or ReLU6 module; ``None`` when ``act=None``, e.g. MobileNetV2's linear projection). The conv
    has no bias: the BatchNorm right after it has its own shift, so a conv bias would be redundant (the
    original micronet used ``bias=True``; the function computed is the same). Activations are not in-place, so
    forward hooks and observers on the BN output see the value before the activation.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        act: str | None = "relu",
        shuffle_groups: int | None = None,
    ) -> None:
        super().__init__()
        if padding is None:
            padding = kernel_size // 2
        if shuffle_groups is not None:
            self.shuffle = ChannelShuffle(shuffle_groups)
        else:
            self.shuffle = None
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = _ACTIVATIONS[act]() if act is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shuffle is not None:
            x = self.shuffle(x)
        x = self.bn(self.conv(x))
        if self.act is not None:
            x = self.act(x)
        return x


class ConvBNReLU(ConvBNAct):
    """The original micronet's ``ConvBNReLU`` block: :class:`ConvBNAct` with a ReLU, no conv bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int | None = None, groups: int = 1, shuffle_groups: int | None = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, "relu", shuffle_groups)


def init_weights(model: nn.Module) -> nn.Module:
    """Initialise a fresh model in place and return it.

    Conv2d: kaiming_normal_ (mode="fan_out", nonlinearity="relu") weights, zero bias.
    BatchNorm: γ = 1, β = 0 (running statistics are left at their reset values).
    Linear: N(0, 0.01) weights, zero bias.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model

