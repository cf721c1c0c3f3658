"""Model adapter: one uniform view of a vision model, its PFV layers and its preprocessing.

An adapter wraps an ``nn.Module`` *as constructed* (module names unchanged). Layer ids everywhere are
module paths of that model. Family-specific knowledge (which modules are PFV layers, how tokens are laid
out, how SRD sees the network) lives in the family modules, never in the generic algorithms.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MismatchError, SaeCafeError, UnknownLayerError, UnsupportedModuleError
from ..images import pil_to_tensor, to_pil

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: element-wise activation modules (PFV layers of conv nets; SRD treats them all alike, method_spec §2.2.4)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Sigmoid)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode for the block; the previous train/eval flags restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield
    finally:
        for m, t in modes.items():
            m.training = t


@dataclass(frozen=True)
class LayerInfo:
    """A PFV layer: ``name`` is the module path; grid/stride are for the adapter's input size."""

    name: str
    kind: Literal["conv", "tokens"]
    channels: int
    stride: int
    grid: tuple[int, int]
    rf_size: int


@dataclass
class PFVBatch:
    """Pointwise feature vectors of one layer.

    Attributes:
        pfv: (B, N, D) patch/position vectors, row-major over the grid.
        positions: (N, 2) long (row, col) of each PFV on the grid.
        grid: (h, w) of the layer.
        extra: (B, E, D) class/register tokens kept apart (ViT), else None.
    """

    pfv: torch.Tensor
    positions: torch.Tensor
    grid: tuple[int, int]
    extra: torch.Tensor | None = None


class _StopForward(Exception):
    pass


class ModelAdapter:
    """Base adapter. Subclasses set ``family`` and implement ``_pfv_layer_names`` (and token layout) and
    ``srd_backend`` (see :mod:`sae_cafe.srd.backend`: how a family plugs into SRD)."""

    family: str = "generic"
    kind: Literal["conv", "tokens"] = "conv"
    #: module names of shortcut branches that the receptive field skips (``layers()``)
    rf_skip: tuple[str, ...] = ("downsample",)

    def __init__(self, model: nn.Module, name: str, input_size: tuple[int, int] = (224, 224),
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 resize: int | None = 256, num_classes: int | None = None,
                 class_names: Sequence[str] | None = None):
        self.model = model.eval()
        self.name = name
        self.input_size = tuple(input_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.resize = resize
        self.class_names = list(class_names) if class_names is not None else None
        self.num_classes = num_classes
        self._layers: dict[str, LayerInfo] | None = None
        self.weights_hash: str | None = None
        self.weights_path: str | None = None  # the weights file given to load_model (None: shipped or random)

    # ----- SRD --------------------------------------------------------------------------------------------
    def srd_backend(self):
        """The family's :class:`~sae_cafe.srd.backend.SRDBackend` (imported lazily by each family, since
        ``sae_cafe.srd`` imports ``sae_cafe.models``). The base adapter has none."""
        raise UnsupportedModuleError(
            f"SRD has no backend for model {self.name!r}: the adapter {type(self).__name__} (family "
            f"{self.family!r}) does not implement srd_backend(); see sae_cafe.srd.backend and CONVENTIONS.md "
            "('SRD backends') for how a family plugs in")

    # ----- layers -------------------------------------------------------------------------------------
    def _pfv_layer_names(self) -> list[str]:
        raise NotImplementedError

    def _probe(self, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """One forward at ``input_size``: layer outputs and theoretical receptive fields (pixels).

        The receptive field follows the main path in execution order (convs and pools; residual
        ``downsample`` branches are skipped since they never widen it); token layers see the whole image.
        """
        p = next(self.model.parameters(), None)
        x = torch.zeros(1, 3, *self.input_size, device=self.device, dtype=p.dtype if p is not None else None)
        if self.kind == "tokens":
            return self.capture(x, names, check=False), {}
        state = {"rf": 1, "jump": 1}
        rf: dict[str, int] = {}

        def geo(m: nn.Module, _i, _o):
            k, s, d = (m.kernel_size, m.stride, getattr(m, "dilation", 1))
            k, s, d = (v[0] if isinstance(v, tuple) else v for v in (k, s, d))
            state["rf"] += (k - 1) * d * state["jump"]
            state["jump"] *= s

        geo_hooks = {n: geo for n, m in self.model.named_modules()
                     if isinstance(m, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d)
                     and not any(part in n.split(".") for part in self.rf_skip)}
        acts: dict[str, torch.Tensor] = {}

        def record(n: str):
            def hook(_m, _i, out):
                acts[n] = out
                rf[n] = state["rf"]
            return hook

        with self.hooks(geo_hooks), self.hooks({n: record(n) for n in names}):
            self.model(x)
        return acts, rf

    def layers(self) -> dict[str, LayerInfo]:
        """PFV layers with channels, stride, grid (at ``input_size``) and receptive-field size."""
        if self._layers is None:
            names = self._pfv_layer_names()
            acts, rf = self._probe(names)
            out = {}
            for n in names:
                grid, ch = self._grid_and_channels(acts[n])
                out[n] = LayerInfo(n, self.kind, ch, self.input_size[0] // grid[0], grid,
                                   rf.get(n, self.input_size[0]))
            self._layers = out
        return self._layers

    def resolve_layer(self, layer: str | int) -> str:
        """Canonical layer id; unknown ids raise :class:`UnknownLayerError` listing the valid ones."""
        names = self._pfv_layer_names()
        key = str(layer)
        if key in names:
            return key
        alias = self._layer_aliases().get(key)
        if alias is not None:
            return alias
        raise UnknownLayerError(layer, self.name, names)

    def _layer_aliases(self) -> dict[str, str]:
        return {}

    def layer(self, layer: str | int) -> LayerInfo:
        return self.layers()[self.resolve_layer(layer)]

    def grid(self, layer: str | int, input_hw: tuple[int, int] | None = None) -> tuple[int, int]:
        """Grid (h, w) of a layer for an input of size ``input_hw``."""
        info = self.layer(layer)
        if input_hw is None or tuple(input_hw) == self.input_size:
            return info.grid
        return (-(-input_hw[0] // info.stride), -(-input_hw[1] // info.stride))

    # ----- forward & capture ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def get_module(self, layer: str | int) -> nn.Module:
        return self.model.get_submodule(self.resolve_layer(layer))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def capture(self, x: torch.Tensor, layers: Sequence[str | int], check: bool = True,
                stop_early: bool = False) -> dict[str, torch.Tensor]:
        """Run the model and return the outputs of ``layers`` (raw module outputs).

        Hooks are removed on exit, also on error. ``stop_early`` stops after the last requested layer.
        """
        names = [self.resolve_layer(n) for n in layers] if check else [str(n) for n in layers]
        acts: dict[str, torch.Tensor] = {}
        want = set(names)

        def make_hook(n: str):
            def hook(_m, _i, out):
                acts[n] = out
                if stop_early and want.issubset(acts):
                    raise _StopForward
            return hook

        with self.hooks({n: make_hook(n) for n in names}), contextlib.suppress(_StopForward):
            self.model(x)
        return acts

    @contextlib.contextmanager
    def hooks(self, hook_by_layer: dict[str, object]) -> Iterator[None]:
        """Register forward hooks by module path; always removed on exit."""
        handles = []
        try:
            for n, fn in hook_by_layer.items():
                handles.append(self.model.get_submodule(n).register_forward_hook(fn))
            yield
        finally:
            for h in handles:
                h.remove()

    def forward_from(self, layer: str | int, act: torch.Tensor, x: torch.Tensor,
                     until: str | int | None = None) -> torch.Tensor:
        """Run the model with the output of ``layer`` replaced by ``act``.

        Returns the logits, or the raw output of layer ``until`` (the forward stops there). ``x`` only
        needs the right shape for the layers before ``layer`` (their work is discarded).
        """
        src = self.resolve_layer(layer)
        if until is None:
            with self.hooks({src: lambda _m, _i, _o: act}):
                return self.model(x)
        dst = self.resolve_layer(until)
        got: dict[str, torch.Tensor] = {}

        def stop(_m, _i, out):
            got["out"] = out
            raise _StopForward

        with self.hooks({src: lambda _m, _i, _o: act, dst: stop}), contextlib.suppress(_StopForward):
            self.model(x)
        if "out" not in got:
            raise SaeCafeError(f"layer {dst!r} does not run after {src!r} in {self.name}")
        return got["out"]

    # ----- PFVs -----------------------------------------------------------------------------------------
    def _grid_and_channels(self, act: torch.Tensor) -> tuple[tuple[int, int], int]:
        if act.ndim != 4:
            raise MismatchError(f"{self.name}: expected a (B,C,H,W) map, got shape {tuple(act.shape)}")
        return (act.shape[2], act.shape[3]), act.shape[1]

    def to_pfv(self, act: torch.Tensor, layer: str | int | None = None) -> PFVBatch:  # noqa: ARG002
        """(B, C, h, w) map → PFVs (B, h·w, C), row-major positions. Exact inverse: :meth:`from_pfv`."""
        (h, w), _ = self._grid_and_channels(act)
        pfv = act.flatten(2).transpose(1, 2)
        return PFVBatch(pfv, grid_positions(h, w, act.device), (h, w))

    def from_pfv(self, batch: PFVBatch) -> torch.Tensor:
        h, w = batch.grid
        return batch.pfv.transpose(1, 2).reshape(batch.pfv.shape[0], -1, h, w)

    # ----- preprocessing --------------------------------------------------------------------------------
    def preprocess(self, images: object) -> torch.Tensor:
        """Images (paths, PIL, arrays, tensors, or a list of them) → normalised (N, 3, H, W) tensor.

        A float tensor of shape (N, 3, H, W) at ``input_size`` is taken as already preprocessed.
        """
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            if images.shape[1] != 3:
                raise MismatchError(f"{self.name}: expected (N,3,H,W) images, got {tuple(images.shape)}")
            return images
        if not isinstance(images, (list, tuple)):
            images = [images]
        return torch.stack([self.preprocess_one(im) for im in images]).to(self.device)

    def preprocess_one(self, image: object) -> torch.Tensor:
        img = pil_to_tensor(to_pil(image))[None]
        H, W = self.input_size
        if self.resize is not None:
            h, w = img.shape[-2:]
            s = self.resize / min(h, w)
            img = F.interpolate(img, size=(max(H, round(h * s)), max(W, round(w * s))), mode="bilinear",
                                antialias=True, align_corners=False)
            h, w = img.shape[-2:]
            top, left = (h - H) // 2, (w - W) // 2
            img = img[..., top:top + H, left:left + W]
        else:
            img = F.interpolate(img, size=(H, W), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((img.clamp(0, 1) - mean) / std)[0]

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (N,3,H,W) → pixel values in [0, 1]."""
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return x * std + mean

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, family={self.family!r}, input_size={self.input_size})"


def grid_positions(h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(h·w, 2) long (row, col), row-major."""
    r, c = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([r.flatten(), c.flatten()], 1)
