"""micronet: compress neural networks and deploy them.

The whole life of a model, from the top level (each name is the library function itself, imported on first
use, so ``import micronet`` stays instant)::

    import micronet as mn

    model = mn.build_model("my_nets.py:Net", num_classes=10, in_channels=1)   # or a registry name: "nin"
    mn.load_weights_file(model, "net.pt")                 # your trained state dict (.safetensors / .pt / .pth)
    result = mn.fit(model, mn.TrainConfig(epochs=5), train_loader, val_loader)    # train or fine-tune
    small = mn.prune(model, example_input, percent=0.5)   # physically smaller copy (channel pruning)
    fused, report = mn.fuse(small)                        # BatchNorm folded into the convolutions
    q = mn.prepare(small, mn.iao_scheme(a_bits=8))        # fake-quantized copy (also dorefa_/wbwtab_scheme)
    mn.calibrate(q, calibration_loader, num_batches=32)   # post-training quantization: observe, then freeze
    mn.save_checkpoint("runs/q", q)                       # safetensors + JSON, rebuilt by mn.load_model
    q = mn.load_model("runs/q")                           # the model with its pruning/fusion/quantization
    mn.export(q, "q.onnx", example_input)                 # ONNX (QDQ int8 when quantized) for ONNX Runtime
    mn.evaluate(q, test_loader)                           # {"loss", "acc", "samples"}

The module paths these come from (``micronet.compression.quantization.core.prepare`` …) keep working.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "2.0.0.dev0"

# name → module that defines it; resolved on first access (PEP 562), so importing micronet imports no torch.
_API = {
    "build_model": "micronet.models",
    "load_weights_file": "micronet.models",
    "fit": "micronet.engine",
    "evaluate": "micronet.engine",
    "TrainConfig": "micronet.engine",
    "save_checkpoint": "micronet.engine",
    "load_model": "micronet.engine",
    "prune": "micronet.compression.pruning",
    "fuse": "micronet.compression.fusion",
    "prepare": "micronet.compression.quantization.core",
    "calibrate": "micronet.compression.quantization.core",
    "iao_scheme": "micronet.compression.quantization.wqaq.iao.quantize",
    "dorefa_scheme": "micronet.compression.quantization.wqaq.dorefa.quantize",
    "wbwtab_scheme": "micronet.compression.quantization.wbwtab.quantize",
    "export": "micronet.deploy.onnx",
}

__all__ = ["__version__", *_API, "quant_test_auto", "quant_test_manual"]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later accesses skip this hook
        return value
    raise AttributeError(f"module 'micronet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


def quant_test_manual(method: str = "iao"):
    """Build the original's hand-quantized LeNet examples and check they compute (method: iao, dorefa, wbwtab)."""
    from micronet.compression.quantization.examples import quant_test_manual as run

    return run(method)


def quant_test_auto(method: str = "iao"):
    """Quantize the original's LeNet with ``prepare`` and check it computes (method: iao, dorefa, wbwtab)."""
    from micronet.compression.quantization.examples import quant_test_auto as run

    return run(method)
