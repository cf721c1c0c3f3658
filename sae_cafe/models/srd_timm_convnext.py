"""Family surgery for SRD on timm ``ConvNeXt``: timm's modules re-read in torchvision's ConvNeXt layout, then
:func:`.srd_convnext.build_convnext_graph` (the same records and rules: LayerNorm σ frozen, depthwise conv
with a fixed post matrix, layer scale folded into the second Linear, head LayerNorm after pooling).

The torchvision-layout view (:func:`torchvision_view`) holds timm's own ``Parameter`` s (no copies): stem
``Conv2d`` + ``LayerNorm2d``; per block ``Conv2d`` (depthwise 7×7), ``Permute``, ``LayerNorm``, ``Linear``,
``GELU``, ``Linear``, ``Permute`` and the layer scale ``gamma`` (ones when timm has none); downsampling
``LayerNorm2d`` + ``Conv2d``; head ``LayerNorm2d`` → ``Flatten`` → ``Linear`` after global average pooling.
timm variants with another structure (``conv_mlp``, GRN, overlapping stems, a head MLP, ``head_norm_first``)
raise an :class:`UnsupportedModuleError`; the stage graph is anyway checked against ``model(x)``.

Graph nodes keep the torchvision names (``features.i.j``); ``layer_nodes`` maps timm's layer ids onto them:
``stem`` → ``features.0``, ``stages.I.blocks.J`` → ``features.(2I+1).J``, ``stages.I`` → its last block,
``stages.I.downsample`` (I ≥ 1) → ``features.2I``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModuleError
from ..srd.graph import SRDGraph
from .base import ACTIVATIONS
from .srd_timm import _is_identity, _pool_and_linear


def _ln(ln: nn.Module, name: str, two_d: bool) -> nn.Module:
    """A torchvision ``LayerNorm2d`` (``two_d``) or ``nn.LayerNorm`` sharing ``ln``'s parameters."""
    from torchvision.models.convnext import LayerNorm2d

    want = "LayerNorm2d" if two_d else "LayerNorm"
    if type(ln).__name__ != want or not isinstance(ln, nn.LayerNorm) or len(ln.normalized_shape) != 1:
        raise UnsupportedModuleError(f"{name}: {type(ln).__name__} has no timm ConvNeXt SRD rule here (expected "
                                     f"timm {want} over the channels)")
    out = (LayerNorm2d if two_d else nn.LayerNorm)(ln.normalized_shape, eps=ln.eps,
                                                   elementwise_affine=ln.weight is not None,
                                                   device=ln.weight.device if ln.weight is not None else None)
    if ln.weight is not None:
        out.weight = ln.weight
    if ln.bias is not None:
        out.bias = ln.bias
    return out


def _act(act: nn.Module) -> nn.Module | None:
    """The activation as a torch module (timm's own GELU / GELUTanh are ``F.gelu`` calls), else None."""
    if isinstance(act, ACTIVATIONS):
        return act
    if type(act).__module__.startswith("timm.") and type(act).__name__ in ("GELU", "GELUTanh"):
        return nn.GELU(approximate="tanh" if type(act).__name__ == "GELUTanh" else "none")
    return None


def _block(blk: nn.Module, name: str) -> nn.Module:
    from torchvision.models.convnext import CNBlock
    from torchvision.ops.misc import Permute

    mlp = getattr(blk, "mlp", None)
    ok = (type(blk).__name__ == "ConvNeXtBlock" and not getattr(blk, "use_conv_mlp", True)
          and type(mlp).__name__ == "Mlp" and isinstance(getattr(mlp, "fc1", None), nn.Linear)
          and isinstance(getattr(mlp, "fc2", None), nn.Linear) and _act(mlp.act) is not None
          and all(_is_identity(getattr(mlp, s, None)) for s in ("drop1", "norm", "drop2"))
          and _is_identity(blk.shortcut) and _is_identity(blk.drop_path))
    if not ok:
        raise UnsupportedModuleError(f"{name}: {type(blk).__name__} layout has no timm ConvNeXt SRD rule (supported: "
                                     "conv_dw, LayerNorm, Mlp(fc1, act, fc2), layer scale, identity shortcut)")
    view = CNBlock.__new__(CNBlock)
    nn.Module.__init__(view)
    view.block = nn.Sequential(blk.conv_dw, Permute([0, 2, 3, 1]), _ln(blk.norm, f"{name}.norm", False), mlp.fc1,
                               _act(mlp.act), mlp.fc2, Permute([0, 3, 1, 2]))
    C = blk.conv_dw.out_channels
    view.layer_scale = (blk.gamma.reshape(C, 1, 1) if blk.gamma is not None  # torchvision's shape, same storage
                        else torch.ones(C, 1, 1, device=blk.conv_dw.weight.device))
    view.stochastic_depth = nn.Identity()
    return view


class TorchvisionView(nn.Module):
    """timm ConvNeXt in torchvision's layout (``features``, ``avgpool``, ``classifier``), sharing parameters."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential):
        super().__init__()
        self.features, self.avgpool, self.classifier = features, nn.AdaptiveAvgPool2d(1), classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


def torchvision_view(model: nn.Module) -> tuple[TorchvisionView, dict[str, str]]:
    """(the torchvision-layout view of a timm ConvNeXt, {timm layer id: view node})."""
    from torchvision.ops.misc import Conv2dNormActivation

    stem = list(model.stem.children()) if isinstance(model.stem, nn.Sequential) else []
    if len(stem) != 2 or type(stem[0]) is not nn.Conv2d:
        raise UnsupportedModuleError(f"stem: layout {[type(m).__name__ for m in stem]} has no timm ConvNeXt SRD "
                                     "rule (expected the 'patch' stem Conv2d + LayerNorm2d)")
    head = model.head
    if (type(head).__name__ != "NormMlpClassifierHead" or not _is_identity(head.pre_logits)
            or not _is_identity(model.norm_pre) or not _is_identity(head.drop)):
        raise UnsupportedModuleError("head: only timm's NormMlpClassifierHead without a hidden MLP (and no norm_pre) "
                                     "has a timm ConvNeXt SRD rule")
    _pool_and_linear(head.global_pool, "head.global_pool")
    stem_view = Conv2dNormActivation.__new__(Conv2dNormActivation)
    nn.Sequential.__init__(stem_view, stem[0], _ln(stem[1], "stem.1", True))
    features: list[nn.Module] = [stem_view]
    ids = {"stem": "features.0"}
    for i, stage in enumerate(model.stages):
        ds = stage.downsample
        if not _is_identity(ds):
            parts = list(ds.children()) if isinstance(ds, nn.Sequential) else []
            if len(parts) != 2 or type(parts[1]) is not nn.Conv2d:
                raise UnsupportedModuleError(f"stages.{i}.downsample: layout has no timm ConvNeXt SRD rule "
                                             "(expected LayerNorm2d + Conv2d)")
            features.append(nn.Sequential(_ln(parts[0], f"stages.{i}.downsample.0", True), parts[1]))
            ids[f"stages.{i}.downsample"] = f"features.{len(features) - 1}"
        elif i > 0:
            raise UnsupportedModuleError(f"stages.{i}: a stage without downsampling has no timm ConvNeXt SRD rule")
        features.append(nn.Sequential(*[_block(b, f"stages.{i}.blocks.{j}") for j, b in enumerate(stage.blocks)]))
        k = len(features) - 1
        for j in range(len(stage.blocks)):
            ids[f"stages.{i}.blocks.{j}"] = f"features.{k}.{j}"
        ids[f"stages.{i}"] = f"features.{k}"
    classifier = nn.Sequential(_ln(head.norm, "head.norm", True), nn.Flatten(1), head.fc)
    return TorchvisionView(nn.Sequential(*features), classifier), ids


def build_timm_convnext_graph(model: nn.Module, dtype: torch.dtype) -> SRDGraph:
    """timm ConvNeXt → its torchvision view → :func:`.srd_convnext.build_convnext_graph`, timm layer ids."""
    from .srd_convnext import build_convnext_graph

    view, ids = torchvision_view(model)
    graph = build_convnext_graph(view, dtype)
    graph.layer_nodes = {tid: graph.layer_nodes[vid] for tid, vid in ids.items()}
    return graph


__all__ = ["TorchvisionView", "build_timm_convnext_graph", "torchvision_view"]
