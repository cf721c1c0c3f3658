"""SRD (Sharing Ratio Decomposition) for pre-LN Vision Transformers (torchvision ``VisionTransformer``,
timm ``VisionTransformer`` / DeiT / distilled DeiT and the CLIP, SigLIP and DINOv2 towers). method_spec
§2.4 made exact; the choices where it is ambiguous:

* Nodes are the residual-stream token vectors at the two adds of every block: y = x + attn(LN₁ x) and
  out = y + MLP(LN₂ y). Attention probabilities (recomputed from the q/k weights, since torchvision and
  timm use fused kernels), LayerNorm σ and activation gates are frozen; LayerNorm mean-centring stays a
  linear projection. With them frozen the network is affine in the pixels, and SRD decomposes that map.
* Attention add: multi-head attention is W_O applied to the concatenated heads, so, as for a concatenation
  (method_spec §2.2.9), each (source token s, head h) pair is a path with contribution
  a_{(s,h)→t} = A^h_{ts} W_O^h W_V^h L₁(x_s) (L₁ = LN₁ without its shift). The value bias, LN₁ shift and
  output bias (b_attn = W_O(W_V β₁ + b_V) + b_O, LayerScale folded in) are shared over these paths in
  proportion to ‖a_{(s,h)→t}‖ (like ResNet's main-branch bias, the skip gets none; gap G4);
  c_{s→t} = Σ_h (a_{(s,h)→t} + β_{(s,h)→t}) and the skip x_t is one more source of y_t.
  μ = ⟨c, y_t⟩/‖y_t‖², so Σ μ = 1 exactly; the only guard is μ = 0 for a zero target (and an equal bias
  split when every path norm is zero), no ε. Sharing by head-summed norms ‖Σ_h a_{(s,h)→t}‖ (the other
  reading of §2.4) would need an extra H×H quadratic form per (t, s) and was measured slower.
* MLP add: both sources belong to token t (the MLP has no token mixing), so relevance passes from out_t to
  y_t unchanged; the MLP biases, LN₂ shift and GELU sit inside that token's term (activation-agnostic).
* Patch embedding: pixel k of patch t contributes W_k x_k (its 3-channel vector times the conv kernel at
  its offset); conv bias + position embedding are shared over the patch's pixels in proportion to
  ‖W_k x_k‖, giving pixel-resolution maps. Class/register tokens at the input have no pixel source: the
  relevance reaching them is the *sink*, reported (``return_sink=True`` → (N,), ``"tokens"`` → per
  prefix token (N, E)), never renormalised: maps.sum((-2,-1)) + sink == seed total.
* Class initialisation: the head (final LN, pooling, fc_norm, Linear; torchvision's Tanh pre-logits with
  its gate frozen; SigLIP's attention pool with its probabilities, LayerNorm σ and MLP gates frozen) is
  affine in the final stream. Pooled heads ("avg", "map"): token t's share of the output is F(x^L_t)·d +
  its norm-proportional share (‖F(x^L_t)‖ in output space) of b̃·d (b̃: head bias + final LN shifts + the
  pool's value/output biases and MLP constant); the node is the last block's output. Token readouts (class
  token; distilled DeiT: class and distillation tokens, each head weighted ½): the readout token's final
  vector is decomposed through the last block, sources = attention sources c_{s→r}, r's skip and its MLP
  term; the MLP term (a function of the already mixed y_r) follows y_r's sharing ratios; b̃ is shared over
  these sources. The node is the last block's *input*, so Σ R = ⟨output, d⟩ exactly and
  ``vit_srd_relevance`` reports the last block's output as all on the readout tokens.
* Targets: d is the one-hot of a class id, or a direction in output space (a float (K,) or (N, K) target):
  the map then decomposes ⟨output, d⟩. A headless tower (timm ``num_classes=0``) explains its pooled
  feature and accepts directions only.
* ``norm_pre`` (CLIP's ln_pre) is folded into the pixel stage as a frozen-σ affine map: pixel k of patch t
  contributes G_t W_k x_k, with G_t(b + pos_t) + β_pre as the bias shared by ‖G_t W_k x_k‖.
* contrast="mean" subtracts the mean over *patch* tokens at the class-initialisation node; prefix tokens
  keep their share. So for a pooled head Σ maps + sink = 0, and for a class-token head Σ maps + sink = the
  class/register tokens' share of the logit at the last block's input (their relevance then reaches the
  pixels uncontrasted through earlier attention). contrast="none": Σ maps + sink = logit.
* Costs: one forward with explicit attention, plus per block one D×A projection, one T×T×A product (as
  Q·Kᵀ), per-head e×e Grams and three passes over the (N,H,T,T) attention; μ is computed once per image
  (``ViTSRD``, ``vit_srd_sharing``) and every further seed costs one (T×T) matmul per block.
* ``dtype`` other than the model's computes on a deep copy cast to it, cached (with the spec) per model and
  weights version: a float64 copy of the model stays in memory while the model lives.
* Dropout / drop-path are taken as identities (eval). Unsupported variants (conv stems, GLU MLPs, max
  pooling, gated or norm-scaled attention, dynamic_img_pad) raise UnsupportedModuleError naming the module.
  ``dynamic_img_size`` models take any multiple of the patch size (position embeddings resampled by timm).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from ..errors import MismatchError, NonFiniteError, SaeCafeError, UnsupportedModuleError
from ..models import get_adapter
from ..models.base import eval_mode
from .api import apop_forward, srd_ierf, srd_ierf_from_relevance, srd_relevance, srd_saliency
from .backend import SRDBackend, cached_build, check_images
from .vit_model import Spec, check_input, make_spec, run
from .vit_share import block_share, class_relevance, pixel_share, readout_values

__all__ = ["ViTBackend", "ViTSRD", "vit_apop_forward", "vit_srd_ierf", "vit_srd_ierf_from_relevance",
           "vit_srd_relevance", "vit_srd_saliency", "vit_srd_sharing"]


class ViTSRD:
    """Sharing ratios of one batch (N images), computed once and reused for any number of seeds.

    ``M[l]`` (N,T,T) are the attention-add ratios of block l (target × source), ``mu_pix`` (N,H,W) the
    pixel ratios in their patch tokens. ``upto`` stops after block ``upto`` (iERFs of early layers).
    """

    def __init__(self, spec: Spec, x: Tensor, upto: int | None = None, keep: bool = False):
        self.spec, self.x = spec, x
        self.M: list[Tensor] = []
        self.records: list = []  # (BlockShare, BlockRec) per block when keep
        L = len(spec.blocks)
        self.last = None

        def on_block(li: int, rec) -> None:
            last = li == L - 1
            bs = block_share(spec.blocks[li], rec, keep=keep or last, keep_w=keep)
            self.M.append(bs.M)
            if keep:
                self.records.append((bs, rec))
            if last:
                self.last = (bs, rec)

        self.trace = run(spec, x, upto=upto, on_block=on_block)
        out = self.trace.logits if self.trace.logits is not None else self.trace.last
        if not torch.isfinite(out).all():
            raise NonFiniteError(f"{spec.name}: NaN or inf activations in the forward pass; check the "
                                 "weights and input scale (or use dtype=torch.float64)")
        self.mu_pix = pixel_share(spec, x, self.trace.tokens0, self.trace.sig_pre)

    def down(self, R: Tensor, node: int) -> Tensor:
        """Relevance (N,S,T) at node ``node`` (input of block ``node``; L = final stream) → node 0."""
        for li in range(node - 1, -1, -1):
            R = R @ self.M[li]
        return R

    def to_pixels(self, R0: Tensor) -> tuple[Tensor, Tensor]:
        """Relevance (N,S,T) of the input tokens → maps (N,S,H,W) and sink per prefix token (N,S,E)."""
        E, (h, w), P = self.spec.n_prefix, self.spec.grid, self.spec.patch
        N, S = R0.shape[:2]
        patches = R0[..., E:].reshape(N, S, h, w)
        up = patches.repeat_interleave(P, -2).repeat_interleave(P, -1)
        return up * self.mu_pix[:, None], R0[..., :E]

    def class_relevance(self, target: Tensor, contrast: str = "mean") -> tuple[Tensor, int]:
        """(R (N,T), node) of ⟨output, d⟩ at the class-initialisation node, contrasted. ``target``: class ids
        (N,) (d one-hot) or directions d (N, K) in output space."""
        if self.trace.logits is None:
            raise SaeCafeError("ViTSRD was built with upto=...; class relevance needs the full forward")
        R, node = class_relevance(self.spec, self.trace, self.direction(target), self.last)
        if contrast == "mean":
            E = self.spec.n_prefix
            R = torch.cat([R[:, :E], R[:, E:] - R[:, E:].mean(1, keepdim=True)], 1)
        elif contrast not in ("none", None):
            raise SaeCafeError(f"unknown contrast {contrast!r}; use 'mean' or 'none'")
        return R, node

    def direction(self, target: Tensor) -> Tensor:
        """Output-space direction d (N, K): one-hot rows for class ids (N,), else ``target`` itself."""
        out = self.trace.logits
        if target.is_floating_point() and target.ndim == 2:
            return target.to(device=out.device, dtype=out.dtype)
        return torch.nn.functional.one_hot(target.to(out.device).long(), out.shape[1]).to(out.dtype)


# ----- backend ----------------------------------------------------------------------------------------------
def _verify(spec: Spec, model: torch.nn.Module, x: Tensor) -> int:
    """The functional forward must reproduce ``model(x)`` (fused attention hides the probabilities); returns
    the number of outputs."""
    with torch.no_grad(), eval_mode(model):
        ref = model(x)
        ours = run(spec, x).logits
    if not torch.isfinite(ref).all():
        raise NonFiniteError(f"{spec.name}: model(x) has NaN or inf logits; check the weights and the input")
    err = float((ours - ref).abs().max())
    tol = (1e-3 if ref.dtype != torch.float64 else 1e-8) * max(1.0, float(ref.abs().max()))
    if not err <= tol:
        raise UnsupportedModuleError(f"{spec.name}: the recomputed ViT forward does not reproduce model(x) "
                                     f"(max |Δlogit| = {err:.3g}); this variant is not supported by ViT SRD")
    return int(ref.shape[1])


def _grad(differentiable: bool):
    return torch.enable_grad() if differentiable else torch.no_grad()


def _token_index(spec: Spec, position, n: int, device) -> Tensor:
    """(N,) token index (prefix tokens first) of an iERF position."""
    h, w = spec.grid
    E = spec.n_prefix
    if isinstance(position, str):
        if position != "cls" or not spec.has_cls:
            raise MismatchError(f"position {position!r}: only 'cls' is a named token (and only with a "
                                "class token)")
        return torch.zeros(n, dtype=torch.long, device=device)
    if isinstance(position, Tensor):
        pos = position.to(device).long()
        if pos.shape != (n, 2):
            raise MismatchError(f"position tensor must be (N,2)=({n},2) (row, col), got {tuple(pos.shape)}")
    elif isinstance(position, int) and not isinstance(position, bool):
        if not 0 <= position < h * w:
            raise MismatchError(f"patch index {position} is off the {h}×{w} grid (0 ≤ index < {h * w})")
        return torch.full((n,), E + position, dtype=torch.long, device=device)
    elif isinstance(position, tuple | list) and len(position) == 2:
        pos = torch.tensor([list(position)], device=device).long().expand(n, 2)
    else:
        raise MismatchError(f"position {position!r}: use (row, col), a patch index, 'cls' or a (N,2) tensor")
    if ((pos[:, 0] < 0) | (pos[:, 0] >= h) | (pos[:, 1] < 0) | (pos[:, 1] >= w)).any():
        raise MismatchError(f"position {pos.tolist()} is off the {h}×{w} patch grid")
    return E + pos[:, 0] * w + pos[:, 1]


class ViTBackend(SRDBackend):
    """Token/attention SRD backend for pre-LN ViTs (the adapter needs ``block_index``).

    ``dtype`` other than the model's computes on a deep copy cast to it, cached per model and weights
    version. Sinks are per prefix token (class/register tokens): (…, E).
    """

    def spec(self, x: Tensor, dtype: torch.dtype | None) -> tuple[Spec, Tensor, int]:
        """(spec, x on the spec's device/dtype, number of outputs); the functional forward is checked against
        model(x[:1]) once per model, dtype, input grid (models taking several sizes) and weights version."""
        model = self.adapter.model
        p = next(model.parameters())
        dtype = dtype or p.dtype
        grid = None
        if getattr(model, "dynamic_img_size", False):
            P = self.adapter.patch_size
            if x.shape[-2] % P or x.shape[-1] % P:
                raise MismatchError(f"{self.name}: image size {tuple(x.shape[-2:])} is not a multiple of the "
                                    f"patch size {P}; resize or crop the images")
            grid = (x.shape[-2] // P, x.shape[-1] // P)

        def work() -> tuple[torch.nn.Module, int]:  # never touch the user's model
            return (model if dtype == p.dtype else copy.deepcopy(model).to(dtype)), 0

        def build() -> tuple[Spec, int]:
            w = cached_build(model, ("vit-work", dtype), work)[0]
            spec = self.build_spec(w, grid)
            xs = x.to(device=p.device, dtype=dtype)
            check_input(spec, xs)
            return spec, _verify(spec, w, xs[:1].detach())

        spec, n_out = cached_build(model, ("vit", dtype, grid), build)
        self.headless = spec.headless
        x = x.to(device=p.device, dtype=dtype)
        check_input(spec, x)
        return spec, x, n_out

    def build_spec(self, model: torch.nn.Module, grid: tuple[int, int] | None) -> Spec:
        """The :class:`Spec` of ``model`` (the working copy in the compute dtype) for patch grid ``grid``.
        Backends of other libraries' ViTs (``models/hf_vit.py``, ``models/openclip_vit.py``) override it."""
        return make_spec(model, grid)

    def prepare(self, x, dtype):
        return self.spec(x, dtype)[2]

    def saliency(self, x, target, contrast, differentiable, dtype):
        with _grad(differentiable):
            spec, x, _ = self.spec(x, dtype)
            srd = ViTSRD(spec, x)
            R, node = srd.class_relevance(target.to(x.device), contrast)
            maps, sink = srd.to_pixels(srd.down(R[:, None], node))
            return maps[:, 0], sink[:, 0]

    def relevance(self, x, target, layers, contrast, dtype):
        idx = {key: self.adapter.block_index(name) for key, name in layers.items()}
        with torch.no_grad():
            spec, x, _ = self.spec(x, dtype)
            srd = ViTSRD(spec, x)
            t = target.to(x.device)
            R, node = srd.class_relevance(t, contrast)
            E, (h, w) = spec.n_prefix, spec.grid
            by_node = {}
            L = len(spec.blocks)
            if node < L:  # token readout: the final stream holds the output on the readout token(s)
                by_node[L] = readout_values(spec, srd.trace, srd.direction(t))
            by_node[node] = R
            for k in range(node - 1, 0, -1):
                R = (R[:, None] @ srd.M[k])[:, 0]
                by_node[k] = R
            out = {key: by_node[i + 1][:, E:].reshape(-1, h, w) for key, i in idx.items()}
            sinks = {key: by_node[i + 1][:, :E] for key, i in idx.items()}
        return out, sinks

    def ierf_from_relevance(self, x, layer, relevance, differentiable, dtype):
        li = self.adapter.block_index(layer)
        with _grad(differentiable):
            spec, x, _ = self.spec(x, dtype)
            N, E, (h, w) = x.shape[0], spec.n_prefix, spec.grid
            T = E + h * w
            rel = relevance.to(device=x.device, dtype=x.dtype)
            if rel.ndim == 4 and rel.shape[0] == N and rel.shape[2:] == (h, w):
                rel = torch.cat([rel.new_zeros(N, rel.shape[1], E), rel.flatten(2)], 2)
            elif not (rel.ndim == 3 and rel.shape[0] == N and rel.shape[2] == T):
                raise MismatchError(f"relevance must be (N,S,{h},{w}) or (N,S,{T}) for N={N}, got "
                                    f"{tuple(relevance.shape)}")
            srd = ViTSRD(spec, x, upto=li)
            return srd.to_pixels(srd.down(rel, li + 1))

    def ierf(self, x, layer, position, differentiable, dtype):
        li = self.adapter.block_index(layer)
        with _grad(differentiable):
            spec, x, _ = self.spec(x, dtype)
            N, T = x.shape[0], spec.n_prefix + spec.grid[0] * spec.grid[1]
            tok = _token_index(spec, position, N, x.device)
            seed = torch.nn.functional.one_hot(tok, T).to(x.dtype)[:, None]
            srd = ViTSRD(spec, x, upto=li)
            maps, sink = srd.to_pixels(srd.down(seed, li + 1))
            return maps[:, 0], sink[:, 0]

    def apop(self, x, x_prime, dtype):
        spec, x, _ = self.spec(x, dtype)
        xp = x_prime.to(device=x.device, dtype=x.dtype)
        with torch.no_grad():  # the pattern of x is a constant: gradients flow to x_prime only
            frozen = run(spec, x, record=True).frozen
        return run(spec, xp, frozen=frozen).logits


# ----- ViT entry points (the public API restricted to ViT adapters) ----------------------------------------
def _vit(adapter):
    adapter = get_adapter(adapter)
    backend = adapter.srd_backend() if callable(getattr(adapter, "srd_backend", None)) else None
    if not isinstance(backend, ViTBackend):
        raise MismatchError(f"vit SRD needs a ViT adapter, got {adapter!r}")
    return adapter, backend


def vit_srd_sharing(adapter, x: Tensor, layer=None, dtype: torch.dtype | None = None,
                    differentiable: bool = False) -> ViTSRD:
    """Sharing ratios of x (N,3,H,W) up to block ``layer`` (all blocks and the head when None), for reuse."""
    adapter, backend = _vit(adapter)
    upto = None if layer is None else adapter.block_index(layer)
    x = check_images(x, adapter.name)
    with _grad(differentiable):
        spec, x, _ = backend.spec(x, dtype)
        return ViTSRD(spec, x, upto=upto)


def vit_srd_saliency(adapter, x: Tensor, target, contrast: str | None = None, return_sink=False,
                     differentiable: bool = False, dtype: torch.dtype | None = None):
    """Saliency maps (N,H,W) of logit ``target`` or of ⟨output, direction⟩ for a float ``target`` (K,) /
    (N,K) (see :func:`sae_cafe.srd.srd_saliency`); with ``return_sink`` also the sink (N,) or (N,E)."""
    return srd_saliency(_vit(adapter)[0], x, target, contrast=contrast, differentiable=differentiable,
                        dtype=dtype, return_sink=return_sink)


def vit_srd_relevance(adapter, x: Tensor, target, layers, contrast: str | None = None, return_sink=False,
                      dtype: torch.dtype | None = None):
    """Patch-token relevance {str(layer): (N,h,w)} at the output of each block in ``layers`` (keys as given,
    like the CNN engine). With ``return_sink`` returns (dict, {str(layer): (N,E) prefix-token relevance}).
    """
    return srd_relevance(_vit(adapter)[0], x, target, layers, contrast=contrast, dtype=dtype,
                         return_sink="tokens" if return_sink else False)


def vit_srd_ierf_from_relevance(adapter, x: Tensor, layer, relevance: Tensor, return_sink=False,
                                differentiable: bool = False, dtype: torch.dtype | None = None):
    """Pixel maps (N,S,H,W) of relevance at the output of block ``layer``: (N,S,h,w) on the patch grid or
    (N,S,T) over all tokens (prefix first). Sink (N,S) or, with ``return_sink="tokens"``, (N,S,E)."""
    return srd_ierf_from_relevance(_vit(adapter)[0], x, layer, relevance, differentiable=differentiable,
                                   dtype=dtype, return_sink=return_sink)


def vit_srd_ierf(adapter, x: Tensor, layer, position, return_sink=False, differentiable: bool = False,
                 dtype: torch.dtype | None = None):
    """iERF (N,H,W) of the token at ``position`` in the output of block ``layer``; maps + sink sum to 1."""
    return srd_ierf(_vit(adapter)[0], x, layer, position, differentiable=differentiable, dtype=dtype,
                    return_sink=return_sink)


def vit_apop_forward(adapter, x: Tensor, x_prime: Tensor | None = None,
                     dtype: torch.dtype | None = None) -> Tensor:
    """Logits of ``x_prime`` (default zeros) with x's attention probabilities, LayerNorm σ and activation
    gates act(z)/z frozen (LayerNorm centring kept as a projection); ``x_prime = x`` gives model(x).
    Affine in ``x_prime``; differentiable with respect to ``x_prime`` only."""
    return apop_forward(_vit(adapter)[0], x, 0.0 if x_prime is None else x_prime, dtype=dtype)
