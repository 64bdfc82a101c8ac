"""Model registry: lenet, nin, nin_bireal, nin_gc, resnet20, resnet56 and mobilenetv2.

``build_model(name, num_classes=10, in_channels=3, cfg=None)`` returns a freshly initialised model
carrying ``model.arch`` (a :class:`ModelArch`), so that a checkpoint can rebuild the same, possibly
pruned, network. Each model's docstring documents its cfg layout. All models return raw class scores
(no softmax) and accept 1×28×28 and 3×32×32 inputs (pass ``in_channels``).

The user's own network is ``build_model("my_nets.py:build", ...)`` (or ``"mypkg.nets:Net"``), see
:mod:`micronet.models.external`; ``load_weights_file(model, "weights.pt")`` loads its trained state dict.

Initialisation (:func:`micronet.models.layers.init_weights`): Conv2d kaiming_normal_(fan_out, relu)
with zero bias; BatchNorm γ = 1, β = 0; Linear N(0, 0.01) with zero bias.
"""

from micronet.models import lenet, mobilenetv2, nin, nin_bireal, nin_gc, resnet
from micronet.models.external import ModelImport, is_model_spec
from micronet.models.registry import (
                                      ModelArch,
                                      attach_arch,
                                      build_model,
                                      default_cfg,
                                      find_arch,
                                      list_models,
                                      model_arch,
                                      register_model,
)
from micronet.models.state_dict import load_state_dict_file, load_weights_file

__all__ = ["ModelArch", "ModelImport", "attach_arch", "build_model", "default_cfg", "find_arch", "is_model_spec",
           "list_models", "load_state_dict_file", "load_weights_file", "model_arch", "register_model"]

register_model("lenet", lambda k, c, cfg: lenet.LeNet(k, c, cfg), lenet.DEFAULT_CFG)
register_model("nin", lambda k, c, cfg: nin.NIN(k, c, cfg), nin.DEFAULT_CFG)
register_model("nin_bireal", lambda k, c, cfg: nin_bireal.BiRealNIN(k, c, cfg), nin_bireal.DEFAULT_CFG)
register_model("nin_gc", lambda k, c, cfg: nin_gc.NINGC(k, c, cfg), nin_gc.DEFAULT_CFG)
register_model("resnet20", lambda k, c, cfg: resnet.resnet20(k, c, cfg), resnet.default_resnet_cfg(3))
register_model("resnet56", lambda k, c, cfg: resnet.resnet56(k, c, cfg), resnet.default_resnet_cfg(9))
register_model("mobilenetv2", lambda k, c, cfg: mobilenetv2.MobileNetV2(k, c, cfg), mobilenetv2.DEFAULT_CFG)
