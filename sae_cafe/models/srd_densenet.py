"""Family surgery for SRD on torchvision DenseNet (densenet121/161/169/201): the stage graph.

DenseNet is pre-activation: every dense layer reads the channel concatenation of its block input and all
earlier layers' new features, and applies BatchNorm → ReLU → 1×1 conv → BatchNorm → ReLU → 3×3 conv.
The concatenation is never a node of its own (method_spec §2.2.9): the node that reads it is the first
BatchNorm's output ``z = BN(cat(v_0, …, v_{l-1}))`` (pre-ReLU), and it has **one branch per channel group**
g (the block input, then each earlier layer's new features). Branch g is the group's map scaled by the BN
scale of its channels and placed in its channel slot, plus the BN shift of those channels:

    z = Σ_g E_g (s_g ⊙ v_g + t_g),        E_g: the group's channel slot in the concatenation.

The BN shift is per channel, so each channel group owns the shift of its own channels (one path per branch
and target: the branch's bias is wholly its path's). Relevance at z then splits by channel group as
μ_g = ⟨s_g ⊙ v_g + t_g, z⟩ / ‖z‖² = ‖z_g‖² / ‖z‖² (z_g: z on the group's channels; the slots are orthogonal)
and flows to each group's own node at the same position. Nodes:

* ``features.relu0``: conv0 + norm0 (folded), ReLU;
* ``features.pool0``: the stem max-pool as a node of its own (its output feeds every layer of block 1 and
  the first transition, so it is not attached to one consumer): paths = pool offsets routed by stored indices;
* dense layer ``P = features.denseblockB.denselayerL``: ``P.norm1`` (group branches, ReLU), ``P.norm2``
  (conv1 + norm2 folded, ReLU), ``P`` (conv2, no activation: the layer's new features, its module output);
* transition ``T = features.transitionB``: ``T.norm`` (group branches, ReLU), ``T`` = avgpool2×2(conv1×1(·)),
  one 2×2/2 convolution with weight W/4 at every offset (no bias: the same contributions as a conv node
  followed by a pool node);
* ``features.norm5``: group branches of block 4, then the functional ReLU of ``DenseNet.forward``; the head is
  global average pool + classifier.

Written by hand: torchvision has no graph export that keeps the per-group structure. A concatenation node is
a :class:`ConcatStage` (z = BN(cat) in one pass, the model's own ops) with :class:`GroupBranch` es whose
μ of all groups comes from one pass over z² (see the engine hooks ``combine`` / ``path_mu`` /
``path_scatter`` in :class:`~sae_cafe.srd.engine.SRDRun`); the padded per-group output is only used by APOP.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from ..srd.graph import Branch, ConvSpec, Head, MaxPoolSpec, SRDGraph, Stage, conv_bn_forward, conv_spec
from .srd_cnn import activation_fn

Group = tuple[str, int]  # (node name, channels)


def _bn_affine(bn: nn.BatchNorm2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``s ⊙ x + t``: (s, t), each (C,)."""
    var, mean = bn.running_var.detach().to(dtype), bn.running_mean.detach().to(dtype)
    gamma = bn.weight.detach().to(dtype) if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().to(dtype) if bn.bias is not None else torch.zeros_like(var)
    s = gamma / torch.sqrt(var + bn.eps)
    return s, beta - s * mean


def _slot_forward(s: torch.Tensor, t: torch.Tensor, lo: int, total: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """u (N, C_g, h, w) → (N, C_total, h, w): ``s ⊙ u + t`` in channels [lo, lo + C_g), zeros elsewhere."""
    c = s.shape[0]
    sv, tv = s.view(1, -1, 1, 1), t.view(1, -1, 1, 1)

    def forward(u: torch.Tensor) -> torch.Tensor:
        return F.pad(u * sv + tv, (0, 0, 0, 0, lo, total - lo - c))
    return forward


class GroupBranch(Branch):
    """One channel group of a concatenation read by a BatchNorm: one path per target, contribution
    ``E_g(s_g ⊙ v_g + t_g)`` = z on the group's own channels (z = BN(cat) is exactly the sum of the groups'
    slot vectors), so μ_g = ⟨E_g z_g, z⟩ / ‖z‖² = ‖z_g‖² / ‖z‖², for all groups of a node in one pass."""

    def __init__(self, source: str, s: torch.Tensor, t: torch.Tensor, lo: int, total: int, shared: dict,
                 index: int):
        super().__init__(source, None, None, None, _slot_forward(s, t, lo, total))  # rules: path_mu/path_scatter
        self.s, self.t, self.shared, self.index = s.view(1, -1, 1, 1), t.view(1, -1, 1, 1), shared, index
        self.lo, self.hi = lo, lo + s.shape[0]

    def mu_all(self, z: torch.Tensor) -> torch.Tensor:
        """μ of every group (N, G, h, w); computed once per node and batch (cached against z by identity)."""
        ref, mu = self.shared.get("z", (None, None))
        if ref is not None and ref() is z:
            return mu
        z2 = z * z
        bounds = self.shared["bounds"]
        (lo0, hi0), rest = bounds[0], bounds[1:]
        sizes = {hi - lo for lo, hi in rest}
        if len(sizes) == 1:  # DenseNet: the block input, then groups of growth-rate channels
            n = sizes.pop()
            parts = [z2[:, lo0:hi0].sum(1, keepdim=True),
                     z2[:, hi0:].view(z.shape[0], len(rest), n, *z.shape[2:]).sum(2)]
            sq = torch.cat(parts, 1)
        else:
            sq = torch.stack([z2[:, lo:hi].sum(1) for lo, hi in bounds], 1)
        tot = sq.sum(1, keepdim=True)
        mu = torch.where(tot > 0, sq / torch.where(tot > 0, tot, torch.ones_like(tot)), torch.zeros_like(sq))
        self.shared["z"] = (weakref.ref(z), mu)
        return mu

    def path_mu(self, v: torch.Tensor, z: torch.Tensor, out, rec) -> torch.Tensor:  # noqa: ARG002
        return self.mu_all(z)[:, self.index:self.index + 1]

    def path_scatter(self, src_hw: tuple[int, int]):  # noqa: ARG002  (one path, same position)
        return lambda m: m


class ConcatStage(Stage):
    """A node ``z = BN(cat(v_0, …))`` computed with the model's ops in one pass (the engine calls ``combine``
    instead of summing padded per-group outputs); its branches are :class:`GroupBranch` es."""

    def __init__(self, target: str, branches: list[Branch], act, bn: tuple):
        super().__init__(target, branches, act)
        self._bn = bn

    def combine(self, sources: list[torch.Tensor]) -> torch.Tensor:
        mean, var, w, b, eps = self._bn
        return F.batch_norm(torch.cat(sources, 1), mean, var, w, b, False, 0.0, eps)


def group_branches(groups: list[Group], bn: nn.BatchNorm2d, name: str, dtype: torch.dtype) -> list[Branch]:
    """One branch per channel group of a concatenation read by ``bn`` (see the module docstring)."""
    total = sum(c for _, c in groups)
    if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != total:
        raise UnsupportedModuleError(f"{name}: expected a BatchNorm2d over the {total} concatenated channels, got "
                                     f"{bn!r}")
    s, t = _bn_affine(bn, dtype)
    branches, lo, shared = [], 0, {"bounds": []}
    for g, (src, c) in enumerate(groups):
        branches.append(GroupBranch(src, s[lo:lo + c], t[lo:lo + c], lo, total, shared, g))
        shared["bounds"].append((lo, lo + c))
        lo += c
    return branches


def concat_stage(target: str, groups: list[Group], bn: nn.BatchNorm2d, act, dtype: torch.dtype) -> ConcatStage:
    """The node ``act(BN(cat(groups)))`` with one :class:`GroupBranch` per group."""
    stats = tuple(p.detach().to(dtype) if p is not None else None
                  for p in (bn.running_mean, bn.running_var, bn.weight, bn.bias)) + (bn.eps,)
    return ConcatStage(target, group_branches(groups, bn, target, dtype), act, stats)


def _check_layer(layer: nn.Module, name: str) -> None:
    for part, kind in (("norm1", nn.BatchNorm2d), ("relu1", nn.ReLU), ("conv1", nn.Conv2d), ("norm2", nn.BatchNorm2d),
                       ("relu2", nn.ReLU), ("conv2", nn.Conv2d)):
        if not isinstance(getattr(layer, part, None), kind):
            raise UnsupportedModuleError(f"{name}.{part}: expected {kind.__name__} (torchvision _DenseLayer), got "
                                         f"{type(getattr(layer, part, None)).__name__}")


def _dense_layer(name: str, layer: nn.Module, groups: list[Group], dtype: torch.dtype) -> list[Stage]:
    _check_layer(layer, name)
    s1 = concat_stage(f"{name}.norm1", groups, layer.norm1, activation_fn(layer.relu1), dtype)
    spec, bias = conv_spec(layer.conv1, layer.norm2, f"{name}.conv1", dtype)
    s2 = Stage(f"{name}.norm2", [Branch(s1.target, spec, None, bias, conv_bn_forward(layer.conv1, layer.norm2,
                                                                                       dtype))],
               activation_fn(layer.relu2))
    spec, bias = conv_spec(layer.conv2, None, f"{name}.conv2", dtype)
    s3 = Stage(name, [Branch(s2.target, spec, None, bias, conv_bn_forward(layer.conv2, None, dtype))], None)
    return [s1, s2, s3]


def _transition(name: str, tr: nn.Module, groups: list[Group], dtype: torch.dtype) -> list[Stage]:
    norm, relu, conv, pool = (getattr(tr, p, None) for p in ("norm", "relu", "conv", "pool"))
    if not (isinstance(relu, nn.ReLU) and isinstance(conv, nn.Conv2d) and isinstance(pool, nn.AvgPool2d)
            and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1):
        raise UnsupportedModuleError(f"{name}: expected a torchvision _Transition (BatchNorm2d, ReLU, 1×1 Conv2d, "
                                     "AvgPool2d)")
    k = pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0]
    st = pool.stride if isinstance(pool.stride, int) else pool.stride[0]
    if (pool.kernel_size not in (k, (k, k)) or st != k or pool.padding not in (0, (0, 0)) or pool.ceil_mode
            or pool.divisor_override):
        raise UnsupportedModuleError(f"{name}.pool: only non-overlapping AvgPool2d (stride = kernel, no padding) "
                                     "is supported by SRD")
    s1 = concat_stage(f"{name}.norm", groups, norm, activation_fn(relu), dtype)
    w = conv.weight.detach().to(dtype).expand(-1, -1, k, k) / (k * k)  # avgpool_k ∘ conv1×1 = conv k×k/k, W/k²
    b = conv.bias.detach().to(dtype) if conv.bias is not None else None
    cw, cb = conv.weight.detach().to(dtype), b

    def exact(u: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.conv2d(u, cw, cb), k, k)
    spec = ConvSpec(w.contiguous(), (k, k), (0, 0), (1, 1), 1, f"{name}.conv+pool")
    return [s1, Stage(name, [Branch(s1.target, spec, None, b, exact)], None)]


def build_densenet_graph(model: nn.Module, dtype: torch.dtype) -> tuple[SRDGraph, list[str]]:
    """torchvision DenseNet → (stage graph, PFV layer names in forward order)."""
    from torchvision.models.densenet import _DenseBlock, _Transition

    feats = model.features
    names = list(feats._modules)
    stem = names[:4]
    if stem != ["conv0", "norm0", "relu0", "pool0"] or not isinstance(feats.pool0, nn.MaxPool2d):
        raise UnsupportedModuleError(f"DenseNet features start with {stem}, expected conv0, norm0, relu0, pool0 "
                                     "(MaxPool2d)")
    spec, bias = conv_spec(feats.conv0, feats.norm0, "features.conv0", dtype)
    stages = [Stage("features.relu0", [Branch("input", spec, None, bias,
                                              conv_bn_forward(feats.conv0, feats.norm0, dtype))],
                    activation_fn(feats.relu0)),
              Stage("features.pool0", [Branch("features.relu0", None, MaxPoolSpec.from_module(feats.pool0,
                                                                                              "features.pool0"))])]
    layers = ["features.relu0", "features.pool0"]
    groups: list[Group] = [("features.pool0", feats.conv0.out_channels)]
    for n in names[4:]:
        m, full = feats._modules[n], f"features.{n}"
        if isinstance(m, _DenseBlock):
            for ln, layer in m.items():
                p = f"{full}.{ln}"
                stages += _dense_layer(p, layer, groups, dtype)
                groups = groups + [(p, layer.conv2.out_channels)]
                layers.append(p)
        elif isinstance(m, _Transition):
            stages += _transition(full, m, groups, dtype)
            groups = [(full, m.conv.out_channels)]
            layers.append(full)
        elif isinstance(m, nn.BatchNorm2d) and n == names[-1]:
            stages.append(concat_stage(full, groups, m, torch.relu, dtype))  # F.relu in DenseNet.forward
        else:
            raise UnsupportedModuleError(f"{full}: module {type(m).__name__} has no DenseNet SRD rule")
    if stages[-1].target != f"features.{names[-1]}" or not isinstance(model.classifier, nn.Linear):
        raise UnsupportedModuleError("DenseNet must end with a BatchNorm2d (features.norm5) and a Linear classifier")
    head = Head(stages[-1].target, lambda v: F.adaptive_avg_pool2d(v, 1), [model.classifier])
    return SRDGraph(stages, head, {n: n for n in layers}), layers


__all__ = ["ConcatStage", "GroupBranch", "build_densenet_graph", "concat_stage", "group_branches"]
