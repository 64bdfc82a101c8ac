"""The quantization scheme a method and its flags describe (quantize and sensitivity share it)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from micronet.errors import ConfigError
from micronet.workflows.options import option

METHODS = ["iao", "dorefa", "wbwtab"]


@dataclass(kw_only=True)
class SchemeOptions:
    """The method and the flags that describe a quantization scheme."""

    method: str = option("iao", choices=METHODS,
                         help="iao: integer-arithmetic-only affine quantization; dorefa: DoReFa k-bit; "
                              "wbwtab: binary/ternary weights and binary activations")
    w_bits: int | None = option(None, "--w-bits", type=int,
                                help="weight bits (iao 2-16, default: the --target's, 7 for portable; dorefa 1-16, "
                                     "32 = float, default 8)")
    a_bits: int = option(8, "--a-bits", type=int, help="activation bits (iao 2-16; dorefa 1-16, 32 = float)")
    W: int | None = option(None, "--W", type=int, help="wbwtab weights: 2 binary, 3 ternary, 32 float (default 2)")  # noqa: N815
    A: int | None = option(None, "--A", type=int, help="wbwtab activations: 2 binary (sign), 32 float (default 2)")  # noqa: N815
    center_weights: bool = option(False, "--center-weights", action="store_true",
                                  help="wbwtab binary weights: subtract each filter's mean over its input channels "
                                       "before the sign (the original's W_clip; lowers accuracy)")
    sign_gradient: str = option("hardtanh", "--sign-gradient", choices=["hardtanh", "approx"],
                                help="wbwtab --A 2: the sign activations' training gradient: hardtanh (pass where "
                                     "|x| < 1) or approx (Bi-Real Net's ApproxSign, max(0, 2 - 2|x|))")
    pre_scale: float = option(1.0, "--pre-scale", type=float,
                              help="dorefa: activations are clamp(x * pre_scale, 0, 1) on the k-bit grid (the "
                                   "original used 0.1)")
    q_type: int = option(0, "--q-type", type=int, choices=[0, 1], help="0 symmetric, 1 asymmetric")
    q_level: int = option(0, "--q-level", type=int, choices=[0, 1], help="0 per-channel weights, 1 per-layer")
    weight_observer: int = option(0, "--weight-observer", type=int, choices=[0, 1],
                                  help="0 min/max of current weights, 1 moving average")
    weight_range: str | None = option(None, "--weight-range", choices=["minmax", "mse"],
                                      help="--ptq: each weight tensor's range: minmax (its extremes) or mse (the "
                                           "clipping with the least squared rounding error); default: minmax")
    activation_observer: str | None = option(None, "--activation-observer",
                                             choices=["minmax", "moving_average", "percentile", "histogram"],
                                             help="override the activation observer (default: moving_average for "
                                                  "QAT, percentile for --ptq)")
    bn_fuse: bool = option(False, "--bn-fuse", action="store_true", help="fold BatchNorm into the preceding conv during QAT")
    bn_fuse_calib: bool = option(False, "--bn-fuse-calib", action="store_true",
                                 help="fold with running statistics while training")
    lsq: bool = option(False, "--lsq", action="store_true",
                       help="iao QAT: learn the scales (LSQ); symmetric only; helps at 4 bits and below")
    target: str = option("portable", "--target", choices=["portable", "vnni", "tensorrt"],
                         help="where the int8 model will run: portable = 7-bit weights, exact and fast on every x86 "
                              "CPU (AVX2, AVX-512, VNNI); vnni = 8-bit weights, exact only on CPUs with VNNI/AMX; "
                              "tensorrt = 8-bit weights and signed activations")
    signed_activations: bool = option(False, "--signed-activations", action="store_true",
                                      help="iao: int8 activations with zero point 0 everywhere, also after ReLU (what "
                                           "TensorRT accepts)")
    bn_fold_method: str | None = option(None, "--bn-fold-method", choices=["one_conv", "batch", "running"],
                                        help="how --bn_fuse trains: one_conv (default; one convolution, as torch.ao), "
                                             "batch (exact batch statistics from a second float convolution), "
                                             "running (= --bn_fuse_calib)")
    percentile: float = option(0.9999, "--percentile", type=float, help="percentile of the PTQ activation observer")
    edge_bits: int | None = option(None, "--edge-bits", type=int,
                                   help="dorefa/wbwtab: quantize the layers the preset keeps in float (the first, "
                                        "which reads the image; wbwtab's last) and the average pools at this width "
                                        "instead (8: every conv runs on integer kernels, as fast as the iao file)")


def lowbit_scheme(options: Any):
    """The DoReFa or WbWtAb scheme ``options`` describe (None for iao), after refusing flags of other methods."""
    method = options.method
    clamp = getattr(options, "clamp_weights", False)
    if method != "wbwtab" and (options.W is not None or options.A is not None or options.center_weights):
        raise ConfigError(f"--W, --A and --center-weights belong to `micronet quantize wbwtab`; {method} takes --w_bits and --a_bits")
    if method != "wbwtab" and clamp:
        raise ConfigError(f"--clamp-weights clamps binary weights of `micronet quantize wbwtab --W 2`; drop it for {method}")
    float_epochs = getattr(options, "float_weight_epochs", None)
    if method != "wbwtab" and float_epochs is not None:
        raise ConfigError(f"--float-weight-epochs belongs to `micronet quantize wbwtab --W 2/3`; drop it for {method}")
    if method != "wbwtab" and options.sign_gradient != "hardtanh":
        raise ConfigError(f"--sign-gradient belongs to `micronet quantize wbwtab --A 2`; drop it for {method}")
    from micronet.compression.quantization.core.presets import with_quantized_edges

    if method == "iao":
        if options.edge_bits is not None:
            raise ConfigError("--edge-bits belongs to dorefa and wbwtab (whose presets keep the edges float); iao "
                              "quantizes every layer at --w_bits/--a_bits already")
        return None
    if getattr(options, "ptq", False):
        raise ConfigError(f"{method} quantizers have no observers to calibrate: drop --ptq and train them (QAT)")
    iao_only = [flag for flag, on in (("--bn_fuse", options.bn_fuse), ("--bn_fuse_calib", options.bn_fuse_calib),
                                      ("--bn_fold_method", options.bn_fold_method),
                                      ("--freeze_bn_after", getattr(options, "freeze_bn_after", None) is not None),
                                      ("--lsq", options.lsq),
                                      ("--signed_activations", options.signed_activations)) if on]
    if iao_only:
        raise ConfigError(f"{' and '.join(iao_only)} apply to iao only: drop them for {method}")
    if method == "dorefa":
        from micronet.compression.quantization.wqaq.dorefa.quantize import dorefa_scheme

        scheme = dorefa_scheme(options.a_bits, 8 if options.w_bits is None else options.w_bits, pre_scale=options.pre_scale)
        return with_quantized_edges(replace(scheme, target=options.target), options.edge_bits)
    from micronet.compression.quantization.wbwtab.quantize import wbwtab_scheme

    W = 2 if options.W is None else options.W  # noqa: N806 - the original's flag name
    for flag, on in (("--center-weights", options.center_weights), ("--clamp-weights", clamp)):
        if on and W != 2:
            raise ConfigError(f"{flag} applies to binary weights (--W 2), not --W {W}")
    A = 2 if options.A is None else options.A  # noqa: N806
    epochs = getattr(options, "total_epochs", None)
    if float_epochs is not None and (W == 32 or not 1 <= float_epochs < (epochs or 0)):
        raise ConfigError(f"--float-weight-epochs {float_epochs} needs binary or ternary weights (--W 2 or 3) and "
                          f"must be at least 1 and below --epochs ({epochs}), so some epochs train the binarized weights")
    if options.sign_gradient != "hardtanh" and A != 2:
        raise ConfigError(f"--sign-gradient applies to sign activations (--A 2), not --A {A}")
    scheme = wbwtab_scheme(A=A, W=W, center=options.center_weights, sign_gradient=options.sign_gradient)
    return with_quantized_edges(replace(scheme, target=options.target), options.edge_bits)  # edge weights per target


def iao_options(options: SchemeOptions) -> dict[str, Any]:
    """The IAO preset's options (besides bit widths and ``ptq``) the scheme flags describe."""
    return dict(q_type=options.q_type, q_level=options.q_level, weight_observer=options.weight_observer,
                bn_fuse=options.bn_fuse, bn_fuse_calib=options.bn_fuse_calib, pretrained_model=True,
                percentile=options.percentile, activation_observer=options.activation_observer,
                bn_fold_method=options.bn_fold_method, learned_scale=options.lsq,
                signed_activations=options.signed_activations, target=options.target, weight_range=options.weight_range)


def build_scheme(options: SchemeOptions, lowbit: Any, *, ptq: bool):
    """The scheme ``options`` describe: ``lowbit`` (what :func:`lowbit_scheme` returned), else IAO."""
    from micronet.compression.quantization.wqaq.iao.quantize import iao_scheme

    return lowbit or iao_scheme(options.a_bits, options.w_bits, ptq=ptq, **iao_options(options))
