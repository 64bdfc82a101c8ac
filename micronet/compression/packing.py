"""Packed low-bit artifacts: quantized weights stored as their integer codes, a few bits each.

A fake-quantized model keeps float32 weights; its deployed size is only a theoretical number until the
codes are written out. :func:`save_packed` writes a directory that holds them for real:

    packed.safetensors   for every layer whose weight quantizer produces codes
                         (:meth:`Quantizer.weight_codes`): ``<layer>.weight.packed`` (uint8 bit stream),
                         ``<layer>.weight.scale`` and ``<layer>.weight.zero_point`` (float16 where that is
                         exact, else float32; one scalar when every channel shares it, else a
                         per-channel vector); every other tensor of the
                         state_dict (biases, BatchNorm, float layers, quantizer and observer buffers) as is
    packed.json          architecture, quantization scheme, fusion record, one entry per packed layer
                         (bits, shape, quantizer, bytes) and the size and SHA-256 of the tensor file

:func:`load_packed` rebuilds the model through the checkpoint machinery (architecture, ``prepare`` with the
recorded scheme, recorded BatchNorm fusion), unpacks the codes to ``(codes − zero_point) · scale`` and turns
those layers' weight quantizers off (``enabled`` = 0). Every quantizer family computes its fake-quant output
with exactly that formula, and :func:`save_packed` checks it bit for bit before packing a layer, so the
loaded model's forward equals the fake-quant model's eval forward exactly.

**Bit order** of :func:`pack_bits` (1..8 bits): a little-endian bit stream. Element ``i`` occupies stream
bits ``[i·b, (i+1)·b)``, its least significant bit first; stream bit ``k`` is bit ``k mod 8`` (LSB = 0) of
byte ``k // 8``; the last byte is zero-padded. For 9..16 bits every code is two bytes, little-endian
(low byte first): byte-aligned, so a reader needs no bit arithmetic, and no quantizer of micronet stores
more than 16 bits. More than 16 bits is refused.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from micronet.errors import CheckpointError, QuantizationError
from micronet.io import atomic_directory, read_description, resolve_directory
from micronet.models.registry import find_arch
from micronet.outputs import OutputKind, described_as

FORMAT = "micronet-packed"
FORMAT_VERSION = 1
TENSOR_FILE = "packed.safetensors"
META_FILE = "packed.json"
PACKED_OUTPUT = OutputKind("packed artifact", described_as(META_FILE, FORMAT), frozenset({TENSOR_FILE, META_FILE}))
MAX_BITS = 16
_SUFFIXES = ("packed", "scale", "zero_point")

__all__ = [
    "PackedLayer",
    "is_packed_artifact",
    "layer_size_rows",
    "load_packed",
    "pack_bits",
    "packed_layers",
    "read_packed_meta",
    "safetensors_tensor_bytes",
    "save_packed",
    "unpack_bits",
]


# ---------------------------------------------------------------------------------------------- bit streams
def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise QuantizationError(f"packing supports 1 to {MAX_BITS} bits per code (got {bits!r}): "
                                "keep wider tensors in float")
    return bits


def packed_size(numel: int, bits: int) -> int:
    """Bytes :func:`pack_bits` produces for ``numel`` codes of ``bits`` bits."""
    bits = _check_bits(bits)
    return 2 * numel if bits > 8 else math.ceil(numel * bits / 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer ``codes`` (any shape, flattened in C order) into a uint8 tensor.

    1..8 bits: dense little-endian bit stream; 9..16 bits: two bytes per code, little-endian (see the
    module docstring). Codes outside ``[0, 2**bits)`` or a non-integer dtype raise :class:`QuantizationError`.
    """
    bits = _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise QuantizationError(f"pack_bits needs integer codes (got {codes.dtype}): pass WeightCodes.codes")
    flat = codes.detach().reshape(-1).to("cpu", torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise QuantizationError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits} bits "
                                f"(got {int(flat.min())}..{int(flat.max())}): pass the codes of a {bits}-bit quantizer")
    if bits > 8:
        return torch.stack([flat & 0xFF, flat >> 8], dim=1).to(torch.uint8).reshape(-1)
    if bits == 8:
        return flat.to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8)
    stream = ((flat.to(torch.uint8).unsqueeze(1) >> shifts) & 1).reshape(-1)  # LSB of each code first
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8)
    return (stream.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.int64).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` codes as a flat int64 tensor."""
    bits = _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise QuantizationError(f"unpack_bits needs a flat uint8 tensor (got {packed.dtype}, {packed.dim()} dims)")
    if numel < 0 or packed.numel() != packed_size(numel, bits):
        raise QuantizationError(f"{packed.numel()} packed bytes cannot hold exactly {numel} codes of {bits} bits "
                                f"({packed_size(max(numel, 0), bits)} expected): the artifact is corrupted")
    data = packed.detach().to("cpu")
    if bits > 8:
        pairs = data.reshape(-1, 2).to(torch.int64)
        return pairs[:, 0] | (pairs[:, 1] << 8)
    if bits == 8:
        return data.to(torch.int64)
    stream = ((data.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[: numel * bits]
    weights = torch.tensor([1 << k for k in range(bits)], dtype=torch.int64)
    return (stream.reshape(numel, bits).to(torch.int64) * weights).sum(dim=1)


# ---------------------------------------------------------------------------------------------- artifacts
@dataclass
class PackedLayer:
    """One layer of a packed artifact (one entry of ``packed.json``'s ``layers``)."""

    name: str
    quantizer: str
    bits: int | None
    shape: list[int]
    stored: str  # "packed" or "float"
    reason: str = ""
    channel_axis: int | None = None  # axis of a per-channel scale / zero point; None: one scalar each
    scale_axis: int | None = None
    zero_point_axis: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.numel

    @property
    def theoretical_bytes(self) -> float:
        """bits × count / 8: the size of the codes alone."""
        return (self.bits or 32) * self.numel / 8

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PackedLayer:
        try:
            return cls(**data)
        except TypeError as exc:
            raise CheckpointError(f"invalid layer entry in {META_FILE} ({exc}): the artifact is corrupted") from exc


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from micronet.compression.quantization.core.quantizers import Quantizer

    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "weight_quantizer", None), Quantizer) and isinstance(getattr(m, "weight", None), torch.Tensor)]


def _smallest_exact(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float16 when that stores every value exactly (binary and ternary α are kept on the float16
    grid for this reason), else float32."""
    half = t.to(torch.float16)
    return half if bool(torch.isfinite(half).all()) and torch.equal(half.to(torch.float32), t) else t


def _compact(t: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    """A broadcast scale / zero point as stored: a 0-dim scalar when all equal, else (C,) plus its axis;
    float16 when exact."""
    t = t.detach().to("cpu", torch.float32)
    flat = t.reshape(-1)
    if flat.numel() == 0 or bool((flat == flat[0]).all()):
        return _smallest_exact(flat[0].clone() if flat.numel() else torch.zeros(())), None
    axes = [i for i, size in enumerate(t.shape) if size != 1]
    if len(axes) != 1:
        raise QuantizationError(f"a scale or zero point of shape {list(t.shape)} varies along several axes: "
                                "only per-tensor and per-channel parameters can be packed")
    return _smallest_exact(flat.clone()), axes[0]


def _expand(t: torch.Tensor, axis: int | None, ndim: int) -> torch.Tensor:
    if axis is None:
        return t.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


@torch.no_grad()
def _pack_layer(name: str, module: nn.Module) -> tuple[PackedLayer, dict[str, torch.Tensor]]:
    """Pack ``module.weight`` when its codes reproduce what the module computes with, bit for bit."""
    from micronet.compression.quantization.core.bn_fold import QuantBNFuseConv2d

    quantizer = module.weight_quantizer
    weight = module.weight.detach()
    layer = PackedLayer(name, type(quantizer).__name__, int(quantizer.bits), list(weight.shape), "float")
    if isinstance(module, QuantBNFuseConv2d):
        layer.reason = "BatchNorm-folding conv: fuse the model first (micronet fuse) to pack its folded weight"
        return layer, {}
    if weight.dtype != torch.float32:
        layer.reason = f"{weight.dtype} weight: packing reproduces float32 weights only"
        return layer, {}
    enabled = bool(quantizer.enabled.item())
    try:
        codes = quantizer.weight_codes(weight)
        target = quantizer.quantize(weight) if enabled else weight  # a disabled quantizer uses the weight as is
    except QuantizationError as exc:
        layer.reason = str(exc)
        return layer, {}
    if not torch.equal(codes.dequantize().expand_as(target), target):
        layer.reason = ("weight quantizer is off and the weight is not on its grid" if not enabled
                        else "codes do not reproduce the fake-quantized weight exactly")
        return layer, {}
    scale, layer.scale_axis = _compact(codes.scale)
    zero_point, layer.zero_point_axis = _compact(codes.zero_point)
    layer.bits, layer.stored = int(codes.bits), "packed"
    tensors = {f"{name}.weight.packed": pack_bits(codes.codes, codes.bits),
               f"{name}.weight.scale": scale, f"{name}.weight.zero_point": zero_point}
    return layer, tensors


def packed_layers(model: nn.Module) -> tuple[list[PackedLayer], dict[str, torch.Tensor]]:
    """The per-layer plan and the tensors :func:`save_packed` writes (packed codes replace ``.weight``)."""
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    layers: list[PackedLayer] = []
    for name, module in _weight_layers(model):
        layer, tensors = _pack_layer(name, module)
        layers.append(layer)
        if layer.stored == "packed":
            clash = [k for k in tensors if k in state]
            if clash:
                raise QuantizationError(f"state_dict already has {clash[0]}: rename that tensor before packing")
            del state[f"{name}.weight"]
            state.update(tensors)
    return layers, state


def fold_for_packing(model: nn.Module) -> tuple[nn.Module, Any]:
    """``model`` with its QAT BN-folding convs fused (as ``micronet fuse`` does) and the fusion report, or
    ``(model, None)`` without any: a BN-folding conv's codes depend on its BatchNorm, so only the fused conv
    has integer codes to pack (unfused, it would be stored in float32)."""
    from micronet.compression.fusion import fuse
    from micronet.compression.quantization.core.bn_fold import QuantBNFuseConv2d

    if not any(isinstance(module, QuantBNFuseConv2d) for module in model.modules()):
        return model, None
    return fuse(model)


def save_packed(model: nn.Module, path: str | Path, *, data_info: Any = None,
                metrics: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a registry model, quantized or not) as a packed artifact directory, atomically.

    Returns the path. Layers whose codes cannot reproduce the weight exactly stay float and are listed in
    ``packed.json`` with the reason, so the artifact always computes what the model computes.
    """
    from micronet.engine.checkpoint import file_sha256, structure_meta, versions_record

    arch = find_arch(model)
    if arch is None:
        raise CheckpointError("save_packed needs a model built by micronet.models.build_model (it records the "
                              "architecture so the artifact can be rebuilt): build it with build_model('nin') or, "
                              "for your own network, build_model('my_nets.py:build')")
    layers, state = packed_layers(model)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **structure_meta(model),
        "data": data_info.to_json() if data_info is not None else None,
        "metrics": metrics or {},
        "bit_order": "1-8 bits: little-endian bit stream (LSB of code 0 = bit 0 of byte 0); 9-16 bits: uint16 little-endian",
        "layers": [layer.to_json() for layer in layers],
        "versions": versions_record(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_directory(path, PACKED_OUTPUT) as staging:
        save_file(state, str(staging / TENSOR_FILE), metadata={"format": FORMAT})
        meta["files"] = {TENSOR_FILE: {"bytes": (staging / TENSOR_FILE).stat().st_size,
                                       "sha256": file_sha256(staging / TENSOR_FILE)}}
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return Path(path)


def is_packed_artifact(path: str | Path) -> bool:
    return (resolve_directory(path) / META_FILE).is_file()


def read_packed_meta(path: str | Path) -> dict[str, Any]:
    """Parse and check ``packed.json`` (format, version); nothing else is read."""
    path = resolve_directory(path)
    meta_path = path / META_FILE
    if path.is_file() or not meta_path.is_file():
        raise CheckpointError(f"{path} is not a packed artifact (no {META_FILE}): write one with `micronet pack`")
    return read_description(meta_path, fmt=FORMAT, version=FORMAT_VERSION, what="packed artifact")


def load_packed(path: str | Path) -> nn.Module:
    """Rebuild the model of a packed artifact; packed layers hold exactly their dequantized codes and
    their weight quantizers are off, so the forward equals the saved fake-quant model's eval forward."""
    from micronet.compression.restore import restore_model
    from micronet.engine.checkpoint import Checkpoint, load_tensor_file

    path = resolve_directory(path)
    meta = read_packed_meta(path)
    tensors = load_tensor_file(path / TENSOR_FILE, (meta.get("files") or {}).get(TENSOR_FILE))
    layers = [PackedLayer.from_json(entry) for entry in meta.get("layers", [])]
    state = dict(tensors)
    packed = [layer for layer in layers if layer.stored == "packed"]
    for layer in packed:
        keys = [f"{layer.name}.weight.{suffix}" for suffix in _SUFFIXES]
        missing = [k for k in keys if k not in state]
        if missing:
            raise CheckpointError(f"{path / TENSOR_FILE} lacks {missing[0]} listed in {META_FILE}: the artifact is corrupted")
        blob, scale, zero_point = (state.pop(k) for k in keys)
        ndim = len(layer.shape)
        codes = unpack_bits(blob, int(layer.bits), layer.numel).reshape(layer.shape)
        try:
            weight = (codes.to(torch.float32) - _expand(zero_point.float(), layer.zero_point_axis, ndim)) \
                * _expand(scale.float(), layer.scale_axis, ndim)
        except RuntimeError as exc:
            raise CheckpointError(f"scale or zero point of {layer.name} does not fit its weight ({exc}): "
                                  "the artifact is corrupted") from exc
        state[f"{layer.name}.weight"] = weight.expand(layer.shape).contiguous()
    model = restore_model(Checkpoint(path, meta, state))
    modules = dict(model.named_modules())
    for layer in packed:
        modules[layer.name].weight_quantizer.enabled.fill_(0)
    model.eval()
    return model


def safetensors_tensor_bytes(file: str | Path) -> dict[str, int]:
    """Bytes each tensor occupies in a safetensors file, read from its header's data offsets."""
    file = Path(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{file} is not a safetensors file (too short)")
        size = int.from_bytes(head, "little")
        if size > file.stat().st_size:
            raise CheckpointError(f"{file} has a header larger than the file: it is truncated or not safetensors")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{file} has an unreadable safetensors header ({exc})") from exc
    return {name: int(entry["data_offsets"][1]) - int(entry["data_offsets"][0])
            for name, entry in header.items() if name != "__metadata__"}


def layer_size_rows(model: nn.Module, tensor_file: str | Path) -> list[dict[str, Any]]:
    """Per quantized layer (weight quantizer under 32 bits): bytes its weight takes in ``tensor_file``
    (packed codes + scale + zero point, or the float tensor), measured from the safetensors header, next
    to the theoretical bits × count / 8 and the FP32 size; a last row holds the totals."""
    sizes = safetensors_tensor_bytes(tensor_file)
    rows: list[dict[str, Any]] = []
    totals = {"disk": 0, "theory": 0.0, "fp32": 0, "params": 0}
    for name, module in _weight_layers(model):
        bits = int(module.weight_quantizer.bits)
        if bits >= 32:
            continue
        numel = module.weight.numel()
        keys = [f"{name}.weight.{suffix}" for suffix in _SUFFIXES]
        packed = all(k in sizes for k in keys)
        disk = sum(sizes[k] for k in keys) if packed else sizes.get(f"{name}.weight", 0)
        theory, fp32 = bits * numel / 8, 4 * numel
        for key, value in (("disk", disk), ("theory", theory), ("fp32", fp32), ("params", numel)):
            totals[key] += value
        rows.append({"layer": name, "quantizer": f"{type(module.weight_quantizer).__name__} {bits}b",
                     "stored": "packed" if packed else "float32", "params": numel, "on disk (B)": disk,
                     "bits x count (B)": round(theory, 1), "FP32 (B)": fp32,
                     "FP32 / disk": f"{fp32 / disk:.2f}" if disk else "-"})
    if rows:
        rows.append({"layer": "total (quantized layers)", "quantizer": "", "stored": "", "params": totals["params"],
                     "on disk (B)": totals["disk"], "bits x count (B)": round(totals["theory"], 1),
                     "FP32 (B)": totals["fp32"],
                     "FP32 / disk": f"{totals['fp32'] / totals['disk']:.2f}" if totals["disk"] else "-"})
    return rows
