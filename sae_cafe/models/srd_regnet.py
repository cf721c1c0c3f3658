"""Family surgery for SRD on torchvision RegNet (RegNetX / RegNetY: group convs, squeeze-excitation).

The records and rules are those of :mod:`.srd_mobile`: each ``Conv2dNormActivation`` is one node (conv + BN
folded, its activation the node's ``act``); the SE module after the group conv ``f.b`` is folded into that
node's activation as a frozen gate (``act(z) = se(relu(z))``, the gate g fixed as part of the activation
pattern, see :mod:`.srd_mobile`); the group conv is a ``ConvSpec`` with ``groups``. A ResBottleneckBlock's
output node (the block name, activation = ``block.activation``) sums the projection ``f.c`` (conv + BN, no
activation) and the shortcut: ``proj`` (1×1 strided conv + BN) or the identity.

Layer ids: ``stem``, ``trunk_output.blockI`` (a stage = its last block), ``trunk_output.blockI.blockI-J``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from ..srd.graph import Branch, Head, SRDGraph, Stage
from .srd_cnn import activation_fn
from .srd_mobile import _cna_stage, _se_fn, _then


def _regnet_block_stages(name: str, block: nn.Module, source: str, dtype: torch.dtype) -> list[Stage]:
    from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

    f = getattr(block, "f", None)
    if type(block).__name__ != "ResBottleneckBlock" or not isinstance(f, nn.Module):
        raise UnsupportedModuleError(f"{name}: block type {type(block).__name__} has no SRD rule (supported: "
                                     "ResBottleneckBlock)")
    stages: list[Stage] = []
    src = source
    for sub, m in f.named_children():
        where = f"{name}.f.{sub}"
        if isinstance(m, Conv2dNormActivation):
            stage = _cna_stage(m, where, where, src, dtype)
            stages.append(stage)
            src = where
        elif isinstance(m, SqueezeExcitation):
            if not stages or stages[-1].act is None:
                raise UnsupportedModuleError(f"{where}: SqueezeExcitation must follow a conv with an activation")
            stages[-1].act = _then(stages[-1].act, _se_fn(m, where, dtype))
        else:
            raise UnsupportedModuleError(f"{where}: module {type(m).__name__} has no SRD rule (supported: "
                                         "Conv2dNormActivation, SqueezeExcitation)")
    if not stages or stages[-1].act is not None:
        raise UnsupportedModuleError(f"{name}.f: expected a last Conv2dNormActivation without activation")
    last = stages[-1]
    last.target = name
    if block.proj is None:
        last.branches.append(Branch(source))
    else:
        proj = _cna_stage(block.proj, f"{name}.proj", f"{name}.proj", source, dtype)
        if proj.act is not None:
            raise UnsupportedModuleError(f"{name}.proj: a projection with an activation has no SRD rule")
        last.branches += proj.branches
    last.act = activation_fn(block.activation)
    return stages


def build_regnet_graph(model: nn.Module, dtype: torch.dtype) -> SRDGraph:
    """torchvision RegNet: ``stem`` node, ResBottleneckBlocks, global average pool + ``fc`` head."""
    from torchvision.ops.misc import Conv2dNormActivation

    if not isinstance(model.stem, Conv2dNormActivation):
        raise UnsupportedModuleError(f"stem: {type(model.stem).__name__} has no SRD rule")
    stages = [_cna_stage(model.stem, "stem", "stem", "input", dtype)]
    if stages[0].act is None:
        raise UnsupportedModuleError("stem: a stem without activation has no SRD rule")
    nodes = {"stem": "stem"}
    src = "stem"
    for sname, stage in model.trunk_output.named_children():
        for bname, block in stage.named_children():
            name = f"trunk_output.{sname}.{bname}"
            stages += _regnet_block_stages(name, block, src, dtype)
            nodes[name] = src = name
        nodes[f"trunk_output.{sname}"] = src
    if not isinstance(model.avgpool, nn.AdaptiveAvgPool2d) or model.avgpool.output_size not in (1, (1, 1)):
        raise UnsupportedModuleError(f"avgpool: {type(model.avgpool).__name__} has no SRD head rule (expected "
                                     "AdaptiveAvgPool2d(1))")
    if not isinstance(model.fc, nn.Linear):
        raise UnsupportedModuleError(f"fc: {type(model.fc).__name__} has no SRD head rule (expected Linear)")
    return SRDGraph(stages, Head(src, lambda v: F.adaptive_avg_pool2d(v, 1), [model.fc]), nodes)


__all__ = ["build_regnet_graph"]
