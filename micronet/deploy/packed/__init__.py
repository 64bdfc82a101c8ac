"""Bit-packed XNOR-popcount runtime for binary networks (wbwtab W=2 A=2).

``compile_packed(model)`` returns a module whose binary convolutions run on packed sign bits with C++
kernels (AVX-512BW, AVX-512 VPOPCNTDQ, AVX2 or scalar, chosen at run time) or their pure-torch twin;
see :mod:`.compiler` for what is packed and :mod:`.kernels` for the kernels and their selection.
"""

from micronet.deploy.packed.compiler import PackedModel, PackedReport, compile_packed, set_isa
from micronet.deploy.packed.kernels import ISA_ENV, ISAS, PackedBits, PackedRuntimeWarning, available_isas, resolve_isa

__all__ = ["ISAS", "ISA_ENV", "PackedBits", "PackedModel", "PackedReport", "PackedRuntimeWarning", "available_isas",
           "compile_packed", "resolve_isa", "set_isa"]
