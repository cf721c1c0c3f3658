"""The stage graph SRD works on (model-agnostic IR).

A network is a list of :class:`Stage` s in forward order. A stage produces one *node* — a pre-activation
map ``z`` (N, C, h, w) — as a sum of :class:`Branch` es, each an affine function of one source node's
post-activation map: ``z = Σ_branches conv(pool(v_src)) + bias``. The node's post-activation is
``act(z)`` (any element-wise function, or identity). A :class:`Head` maps the top node to the logits.

Family adapters build this graph (BatchNorm folded into the conv, residual adds as extra branches,
max-pools attached to the branch that consumes them); the SRD rules only see these records.
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
    """A bias-free convolution (conv with folded BN scale; avg-pool; flatten + linear)."""

    weight: torch.Tensor  # (C_out, C_in / groups, kh, kw)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    name: str = "conv"

    @property
    def kernel(self) -> tuple[int, int]:
        return (self.weight.shape[2], self.weight.shape[3])

    @property
    def n_offsets(self) -> int:
        return self.weight.shape[2] * self.weight.shape[3]

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(v, self.weight, None, self.stride, self.padding, self.dilation, self.groups)


@dataclass
class Branch:
    """``conv(pool(v_source)) + bias``; ``conv=None`` is the identity (a residual skip)."""

    source: str
    conv: ConvSpec | None = None
    pool: MaxPoolSpec | None = None
    bias: torch.Tensor | None = None  # (C_out,), shared among this branch's contributions by norm
    exact: Callable[[torch.Tensor], torch.Tensor] | None = None  # the model's own ops (conv, then BN)

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
    """Top node → logits: ``mlp(flatten(pool(v)))``; ``mlp`` a gated-linear chain of Linear/act/dropout."""

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
