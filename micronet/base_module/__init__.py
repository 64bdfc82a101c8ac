"""Tensor operations as modules, so that quantizers and pruning can find and swap them."""

from micronet.base_module.op import *  # noqa: F401,F403
from micronet.base_module.op import __all__  # noqa: F401
