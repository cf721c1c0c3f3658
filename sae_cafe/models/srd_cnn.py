"""Family surgery for SRD on CNNs: build the stage graph of torchvision ResNet/VGG and plain Sequential nets.

BatchNorm is folded into the preceding conv; residual adds become extra branches of the block's output
node; max-pools are attached to the branches that consume them; the head (pools, flatten, MLP) is kept as
modules. Any module without a rule is an :class:`UnsupportedModuleError` naming it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import UnsupportedModuleError
from ..srd.graph import (
    Branch,
    ConvSpec,
    Head,
    MaxPoolSpec,
    SRDGraph,
    Stage,
    avgpool_spec,
    conv_bn_forward,
    conv_spec,
)
from .base import ACTIVATIONS

PASS_THROUGH = (nn.Dropout, nn.Identity)
HEAD_MODULES = (nn.Linear, nn.Dropout, nn.Identity, nn.Flatten, *ACTIVATIONS)


def activation_fn(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Element-wise activation as a function that never writes into its input."""
    if type(m) is nn.ReLU:  # subclasses (e.g. a softplus surrogate during an attack) run their own forward
        return torch.relu
    if getattr(m, "inplace", False):
        return lambda z: m(z.clone())
    return m


def _check_head(modules: list[nn.Module], where: str) -> list[nn.Module]:
    for m in modules:
        if not isinstance(m, HEAD_MODULES):
            raise UnsupportedModuleError(f"{where}: module {type(m).__name__} has no SRD head rule (supported: "
                                         "Linear, Dropout, Identity, Flatten and element-wise activations)")
    return modules


def _head_pool(pools: list[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    def pool(v: torch.Tensor) -> torch.Tensor:
        for m in pools:
            v = m(v)
        return v if v.ndim == 4 else v.view(v.shape[0], -1, 1, 1)
    return pool


def _walk_features(modules: list[tuple[str, nn.Module]], source: str, dtype: torch.dtype,
                   stages: list[Stage], layer_nodes: dict[str, str]) -> tuple[str, list[tuple[str, nn.Module]]]:
    """Stages of a conv/BN/act/pool sequence; returns the last node and the unconsumed tail (the head)."""
    pending_pool: MaxPoolSpec | None = None
    conv: tuple[str, nn.Module] | None = None
    bn: nn.BatchNorm2d | None = None
    channels = None
    for pos, (name, m) in enumerate(modules):
        if isinstance(m, nn.Conv2d):
            if conv is not None:
                raise UnsupportedModuleError(f"{name}: two convolutions without an activation in between")
            conv, bn = (name, m), None
        elif isinstance(m, nn.BatchNorm2d):
            if conv is None or bn is not None:
                raise UnsupportedModuleError(f"{name}: BatchNorm2d not directly after a Conv2d")
            bn = m
        elif isinstance(m, ACTIVATIONS):
            if conv is None:
                raise UnsupportedModuleError(f"{name}: activation without a preceding convolution")
            spec, bias = conv_spec(conv[1], bn, conv[0], dtype)
            exact = conv_bn_forward(conv[1], bn, dtype)
            stages.append(Stage(name, [Branch(source, spec, pending_pool, bias, exact)], activation_fn(m)))
            layer_nodes[name] = name
            source, pending_pool, channels, conv = name, None, conv[1].out_channels, None
        elif isinstance(m, nn.MaxPool2d):
            if conv is not None or pending_pool is not None:
                raise UnsupportedModuleError(f"{name}: MaxPool2d must follow an activation")
            pending_pool = MaxPoolSpec.from_module(m, name)
        elif isinstance(m, PASS_THROUGH):
            continue
        elif isinstance(m, nn.AvgPool2d) and conv is None and pending_pool is None and channels is not None \
                and any(isinstance(later, nn.Conv2d) for _, later in modules[pos + 1:]):
            # a pooled map feeding a conv is its own node: each pooled PFV mixes its window's PFVs
            stages.append(Stage(name, [Branch(source, avgpool_spec(m, channels, name, dtype))], None))
            source = name
        elif isinstance(m, (nn.Flatten, nn.Linear, nn.AdaptiveAvgPool2d, nn.AvgPool2d)) and conv is None:
            tail = ([("pool", pending_pool)] if pending_pool is not None else []) + list(modules[pos:])
            return source, tail
        else:
            raise UnsupportedModuleError(f"{name}: module {type(m).__name__} has no SRD rule")
    if conv is not None:
        raise UnsupportedModuleError(f"{conv[0]}: convolution without an activation after it")
    return source, ([("pool", pending_pool)] if pending_pool is not None else [])


def _pool_module(spec: MaxPoolSpec) -> nn.Module:
    return nn.MaxPool2d(spec.kernel, spec.stride, spec.padding, spec.dilation)


def _split_head(tail: list[tuple[str, nn.Module | MaxPoolSpec]], where: str) -> Head | tuple:
    pools, mlp = [], []
    for name, m in tail:
        if isinstance(m, MaxPoolSpec):
            pools.append(_pool_module(m))
        elif not mlp and isinstance(m, (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Flatten,
                                        *PASS_THROUGH)):
            pools.append(m)
        elif isinstance(m, nn.Sequential):
            mlp += _check_head(list(m), f"{where}.{name}")
        else:
            mlp += _check_head([m], f"{where}.{name}")
    if not any(isinstance(m, nn.Linear) for m in mlp):
        raise UnsupportedModuleError(f"{where}: no Linear classifier found after the last conv stage")
    return pools, mlp


def build_vgg_graph(model: nn.Module, dtype: torch.dtype) -> SRDGraph:
    """torchvision VGG: features → stages; features' last pool + avgpool + classifier → head."""
    stages: list[Stage] = []
    nodes: dict[str, str] = {}
    feats = [(f"features.{i}", m) for i, m in enumerate(model.features)]
    top, tail = _walk_features(feats, "input", dtype, stages, nodes)
    pools, mlp = _split_head(tail + [("avgpool", model.avgpool), ("flatten", nn.Flatten()),
                                     ("classifier", model.classifier)], "vgg")
    return SRDGraph(stages, Head(top, _head_pool(pools), mlp), nodes)


def build_sequential_graph(model: nn.Sequential, dtype: torch.dtype) -> SRDGraph:
    """A plain conv net: Conv/BN/act/MaxPool stages, then pools/flatten/Linear/act/dropout as the head."""
    stages: list[Stage] = []
    nodes: dict[str, str] = {}
    top, tail = _walk_features(list(model.named_children()), "input", dtype, stages, nodes)
    pools, mlp = _split_head(tail, "sequential")
    return SRDGraph(stages, Head(top, _head_pool(pools), mlp), nodes)


def _block_stages(name: str, block: nn.Module, source: str, pool: MaxPoolSpec | None, dtype: torch.dtype
                  ) -> list[Stage]:
    """Stages of a torchvision BasicBlock/Bottleneck; the output node is the block name."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if isinstance(block, Bottleneck):
        convs = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    elif isinstance(block, BasicBlock):
        convs = [("conv1", "bn1"), ("conv2", "bn2")]
    else:
        raise UnsupportedModuleError(f"{name}: residual block type {type(block).__name__} has no SRD rule")
    stages, src, src_pool = [], source, pool
    for c, b in convs[:-1]:
        spec, bias = conv_spec(getattr(block, c), getattr(block, b), f"{name}.{c}", dtype)
        exact = conv_bn_forward(getattr(block, c), getattr(block, b), dtype)
        node = f"{name}.{b}"
        stages.append(Stage(node, [Branch(src, spec, src_pool, bias, exact)], activation_fn(block.relu)))
        src, src_pool = node, None
    c, b = convs[-1]
    spec, bias = conv_spec(getattr(block, c), getattr(block, b), f"{name}.{c}", dtype)
    main = Branch(src, spec, None, bias, conv_bn_forward(getattr(block, c), getattr(block, b), dtype))
    if block.downsample is not None:
        ds = block.downsample
        if not (isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d)
                and isinstance(ds[1], nn.BatchNorm2d)):
            raise UnsupportedModuleError(f"{name}.downsample: only Conv2d + BatchNorm2d downsampling is supported")
        dspec, dbias = conv_spec(ds[0], ds[1], f"{name}.downsample.0", dtype)
        skip = Branch(source, dspec, pool, dbias, conv_bn_forward(ds[0], ds[1], dtype))
    else:
        skip = Branch(source, None, pool, None)
    stages.append(Stage(name, [main, skip], activation_fn(block.relu)))
    return stages


def build_resnet_graph(model: nn.Module, dtype: torch.dtype) -> SRDGraph:
    """torchvision ResNet: stem conv+bn → ``relu`` node; maxpool attached to layer1.0's branches; blocks."""
    for extra in ("conv1", "bn1", "relu", "maxpool", "avgpool", "fc"):
        if not hasattr(model, extra):
            raise UnsupportedModuleError(f"ResNet without a {extra!r} module is not supported")
    if not isinstance(model.maxpool, nn.MaxPool2d):
        raise UnsupportedModuleError(f"maxpool: {type(model.maxpool).__name__} has no SRD rule")
    spec, bias = conv_spec(model.conv1, model.bn1, "conv1", dtype)
    stages = [Stage("relu", [Branch("input", spec, None, bias, conv_bn_forward(model.conv1, model.bn1, dtype))],
                    activation_fn(model.relu))]
    nodes = {"relu": "relu"}
    src, pool = "relu", MaxPoolSpec.from_module(model.maxpool, "maxpool")
    for stage_name in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(model, stage_name)):
            name = f"{stage_name}.{i}"
            stages += _block_stages(name, block, src, pool, dtype)
            nodes[name] = name
            src, pool = name, None
        nodes[stage_name] = src
    pools, mlp = _split_head([("avgpool", model.avgpool), ("flatten", nn.Flatten()), ("fc", model.fc)], "resnet")
    return SRDGraph(stages, Head(src, _head_pool(pools), mlp), nodes)


__all__ = ["ConvSpec", "activation_fn", "avgpool_spec", "build_resnet_graph", "build_sequential_graph",
           "build_vgg_graph"]
