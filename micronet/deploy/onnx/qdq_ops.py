"""Export-only torch ops that become ONNX QuantizeLinear / DequantizeLinear / Sign nodes.

torch's exporters refuse fake-quant with a dynamic batch (dynamo) or with a −127..127 range (both), and
``torch.ops.quantized_decomposed`` lives in the deprecated ``torch.ao``. So micronet owns four tiny custom
ops and tells each exporter how to write them: a TorchScript symbolic for the legacy exporter and an
onnxscript function for the dynamo exporter. In eager mode they compute exactly what the ONNX ops compute,
so the export-form model can be checked against ONNX Runtime before anything is written.
"""

from __future__ import annotations

import torch

OPSET = 18  # QuantizeLinear with per-axis scales needs 13; 18 is the oldest both exporters write well


@torch.library.custom_op("micronet::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                        clip_min: float, clip_max: float) -> torch.Tensor:
    """``DequantizeLinear(QuantizeLinear(Clip(x, clip_min, clip_max)))`` with a scalar scale/zero point;
    the clip is skipped when it covers the whole code range of ``zero_point``'s dtype."""
    info = torch.iinfo(zero_point.dtype)
    zp = zero_point.to(torch.float32)
    q = torch.clamp(torch.round(torch.clamp(x, clip_min, clip_max) / scale) + zp, info.min, info.max)
    return (q - zp) * scale


@quantize_dequantize.register_fake
def _(x, scale, zero_point, clip_min, clip_max):
    return torch.empty_like(x)


@torch.library.custom_op("micronet::requantize_codes", mutates_args=())
def requantize_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, code_min: int, code_max: int,
                     out_scale: torch.Tensor, out_zero_point: torch.Tensor) -> torch.Tensor:
    """``DequantizeLinear(Clip(QuantizeLinear(x, scale, zero_point), code_min, code_max), out_scale,
    out_zero_point)``: the clip acts on the integer codes (an integer Clip that ONNX Runtime runs between
    its integer kernels), and the codes are read back on another grid. The clip is skipped when it covers
    the whole code range of ``zero_point``'s dtype."""
    info = torch.iinfo(zero_point.dtype)
    q = torch.clamp(torch.round(x / scale) + zero_point.to(torch.float32), info.min, info.max)
    q = torch.clamp(q, code_min, code_max)
    return (q - out_zero_point.to(torch.float32)) * out_scale


@requantize_codes.register_fake
def _(x, scale, zero_point, code_min, code_max, out_scale, out_zero_point):
    return torch.empty_like(x)


@torch.library.custom_op("micronet::dequantize", mutates_args=())
def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """``DequantizeLinear(codes, scale, zero_point, axis)`` for constant weights (int8) and biases (int32)."""
    if scale.dim() == 0:
        return (codes.to(torch.float32) - zero_point.to(torch.float32)) * scale
    shape = [1] * codes.dim()
    shape[axis] = -1
    return (codes.to(torch.float32) - zero_point.to(torch.float32).reshape(shape)) * scale.reshape(shape)


@dequantize.register_fake
def _(codes, scale, zero_point, axis):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


@torch.library.custom_op("micronet::binary_sign", mutates_args=())
def binary_sign(x: torch.Tensor) -> torch.Tensor:
    """±1 with sign(0) = +1, written as ``Sign(Sign(x) + 0.5)`` (ONNX's Sign maps 0 to 0)."""
    return torch.sign(torch.sign(x) + 0.5)


@binary_sign.register_fake
def _(x):
    return torch.empty_like(x)


def clip_covers_range(zero_point: torch.Tensor, quant_min: int, quant_max: int) -> bool:
    info = torch.iinfo(zero_point.dtype)
    return quant_min <= info.min and quant_max >= info.max


# ------------------------------------------------------------------------------ legacy (TorchScript) exporter
def _const_float(g, value: float):
    return g.op("Constant", value_t=torch.tensor(value, dtype=torch.float32))


def _quantize_dequantize_symbolic(g, x, scale, zero_point, clip_min, clip_max):
    from torch.onnx import symbolic_helper

    lo = symbolic_helper._get_const(clip_min, "f", "clip_min")
    hi = symbolic_helper._get_const(clip_max, "f", "clip_max")
    if lo > float("-inf") or hi < float("inf"):
        x = g.op("Clip", x, _const_float(g, lo), _const_float(g, hi))
    return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero_point), scale, zero_point)


_ONNX_CODE_TYPES = {"Byte": torch.uint8, "Char": torch.int8}


def _requantize_codes_symbolic(g, x, scale, zero_point, code_min, code_max, out_scale, out_zero_point):
    from torch.onnx import symbolic_helper

    lo = symbolic_helper._get_const(code_min, "i", "code_min")
    hi = symbolic_helper._get_const(code_max, "i", "code_max")
    dtype = _ONNX_CODE_TYPES[zero_point.type().scalarType()]
    codes = g.op("QuantizeLinear", x, scale, zero_point)
    info = torch.iinfo(dtype)
    if lo > info.min or hi < info.max:
        codes = g.op("Clip", codes, g.op("Constant", value_t=torch.tensor(lo, dtype=dtype)),
                     g.op("Constant", value_t=torch.tensor(hi, dtype=dtype)))
    return g.op("DequantizeLinear", codes, out_scale, out_zero_point)


def _dequantize_symbolic(g, codes, scale, zero_point, axis):
    from torch.onnx import symbolic_helper

    return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=symbolic_helper._get_const(axis, "i", "axis"))


def _binary_sign_symbolic(g, x):
    return g.op("Sign", g.op("Add", g.op("Sign", x), _const_float(g, 0.5)))


_registered = False


def register_legacy_symbolics() -> None:
    """Teach the TorchScript exporter our ops (idempotent)."""
    global _registered
    if _registered:
        return
    for name, fn in (("quantize_dequantize", _quantize_dequantize_symbolic), ("dequantize", _dequantize_symbolic),
                     ("binary_sign", _binary_sign_symbolic), ("requantize_codes", _requantize_codes_symbolic)):
        torch.onnx.register_custom_op_symbolic(f"micronet::{name}", fn, 13)
    _registered = True


# ------------------------------------------------------------------------------ dynamo exporter
def dynamo_translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``."""
    from onnxscript import opset18 as op

    def quantize_dequantize_onnx(x, scale, zero_point, clip_min: float, clip_max: float):
        if clip_min > float("-inf") or clip_max < float("inf"):
            x = op.Clip(x, op.Constant(value_float=clip_min), op.Constant(value_float=clip_max))
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)

    def requantize_codes_onnx(x, scale, zero_point, code_min: int, code_max: int, out_scale, out_zero_point):
        codes = op.QuantizeLinear(x, scale, zero_point)
        codes = op.Clip(codes, op.CastLike(op.Constant(value_int=code_min), zero_point),
                        op.CastLike(op.Constant(value_int=code_max), zero_point))
        return op.DequantizeLinear(codes, out_scale, out_zero_point)

    def dequantize_onnx(codes, scale, zero_point, axis: int):
        return op.DequantizeLinear(codes, scale, zero_point, axis=axis)

    def binary_sign_onnx(x):
        return op.Sign(op.Add(op.Sign(x), op.Constant(value_float=0.5)))

    return {
        torch.ops.micronet.quantize_dequantize.default: quantize_dequantize_onnx,
        torch.ops.micronet.dequantize.default: dequantize_onnx,
        torch.ops.micronet.binary_sign.default: binary_sign_onnx,
        torch.ops.micronet.requantize_codes.default: requantize_codes_onnx,
    }
