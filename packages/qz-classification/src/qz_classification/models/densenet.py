"""Quantizable DenseNet.

DenseNet is pre-activation (BN -> ReLU -> conv): its BatchNorms follow concatenations, not
convolutions, so most cannot fold into a conv. ``conv1 -> norm2 -> relu2`` and the stem's
``conv0 -> norm0 -> relu0`` fuse as usual. The other BN-ReLU pairs (each dense layer's
``norm1/relu1``, each transition's ``norm/relu``, the final ``norm5`` and ReLU) fuse by default
into torch's ``BNReLU2d`` (``bn_relu='bn'``); ``bn_relu='conv'`` fuses each into a depthwise 1x1
convolution carrying the BatchNorm's affine, followed by ReLU (a quantized ``ConvReLU2d``).

Measured on densenet121, 224x224, batch 1, one thread (shared machine, medians):
FP32 604 ms; x86 INT8 'bn' 257 ms, 'conv' 1520 ms (fbgemm has no fast depthwise 1x1 kernel);
|INT8 - FP32| about equal for both forms. torch's ONNX exporter has no symbolic for quantized
BatchNorm: qz's (``qz_core.onnx_export``) writes it as an int8 depthwise 1x1 convolution, so
onnxruntime runs both forms as QLinearConv (it ran 'bn' as float multiply-adds: 176 ms against
125-144 ms for 'conv').

Every concatenation runs through ``FloatFunctional.cat``, which requantizes its inputs to one
scale (``torch.cat`` on quantized tensors of different scales is wrong).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.ao.nn import quantized as nnq
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models import densenet as tv
from torchvision.models.densenet import DenseNet, _DenseBlock, _DenseLayer, _Transition

from qz_classification._common import TASK, imagenet_preprocess, ratio_target
from qz_core import BuildContext, LoadedWeights, ModelSpec, define_model, fuse_modules
from qz_core.builder import read_weights_default
from qz_core.errors import invalid_choice

__all__ = [
    "BN_RELU_FORMS",
    "QuantizableDenseLayer",
    "QuantizableDenseBlock",
    "QuantizableDenseNet",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
]

BN_RELU_FORMS = ("bn", "conv")


# torchvision's DenseNet checkpoints name dense-layer parameters 'norm.1', 'conv.2', ...
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def fuse_bn_relu(norm: nn.BatchNorm2d, relu: nn.Module, is_qat: bool, form: str = "bn") -> nn.Module:
    """Fuses a BN-ReLU pair not preceded by a conv into one module.

    ``form='conv'`` puts a depthwise 1x1 convolution with unit weights in front of ``norm`` and
    fuses the three (conv-bn-relu): PTQ folds the BatchNorm into the conv; QAT keeps it
    trainable. ``form='bn'`` gives torch's ``BNReLU2d``.
    """
    if form == "bn":
        group = nn.Sequential(norm, relu)
    elif form == "conv":
        channels = norm.num_features
        conv = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
        nn.init.ones_(conv.weight)
        conv.to(norm.weight.device)
        group = nn.Sequential(conv, norm, relu)
    else:
        raise invalid_choice("bn_relu form", form, BN_RELU_FORMS)
    fuse_modules(group, [[str(i) for i in range(len(group))]], is_qat)
    return group[0]


class QuantizableDenseLayer(_DenseLayer):
    """Dense layer whose input concatenation runs through ``FloatFunctional``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cat = FloatFunctional()
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()

    def bn_function(self, inputs: list[Tensor]) -> Tensor:
        return self.conv1(self.relu1(self.norm1(self.cat.cat(inputs, 1))))

    def forward(self, inputs: list[Tensor]) -> Tensor:
        """The new features from all previous ones (torchvision's forward, with a list-only signature)."""
        if self.memory_efficient and self.any_requires_grad(inputs):
            if torch.jit.is_scripting():
                raise RuntimeError("Memory-efficient DenseNet does not run in TorchScript.")
            bottleneck = self.call_checkpoint_bottleneck(inputs)
        else:
            bottleneck = self.bn_function(inputs)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features

    def fuse(self, is_qat: bool, form: str) -> None:
        """Fuses ``norm1-relu1`` (see ``fuse_bn_relu``) and ``conv1-norm2-relu2``."""
        self.norm1 = fuse_bn_relu(self.norm1, self.relu1, is_qat, form)
        self.relu1 = nn.Identity()
        fuse_modules(self, [["conv1", "norm2", "relu2"]], is_qat)


class QuantizableDenseBlock(_DenseBlock):
    """Dense block of ``QuantizableDenseLayer``s; the output concatenation uses ``FloatFunctional``."""

    def __init__(
        self,
        num_layers: int,
        num_input_features: int,
        bn_size: int,
        growth_rate: int,
        drop_rate: float,
        memory_efficient: bool = False,
    ) -> None:
        nn.ModuleDict.__init__(self)
        for i in range(num_layers):
            layer = QuantizableDenseLayer(
                num_input_features + i * growth_rate,
                growth_rate=growth_rate,
                bn_size=bn_size,
                drop_rate=drop_rate,
                memory_efficient=memory_efficient,
            )
            self.add_module(f"denselayer{i + 1}", layer)
        self.cat = FloatFunctional()

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for layer in self.values():
            if hasattr(layer, "bn_function"):  # a dense layer, not ``cat``; TorchScript resolves it statically
                features.append(layer(features))
        return self.cat.cat(features, 1)


class QuantizableDenseNet(DenseNet):
    """torchvision's DenseNet with quantizable blocks, between a QuantStub and a DeQuantStub.

    Args:
        bn_relu: how BN-ReLU pairs without a preceding conv fuse: ``'bn'`` (``BNReLU2d``,
            fastest in PyTorch) or ``'conv'`` (depthwise 1x1 conv + ReLU). Both export to ONNX as
            the same int8 depthwise convolution.
        *args, **kwargs: torchvision ``DenseNet`` arguments.
    """

    def __init__(self, *args: Any, bn_relu: str = "bn", **kwargs: Any) -> None:
        if bn_relu not in BN_RELU_FORMS:
            raise invalid_choice("bn_relu form", bn_relu, BN_RELU_FORMS)
        super().__init__(*args, **kwargs)
        self.bn_relu = bn_relu
        # DenseNet builds its blocks from module-level classes: swap in quantizable ones,
        # keeping torchvision's initial weights (same seed, same model).
        for name, block in list(self.features.named_children()):
            if isinstance(block, _DenseBlock):
                first = block.denselayer1
                new = QuantizableDenseBlock(
                    len(block),
                    first.norm1.num_features,
                    first.conv1.out_channels // first.conv2.out_channels,
                    first.conv2.out_channels,
                    first.drop_rate,
                    first.memory_efficient,
                )
                new.load_state_dict(block.state_dict())
                setattr(self.features, name, new)
        self.relu = nn.ReLU()
        self.quant = QuantStub()
        self.dequant = DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.features(self.quant(x)))
        out = F.adaptive_avg_pool2d(out, (1, 1)).flatten(1)
        return self.dequant(self.classifier(out))

    def __prepare_scriptable__(self) -> QuantizableDenseNet:
        """What ``torch.jit.script`` compiles: a copy whose INT8 BatchNorms hold 0-dim output qparams.

        torch's convert leaves 1-element ``scale``/``zero_point`` tensors on quantized BatchNorms,
        which the TorchScript kernel call rejects. The model itself keeps its state-dict shapes.
        """
        if not any(isinstance(m, nnq.BatchNorm2d) and m.scale.dim() for m in self.modules()):
            return self
        model = copy.deepcopy(self)
        for module in model.modules():
            if isinstance(module, nnq.BatchNorm2d):
                module.scale = module.scale.reshape(())
                module.zero_point = module.zero_point.reshape(())
        return model

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Fuses the dense layers and transitions, and with ``level='all'`` the stem and ``norm5``."""
        form = self.bn_relu
        for module in self.modules():
            if isinstance(module, QuantizableDenseLayer):
                module.fuse(is_qat, form)
            elif isinstance(module, _Transition):
                module.norm = fuse_bn_relu(module.norm, module.relu, is_qat, form)
                module.relu = nn.Identity()
        if level == "all":
            fuse_modules(self.features, [["conv0", "norm0", "relu0"]], is_qat)
            self.features.norm5 = fuse_bn_relu(self.features.norm5, self.relu, is_qat, form)
            self.relu = nn.Identity()


def remap_legacy_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Renames torchvision's legacy dense-layer keys (``norm.1`` -> ``norm1``), as torchvision does.

    The legacy checkpoints also predate BatchNorm's ``num_batches_tracked``, which
    ``BatchNorm2d`` itself sets to 0 when loading them; qz's strict loader wants it present.
    """
    state = {"".join(m.groups()) if (m := _LEGACY_KEY.match(k)) else k: v for k, v in state_dict.items()}
    for key in [k for k in state if k.endswith(".running_var")]:
        state.setdefault(key.removesuffix("running_var") + "num_batches_tracked", torch.tensor(0))
    return state


def read_densenet_weights(context: BuildContext) -> LoadedWeights:
    """The weights with torchvision's legacy dense-layer keys renamed; ``num_classes`` from their categories."""
    loaded = read_weights_default(context)
    return LoadedWeights(remap_legacy_keys(dict(loaded.state_dict)), loaded.model_kwargs)


def _arch(growth_rate: int, block_config: tuple[int, int, int, int], init_features: int) -> Callable[..., DenseNet]:
    return partial(QuantizableDenseNet, growth_rate, block_config, init_features)


_BASE = ModelSpec(
    name="densenet",
    task=TASK,
    family="densenet",
    make_model=_arch(32, (6, 12, 24, 16), 64),
    read_weights=read_densenet_weights,
    preprocess=imagenet_preprocess((224, 224)),
    deployed_ratio_target=ratio_target("densenet"),
    description="torchvision's DenseNet architecture; ``bn_relu`` ('bn' or 'conv') picks the BN-ReLU fusion",
)

densenet121 = define_model(
    _BASE.variant(name="densenet121", make_model=_arch(32, (6, 12, 24, 16), 64), weights_enum=tv.DenseNet121_Weights)
)
densenet161 = define_model(
    _BASE.variant(name="densenet161", make_model=_arch(48, (6, 12, 36, 24), 96), weights_enum=tv.DenseNet161_Weights)
)
densenet169 = define_model(
    _BASE.variant(name="densenet169", make_model=_arch(32, (6, 12, 32, 32), 64), weights_enum=tv.DenseNet169_Weights)
)
densenet201 = define_model(
    _BASE.variant(name="densenet201", make_model=_arch(32, (6, 12, 48, 32), 64), weights_enum=tv.DenseNet201_Weights)
)
