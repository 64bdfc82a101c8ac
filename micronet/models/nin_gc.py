"""NIN with grouped convolutions and channel shuffles the original micronet's ``nin_gc.Net``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from micronet.errors import ModelConfigError
from micronet.models.layers import ConvBNReLU, init_weights

__all__ = ["NINGC", "Net", "DEFAULT_CFG", "LAYERS", "required_multiples", "check_cfg"]

DEFAULT_CFG = (256, 256, 256, 512, 512, 512, 1024, 1024)

# One row per conv block: (kernel size, groups, shuffle groups before the conv or None, MaxPool 2×2 after?).
# Conv i maps cfg[i-1] → cfg[i]; conv 0 reads the image, conv 8 writes the class scores.
LAYERS: tuple[tuple[int, int, int | None, bool], ...] = (
    (5, 1, None, False),
    (1, 2, None, False),
    (1, 2, 2, True),
    (3, 16, 2, False),
    (1, 4, 16, False),
    (1, 4, 4, True),
    (3, 32, 4, False),
    (1, 8, 32, False),
    (1, 1, None, False),
)


def required_multiples() -> list[tuple[int, list[str]]]:
    """For each cfg entry: the multiple it must be (lcm of its constraints) and the reasons."""
    out: list[tuple[int, list[str]]] = []
    for i in range(len(DEFAULT_CFG)):
        reasons: list[tuple[int, str]] = []
        _, g_out, _, _ = LAYERS[i]          # conv i writes cfg[i]
        _, g_in, shuffle, _ = LAYERS[i + 1]  # conv i+1 reads cfg[i]
        if g_out > 1:
            reasons.append((g_out, f"output of conv {i}, groups={g_out}"))
        if g_in > 1:
            reasons.append((g_in, f"input of conv {i + 1}, groups={g_in}"))
        if shuffle:
            reasons.append((shuffle, f"channel shuffle before conv {i + 1}, groups={shuffle}"))
        multiple = math.lcm(*(d for d, _ in reasons)) if reasons else 1
        out.append((multiple, [r for _, r in reasons]))
    return out


def check_cfg(cfg: Sequence[int]) -> None:
    """Raise :class:`ModelConfigError` unless every grouped conv and shuffle divides its channels."""
    for i, (multiple, reasons) in enumerate(required_multiples()):
        value = cfg[i]
        if value % multiple:
            down = value - value % multiple
            example = f"{down} or {down + multiple}" if down else f"{multiple}"
            raise ModelConfigError(
                f"cfg[{i}] = {value} for nin_gc must be a multiple of {multiple} ({'; '.join(reasons)}): "
                f"use e.g. {example}")


class NINGC(nn.Module):
    """NIN_GC: NIN with grouped 1×1/3×3 convs and ShuffleNet channel shuffles; returns the original micronet's logits.

    cfg layout (length 8): the output channels ``c0..c7`` of conv blocks 0..7, default
    ``[256, 256, 256, 512, 512, 512, 1024, 1024]``. ``features`` holds, in order (CBR = [shuffle] →
    conv → BN → ReLU, conv bias=False because BN follows):

    ====  ==================  ======  ======  ===============================
    conv  in → out            kernel  groups  shuffle before (groups) / after
    ====  ==================  ======  ======  ===============================
    0     in → c0             5 (p2)  1       –
    1     c0 → c1             1       2       –
    2     c1 → c2             1       2       shuffle(2); then MaxPool 2×2 s2
    3     c2 → c3             3 (p1)  16      shuffle(2)
    4     c3 → c4             1       4       shuffle(16)
    5     c4 → c5             1       4       shuffle(4); then MaxPool 2×2 s2
    6     c5 → c6             3 (p1)  32      shuffle(4)
    7     c6 → c7             1       8       shuffle(32)
    8     c7 → num_classes    1       1       –
    ====  ==================  ======  ======  ===============================

    then AdaptiveAvgPool2d(1) (the original micronet's AvgPool(8)) and flatten. Each shuffle uses the previous
    conv's group count. Divisibility (every conv's in/out channels by its groups, every shuffle's
    channels by its groups) means c0, c1 multiples of 2; c2, c3 of 16; c4 of 4; c5, c6 of 32; c7 of 8.
    Like the original micronet, the last block applies BN and ReLU to the class scores.
    Initialisation: :func:`init_weights`.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, cfg: Sequence[int] | None = None) -> None:
        super().__init__()
        c = list(cfg) if cfg is not None else list(DEFAULT_CFG)
        check_cfg(c)
        widths = [in_channels, *c, num_classes]
        layers: list[nn.Module] = []
        for i, (k, groups, shuffle, pool_after) in enumerate(LAYERS):
            layers.append(ConvBNReLU(widths[i], widths[i + 1], k, padding=k // 2, groups=groups,
                                     shuffle_groups=shuffle))
            if pool_after:
                layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.avgpool(self.features(x)))


def Net(cfg: Sequence[int] | None = None) -> nn.Module:  # noqa: N802 - the original micronet's name
    """The original micronet's ``nin_gc.Net(cfg=None)``: ``build_model("nin_gc", 10, 3, cfg)``."""
    from micronet.models.registry import build_model

    return build_model("nin_gc", cfg=cfg)
