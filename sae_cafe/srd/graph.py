"""The stage graph SRD works on (model-agnostic IR).

A network is a list of :class:`Stage` s in forward order. A stage produces one *node* — a pre-activation
map ``z`` (N, C, h, w) — as a sum of :class:`Branch` es, each an affine function of one source node's
post-activation map: ``z = Σ_branches conv(pool(v_src)) + bias``. The node's post-activation is
``act(z)`` (any element-wise function, or identity). A :class:`Head` maps the top node to the logits.

Family adapters build this graph (BatchNorm folded into the conv, residual adds as extra branches,
max-pools attached to the branch that consumes them); the SRD rules only see these records.

Input-dependent affine maps (a LayerNorm with its per-position σ frozen, like a ReLU mask) enter through
:attr:`Branch.freeze`: for one batch it returns a :class:`FrozenAffine` record (per-position scale and bias,
the conv's input), so the SRD rules stay linear-algebra on fixed weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError


def _pair(v: int | tuple) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass
class MaxPoolSpec:
    """A max-pool routed by its stored indices (never by value equality)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    name: str = "maxpool"

    @classmethod
    def from_module(cls, m: nn.MaxPool2d, name: str) -> MaxPoolSpec:
        if m.ceil_mode:
            raise UnsupportedModuleError(f"{name}: MaxPool2d with ceil_mode=True is not supported by SRD")
        stride = m.stride if m.stride is not None else m.kernel_size
        return cls(_pair(m.kernel_size), _pair(stride), _pair(m.padding), _pair(m.dilation), name)

    @property
    def n_offsets(self) -> int:
        return self.kernel[0] * self.kernel[1]

    def __call__(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.max_pool2d(v, self.kernel, self.stride, self.padding, self.dilation, return_indices=True)


@dataclass
class ConvSpec:
    """A bias-free convolution (conv with folded BN scale; avg-pool; flatten + linear).

    ``post`` (C_out', C_out), when given, is a fixed matrix applied to every output PFV after a *depthwise*
    conv (a depthwise conv followed by a pointwise linear map, e.g. ConvNeXt's 7×7 depthwise conv →
    LayerNorm centring → Linear): the paths stay the depthwise conv's kernel offsets, and the rule in
    :mod:`sae_cafe.srd.rules_post` never materialises the dense C_out'×C_in×k×k kernel.
    """

    weight: torch.Tensor  # (C_out, C_in / groups, kh, kw)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    name: str = "conv"
    post: torch.Tensor | None = None  # (C_out', C_out)
    _post_gram: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def kernel(self) -> tuple[int, int]:
        return (self.weight.shape[2], self.weight.shape[3])

    @property
    def n_offsets(self) -> int:
        return self.weight.shape[2] * self.weight.shape[3]

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(v, self.weight, None, self.stride, self.padding, self.dilation, self.groups)
        return out if self.post is None else F.conv2d(out, self.post[:, :, None, None])

    def post_gram(self) -> torch.Tensor:
        """postᵀ·post (C_out, C_out), computed once per graph (the norms ‖post·u‖² = uᵀ(postᵀpost)u)."""
        if self._post_gram is None:
            self._post_gram = self.post.T @ self.post
        return self._post_gram


@dataclass
class FrozenAffine:
    """One batch's frozen statistics of a branch: ``out = scale · conv(source) + bias``, ``source =
    transform(v)``, with v the branch's source map.

    Like a ReLU mask, the statistics (e.g. a LayerNorm's σ per position) are fixed for this input: they are
    a constant of the affine map SRD decomposes, relevance never flows into them, and ``apop_forward``
    reuses them for another input.

    Attributes:
        out: the branch output (N, C_out, h', w'), computed with the model's own ops.
        source: the conv's input (N, C_in, H, W); contributions are owned by its positions.
        scale: (N, 1, h', w') per-target factor after the conv (a LayerNorm after it), or None.
        bias: (N, C_out, h', w') per-target bias, or None for the branch's constant ``bias``.
        transform: the frozen per-position linear map from any source map to the conv input (a LayerNorm
            before the conv, its shift moved into the bias), or None (identity).
    """

    out: torch.Tensor
    source: torch.Tensor
    scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def bias_map(self) -> torch.Tensor | None:
        """The per-target bias (N, C_out, h', w'), or None for the branch's constant ``bias`` (read it through
        this method: a subclass may build it on first use)."""
        return self.bias

    def bias_dot(self, z: torch.Tensor) -> torch.Tensor | None:
        """⟨b_q, z_q⟩ (N, h', w') of the per-target bias with a node map ``z`` (N, C_out, h', w'), or None."""
        b = self.bias_map()
        return None if b is None else torch.linalg.vecdot(b, z, dim=1)


@dataclass
class Branch:
    """``conv(pool(v_source)) + bias``; ``conv=None`` is the identity (a residual skip)."""

    source: str
    conv: ConvSpec | None = None
    pool: MaxPoolSpec | None = None
    bias: torch.Tensor | None = None  # (C_out,), shared among this branch's contributions by norm
    exact: Callable[[torch.Tensor], torch.Tensor] | None = None  # the model's own ops (conv, then BN)
    freeze: Callable[[torch.Tensor], FrozenAffine] | None = None  # input-dependent affine map (no pool)

    def frozen_forward(self, rec: FrozenAffine, u: torch.Tensor) -> torch.Tensor:
        """The branch applied to another source map ``u`` with the statistics frozen in ``rec`` (APOP)."""
        t = rec.transform(u) if rec.transform is not None else u
        out = self.conv(t) if self.conv is not None else t
        if rec.scale is not None:
            out = out * rec.scale
        bias = rec.bias_map()
        if bias is None and self.bias is not None:
            bias = self.bias.view(1, -1, 1, 1)
        return out + bias if bias is not None else out

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """The branch output with bias, computed with the model's own ops when known, so that float32
        rounding (and hence max-pool arg-max choices downstream) is identical to ``model(x)``."""
        if self.exact is not None:
            return self.exact(u)
        out = self.conv(u) if self.conv is not None else u
        return out + self.bias.view(1, -1, 1, 1) if self.bias is not None else out


@dataclass
class Stage:
    """One node: ``z = Σ branches``; post-activation ``act(z)`` (``act=None``: identity)."""

    target: str
    branches: list[Branch]
    act: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class Head:
    """Top node → logits: ``mlp(flatten(pool(v)))``; ``mlp`` a gated-linear chain of Linear/act/dropout
    and modules that are linear given frozen statistics of their input (:class:`FrozenLayerNorm`)."""

    source: str
    pool: Callable[[torch.Tensor], torch.Tensor]  # (N, C, h, w) -> (N, C, hc, wc); linear given its indices
    mlp: list[nn.Module]


@dataclass
class SRDGraph:
    """Stages in forward order, the head, and the node of each PFV layer id."""

    stages: list[Stage]
    head: Head
    layer_nodes: dict[str, str] = field(default_factory=dict)

    def stage_index(self, node: str) -> int:
        for i, s in enumerate(self.stages):
            if s.target == node:
                return i
        raise KeyError(node)


class FrozenLayerNorm(nn.Module):
    """LayerNorm over the features of (N, C) vectors, which SRD treats as affine with σ frozen.

    ``LN(a) = γ ⊙ (a − mean a)/σ(a) + β``: with σ fixed to its value on this input, the centring stays a
    linear projection and only β is a bias. ``frozen_vjp(a)`` gives wᵀ·∂LN/∂a at frozen σ and
    ``frozen_apply(a, f)`` applies a's frozen map to another input f (APOP).
    """

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
        super().__init__()
        self.weight, self.bias, self.eps = weight, bias, eps

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(a, a.shape[-1:], self.weight, self.bias, self.eps)

    def _inv_sigma(self, a: torch.Tensor) -> torch.Tensor:
        return torch.rsqrt(a.var(-1, unbiased=False, keepdim=True) + self.eps)

    def frozen_apply(self, a: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        out = (f - f.mean(-1, keepdim=True)) * self._inv_sigma(a)
        out = out * self.weight if self.weight is not None else out
        return out + self.bias if self.bias is not None else out

    def frozen_vjp(self, a: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        s = self._inv_sigma(a)

        def vjp(w: torch.Tensor) -> torch.Tensor:
            w = w * self.weight if self.weight is not None else w
            return (w - w.mean(-1, keepdim=True)) * s
        return vjp


def layer_norm_params(ln: nn.LayerNorm, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """γ, β (ones/zeros when the LayerNorm has no affine parameters) and ε, cast to ``dtype``."""
    C = ln.normalized_shape[-1]
    if len(ln.normalized_shape) != 1:
        raise UnsupportedModuleError(f"LayerNorm over {tuple(ln.normalized_shape)} has no SRD rule (expected "
                                     "normalisation over the channels only)")
    gamma = ln.weight.detach().to(dtype) if ln.weight is not None else torch.ones(C, dtype=dtype)
    beta = ln.bias.detach().to(dtype) if getattr(ln, "bias", None) is not None else torch.zeros(C, dtype=dtype)
    return gamma, beta, float(ln.eps)


def channel_inv_sigma(y: torch.Tensor, eps: float) -> torch.Tensor:
    """1/σ over the channels of (N, C, h, w) at every position, (N, 1, h, w) — a LayerNorm's frozen scale."""
    return torch.rsqrt(y.var(1, unbiased=False, keepdim=True) + eps)


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d | None,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold an eval-mode BatchNorm into the preceding conv: W' = s·W, b' = s·(b − μ) + β, s = γ/√(σ²+ε)."""
    w = weight.detach().to(dtype)
    b = bias.detach().to(dtype) if bias is not None else None
    if bn is None:
        return w, b
    var = bn.running_var.detach().to(dtype)
    mean = bn.running_mean.detach().to(dtype)
    gamma = bn.weight.detach().to(dtype) if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().to(dtype) if bn.bias is not None else torch.zeros_like(var)
    s = gamma / torch.sqrt(var + bn.eps)
    shift = beta - s * mean + (s * b if b is not None else 0)
    return w * s.view(-1, *([1] * (w.ndim - 1))), shift


def conv_spec(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, name: str, dtype: torch.dtype
              ) -> tuple[ConvSpec, torch.Tensor | None]:
    """ConvSpec (BN folded) and the folded bias of a ``Conv2d`` (+ optional BN)."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise UnsupportedModuleError(f"{name}: Conv2d with padding={conv.padding!r}, padding_mode="
                                     f"{conv.padding_mode!r} is not supported by SRD (use numeric zero padding)")
    w, b = fold_bn(conv.weight, conv.bias, bn, dtype)
    return ConvSpec(w, _pair(conv.stride), _pair(conv.padding), _pair(conv.dilation), conv.groups, name), b


def conv_bn_forward(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, dtype: torch.dtype
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``bn(conv(u))`` with the modules' own ops (eval-mode BN), parameters cast to ``dtype``."""
    w = conv.weight.detach().to(dtype)
    b = conv.bias.detach().to(dtype) if conv.bias is not None else None
    stats = None
    if bn is not None:
        stats = [t.detach().to(dtype) if t is not None else None
                 for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias)]

    def forward(u: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(u, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
        return F.batch_norm(out, *stats, False, 0.0, bn.eps) if stats is not None else out
    return forward


def avgpool_spec(m: nn.AvgPool2d, channels: int, name: str, dtype: torch.dtype) -> ConvSpec:
    """A non-global AvgPool2d as a depthwise conv with constant weights 1/K."""
    if m.ceil_mode or (not m.count_include_pad and m.padding not in (0, (0, 0))) or m.divisor_override:
        raise UnsupportedModuleError(f"{name}: AvgPool2d with ceil_mode/count_include_pad=False/"
                                     "divisor_override is not supported by SRD")
    k = _pair(m.kernel_size)
    w = torch.full((channels, 1, *k), 1.0 / (k[0] * k[1]), dtype=dtype)
    stride = m.stride if m.stride is not None else m.kernel_size
    return ConvSpec(w, _pair(stride), _pair(m.padding), (1, 1), channels, name)
