"""ICAT: attribution from SAE latents at a source layer to SAE latents (or class logits) at a later layer.

For an image, the source layer's PFVs ``v`` (B, N, D) are written as ``decode(a) + e`` with the SAE codes
``a = encode(v)`` (B, N, S) and a frozen error term ``e = v - decode(a)``; class/register tokens (ViT) are
frozen as well. Only the sub-network ``F_{l→l'}`` runs (``adapter.forward_from(source, act, x, until)``),
so every score measures the direct influence inside this layer pair (layer-pair isolation, spec §4.2):
no other SAE is spliced in.

Target ``T_j``: the target SAE's encoder pre-activation of latent j at its argmax position n* (fixed from
the unmodified forward pass); options ``target_fn="post"`` (the SAE's activation) and
``aggregate="sum"`` (sum over positions). With ``target_layer="logits"`` the targets are class logits.

Written by hand: Captum attributes w.r.t. a model input; here the input is the SAE code of a hidden layer,
the output is a gathered SAE code of a later layer, and IG steps, images and targets are batched together.
``tests/test_icat.py`` checks it against Captum's ``IntegratedGradients`` on the same sub-network function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..activations.rows import capture_pfv, layer_pfv
from ..errors import MismatchError, SaeCafeError
from ..models import PFVBatch, get_adapter
from ..models.base import ModelAdapter
from ..saes import check_sae, decode, encode_pfv, sae_tokens

Method = Literal["ig", "grad", "grad_x_input", "ablation", "random"]
METHODS: tuple[str, ...] = ("ig", "grad", "grad_x_input", "ablation", "random")
LOGITS = "logits"


# ----- SAE helpers ------------------------------------------------------------------------------------------
def sae_encode_with_pre(sae, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Any ``sae_lens.SAE``: (post, pre) encoder outputs for inputs (..., D) → (..., S) each
    (:func:`sae_cafe.saes.encode_pfv` with ``return_pre``; an SAE without a readable pre-activation raises)."""
    return encode_pfv(sae, v, return_pre=True)


def sae_width(sae) -> int:
    return int(sae.cfg.d_sae)


def check_patch_sae(sae, layer: str | int) -> None:
    """ICAT's source and target rows are the patch tokens (class / register tokens are frozen), so an SAE
    trained on class tokens only (``metadata.sae_cafe.tokens == "cls"``, :func:`sae_cafe.saes.sae_tokens`) has
    no latents here: refused with a :class:`MismatchError` before any work. (Attributing class-token latents
    would need another frozen state, target position and baseline; not supported.) ``"all"`` SAEs are used on
    their patch rows."""
    if sae_tokens(sae) == "cls":
        raise MismatchError(f"the SAE for layer {str(layer)!r} (d_sae={sae_width(sae)}) was trained on class tokens "
                            "only (metadata sae_cafe.tokens='cls'); ICAT attributes between patch-token latents, "
                            "so it has none to explain — use an SAE of this layer trained with tokens 'patch' or "
                            "'all' (`sae-cafe train-sae --token-kinds patch`)")


# ----- the fixed state of one layer pair on one batch of images -------------------------------------------
@dataclass
class PairContext:
    """Everything fixed from the unmodified forward pass of one layer pair on a batch.

    Attributes:
        a_BNS: source SAE codes; err_BND: frozen error term; extra: frozen ViT class tokens or None.
        t_full_BT: all target values on the unmodified forward (B, S_target or num_classes).
        n_star_BT: argmax positions of the target latents (B, S_target); None for logits.
        readout: (C, K) rows applied to the model output when the target is ``logits`` (targets are then
            ⟨output, readout[c]⟩, e.g. one direction of a headless backbone's pooled feature); None: the output.
    """

    adapter: ModelAdapter
    source: str
    target: str
    sae_src: object
    sae_tgt: object | None
    x: torch.Tensor
    a_BNS: torch.Tensor
    err_BND: torch.Tensor
    extra: torch.Tensor | None
    positions: torch.Tensor
    grid: tuple[int, int]
    t_full_BT: torch.Tensor
    n_star_BT: torch.Tensor | None
    target_fn: str = "pre"
    aggregate: str = "argmax"
    readout: torch.Tensor | None = None
    _prefix_free: bool | None = field(default=None, repr=False)
    pfv_BND: torch.Tensor | None = field(default=None, repr=False)  # source PFVs (per-input normalised SAEs)

    @property
    def n_images(self) -> int:
        return self.a_BNS.shape[0]

    @property
    def n_sources(self) -> int:
        return self.a_BNS.shape[2]

    @property
    def n_targets(self) -> int:
        return self.t_full_BT.shape[1]

    def _x_for(self, rows: torch.Tensor) -> torch.Tensor:
        """Input for the (discarded) prefix: one image when the sub-network provably ignores it."""
        if self._prefix_free is None:
            r = torch.arange(min(2, self.n_images))
            with torch.no_grad():
                full = self._run(self._act(self.a_BNS[r], r), self.x[r])
                small = self._run(self._act(self.a_BNS[r], r), self.x[:1])
            self._prefix_free = bool(full.shape == small.shape and torch.allclose(full, small, atol=1e-6))
        return self.x[:1] if self._prefix_free else self.x[rows]

    def _act(self, a_MNS: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        recon = decode(self.sae_src, a_MNS, None if self.pfv_BND is None else self.pfv_BND[rows]) + self.err_BND[rows]
        extra = None if self.extra is None else self.extra[rows]
        return self.adapter.from_pfv(PFVBatch(recon, self.positions, self.grid, extra))

    def _run(self, act: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        until = None if self.target == LOGITS else self.target
        out = self.adapter.forward_from(self.source, act, x, until=until)
        return out if self.readout is None or until is not None else out @ self.readout.T.to(out)

    def evaluate(self, a_MNS: torch.Tensor, rows: torch.Tensor, targets_MJ: torch.Tensor) -> torch.Tensor:
        """T for codes ``a_MNS`` of images ``rows`` (M,) and target ids ``targets_MJ`` (M, J) → (M, J)."""
        out = self._run(self._act(a_MNS, rows), self._x_for(rows))
        return self.read_targets(out, rows, targets_MJ)

    def read_targets(self, out: torch.Tensor, rows: torch.Tensor, targets_MJ: torch.Tensor) -> torch.Tensor:
        if self.target == LOGITS:
            return out.gather(1, targets_MJ)
        pfv = self.adapter.to_pfv(out).pfv
        val = sae_encode_with_pre(self.sae_tgt, pfv)[1] if self.target_fn == "pre" else encode_pfv(self.sae_tgt, pfv)
        if self.aggregate == "sum":
            return val.sum(1).gather(1, targets_MJ)
        n = self.n_star_BT[rows].gather(1, targets_MJ)  # (M, J)
        return val[torch.arange(len(rows))[:, None], n, targets_MJ]


def _canonical(adapter: ModelAdapter, layer: str | int) -> str:
    return LOGITS if str(layer) == LOGITS else adapter.resolve_layer(layer)


def _find_sae(saes: dict, adapter: ModelAdapter, layer: str):
    for k, v in saes.items():
        if str(k) == layer or (str(k) != LOGITS and adapter.resolve_layer(k) == layer):
            return v
    raise SaeCafeError(f"no SAE for layer {layer!r} in `saes` (has {list(saes)}); pass {{layer: sae}} "
                       "for the source and the target layer")


@torch.no_grad()
def prepare_pair(model, saes: dict, x: torch.Tensor, source_layer: str | int, target_layer: str | int,
                 target_fn: Literal["pre", "post"] = "pre",
                 aggregate: Literal["argmax", "sum"] = "argmax", readout: torch.Tensor | None = None) -> PairContext:
    """Run the unmodified forward once and fix codes, error term, n* and the full target values.
    ``readout`` (C, K): with ``target_layer="logits"``, the targets are ⟨output, readout[c]⟩ (K = output width)."""
    adapter = get_adapter(model)
    src, tgt = _canonical(adapter, source_layer), _canonical(adapter, target_layer)
    if src == LOGITS:
        raise SaeCafeError("source_layer cannot be 'logits'")
    if target_fn not in ("pre", "post") or aggregate not in ("argmax", "sum"):
        raise SaeCafeError(f"target_fn must be 'pre'|'post' and aggregate 'argmax'|'sum', got {target_fn!r}, "
                           f"{aggregate!r}")
    names = adapter._pfv_layer_names()
    if tgt != LOGITS and names.index(tgt) <= names.index(src):
        raise SaeCafeError(f"target layer {tgt!r} must come after source layer {src!r}")
    x = x.to(adapter.device)
    sae_src = _find_sae(saes, adapter, src)
    sae_tgt = None if tgt == LOGITS else _find_sae(saes, adapter, tgt)
    check_patch_sae(sae_src, src)
    if sae_tgt is not None:
        check_patch_sae(sae_tgt, tgt)
    if tgt == LOGITS:
        sb = layer_pfv(adapter, x, src)
        logits = adapter(x)
        if readout is not None:
            if readout.ndim != 2 or readout.shape[1] != logits.shape[1]:
                raise MismatchError(f"readout has shape {tuple(readout.shape)}; give (C, {logits.shape[1]}) "
                                    f"rows of the model's output width {logits.shape[1]}")
            readout = readout.to(logits)
            logits = logits @ readout.T
    else:
        pfvs = capture_pfv(adapter, x, [src, tgt])
        sb = pfvs[src]
    check_sae(sae_src, adapter, src, check_model=False, source=f"the SAE for layer {src!r}")
    a = encode_pfv(sae_src, sb.pfv)
    err = sb.pfv - decode(sae_src, a, sb.pfv)
    n_star = None
    if tgt == LOGITS:
        t_full = logits
    else:
        tb = pfvs[tgt]
        check_sae(sae_tgt, adapter, tgt, check_model=False, source=f"the SAE for layer {tgt!r}")
        if target_fn == "post" and aggregate == "sum":  # the only target that needs no pre-activation
            t_full = encode_pfv(sae_tgt, tb.pfv).sum(1)
        else:
            post, pre = sae_encode_with_pre(sae_tgt, tb.pfv)  # (B, N', S_t)
            # n*: argmax of the activation; where a latent never fires, argmax of its pre-activation
            fired = post.amax(1) > 0
            n_star = torch.where(fired, post.argmax(1), pre.argmax(1))
            val = pre if target_fn == "pre" else post
            t_full = val.sum(1) if aggregate == "sum" else val.gather(1, n_star[:, None, :])[:, 0]
    return PairContext(adapter, src, tgt, sae_src, sae_tgt, x, a, err, sb.extra, sb.positions, sb.grid,
                       t_full, n_star, target_fn, aggregate, readout if tgt == LOGITS else None, pfv_BND=sb.pfv)


# ----- baselines and IG quadrature --------------------------------------------------------------------------
def resolve_baseline(ctx: PairContext, baseline: str | torch.Tensor) -> torch.Tensor:
    """Baseline codes (S,): ``"zeros"``, ``"mean"`` (mean code over this batch's positions and images) or a
    given (S,) tensor (e.g. dataset means from :func:`latent_means`)."""
    S = ctx.n_sources
    if isinstance(baseline, torch.Tensor):
        if baseline.shape != (S,):
            raise MismatchError(f"baseline tensor has shape {tuple(baseline.shape)}, expected ({S},)")
        return baseline.to(ctx.a_BNS)
    if baseline == "zeros":
        return torch.zeros(S, dtype=ctx.a_BNS.dtype, device=ctx.a_BNS.device)
    if baseline == "mean":
        return ctx.a_BNS.mean((0, 1))
    raise SaeCafeError(f"baseline must be 'zeros', 'mean' or a ({S},) tensor, got {baseline!r}")


@torch.no_grad()
def latent_means(model, sae, x: torch.Tensor, layer: str | int, batch_size: int = 32) -> torch.Tensor:
    """Dataset-mean SAE code (S,) of ``layer`` over images ``x`` (N, 3, H, W) and all positions."""
    adapter = get_adapter(model)
    layer = adapter.resolve_layer(layer)
    check_patch_sae(sae, layer)
    total, count = None, 0
    for i in range(0, len(x), batch_size):
        pfv = layer_pfv(adapter, x[i:i + batch_size].to(adapter.device), layer).pfv
        a = encode_pfv(sae, pfv)
        s = a.sum((0, 1))
        total = s if total is None else total + s
        count += a.shape[0] * a.shape[1]
    return total / count


def ig_quadrature(steps: int, rule: Literal["riemann_right", "trapezoid"] = "trapezoid"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas, weights) of the IG path integral. ``riemann_right``: α = s/m, w = 1/m (s = 1..m), the same
    alphas as Captum's ``riemann_right``. ``trapezoid``: m points α ∈ linspace(0, 1), w = 1/(m-1) with the
    ends halved (weights sum to 1; Captum's own trapezoid weights sum to (m-1)/m)."""
    if steps < 2:
        raise SaeCafeError(f"steps must be ≥ 2, got {steps}")
    if rule == "riemann_right":
        return torch.linspace(1 / steps, 1, steps), torch.full((steps,), 1 / steps)
    if rule == "trapezoid":
        w = torch.full((steps,), 1 / (steps - 1))
        w[0] /= 2
        w[-1] /= 2
        return torch.linspace(0, 1, steps), w
    raise SaeCafeError(f"rule must be 'riemann_right' or 'trapezoid', got {rule!r}")


# ----- the attribution ----------------------------------------------------------------------------------------
@dataclass
class ICATResult:
    """Scores of one layer pair.

    Attributes:
        scores_BSJ: (B, S_source, J) attribution of source latent k to target ``targets_BJ[b, j]``.
        targets_BJ: (B, J) target latent (or class) ids.
        t_full_BJ: T on the unmodified forward; t_base_BJ: T with all codes at the baseline.
        completeness_err_BJ: |Σ_k score − (T_full − T_base)| / max(|T_full − T_base|, 1e-8) (IG only).
    """

    source: str
    target: str
    method: str
    scores_BSJ: torch.Tensor
    targets_BJ: torch.Tensor
    t_full_BJ: torch.Tensor
    t_base_BJ: torch.Tensor
    completeness_err_BJ: torch.Tensor | None
    baseline_S: torch.Tensor
    n_targets: int
    score_sum_BJ: torch.Tensor | None = None

    def completeness_error(self) -> float:
        """Aggregate IG completeness error Σ_bj |Σ_k score − ΔT| / Σ_bj |ΔT| (ΔT = T_full − T_base; the
        sum runs over every source latent, also when ``active_only`` zeroed the inactive ones' scores)."""
        delta = self.t_full_BJ - self.t_base_BJ
        ssum = self.score_sum_BJ if self.score_sum_BJ is not None else self.scores_BSJ.sum(1)
        return float((ssum - delta).abs().sum() / delta.abs().sum().clamp_min(1e-12))

    def dense(self) -> torch.Tensor:
        """(B, S_source, S_target) with zeros for targets that were not computed."""
        B, S, _ = self.scores_BSJ.shape
        out = self.scores_BSJ.new_zeros(B, S, self.n_targets)
        out.scatter_(2, self.targets_BJ[:, None, :].expand(B, S, -1), self.scores_BSJ)
        return out

    def sparse(self) -> torch.Tensor:
        """The same as :meth:`dense` as a sparse COO tensor holding only non-zero scores."""
        return self.dense().to_sparse()


def _targets_BJ(ctx: PairContext, targets, top_k_targets: int | None) -> torch.Tensor:
    B, T = ctx.n_images, ctx.n_targets
    dev = ctx.a_BNS.device
    if targets is not None and top_k_targets is not None:
        raise SaeCafeError("pass either `targets` or `top_k_targets`, not both")
    if top_k_targets is not None:
        return ctx.t_full_BT.topk(min(top_k_targets, T), dim=1).indices
    if targets is None:
        return torch.arange(T, device=dev).expand(B, T).contiguous()
    t = torch.as_tensor(targets, device=dev).long()
    if t.ndim == 1:
        t = t.expand(B, -1).contiguous()
    if t.ndim != 2 or t.shape[0] != B or (t.numel() and (t.min() < 0 or t.max() >= T)):
        raise SaeCafeError(f"targets must be ids in [0, {T}) shaped (J,) or ({B}, J), got shape "
                           f"{tuple(t.shape)}")
    return t


def _vjp_all(T_MJ: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """Gradients of every column of ``T_MJ`` w.r.t. ``inp`` (M, N, S) → (J, M, N, S); rows independent."""
    J = T_MJ.shape[1]
    eye = torch.eye(J, dtype=T_MJ.dtype, device=T_MJ.device)[:, None, :].expand(J, T_MJ.shape[0], J)
    try:
        (g,) = torch.autograd.grad(T_MJ, inp, grad_outputs=eye, is_grads_batched=True, retain_graph=True)
        return g
    except RuntimeError:  # an op without a batching rule: loop over targets
        return torch.stack([torch.autograd.grad(T_MJ[:, j].sum(), inp, retain_graph=j < J - 1)[0]
                            for j in range(J)])


def _gradient_terms(ctx: PairContext, rows: torch.Tensor, alphas: torch.Tensor, weights: torch.Tensor,
                    base_S: torch.Tensor, targets_BJ: torch.Tensor, batch_size: int,
                    times_input: bool) -> torch.Tensor:
    """Σ_s w_s Σ_n [(a − a')·] ∂T_j/∂a_{nk} at a' + α_s (a − a') for images ``rows`` → (R, S, J)."""
    a = ctx.a_BNS[rows]
    diff = a - base_S
    R, S, J = len(rows), ctx.n_sources, targets_BJ.shape[1]
    out = a.new_zeros(R, S, J)
    # all (image, step) rows, image-major, cut into chunks of at most batch_size sub-network inputs
    img = torch.arange(R).repeat_interleave(len(alphas))
    stp = torch.arange(len(alphas)).repeat(R)
    for c in range(0, len(img), batch_size):
        i, s = img[c:c + batch_size], stp[c:c + batch_size]
        al = alphas.to(a)[s][:, None, None]
        inp = (base_S + al * diff[i]).detach().requires_grad_(True)
        with torch.enable_grad():
            T = ctx.evaluate(inp, rows[i], targets_BJ[rows[i]])
            g = _vjp_all(T, inp)  # (J, M, N, S)
        if times_input:
            g = g * diff[i]
        contrib = g.sum(2).permute(1, 2, 0) * weights.to(a)[s][:, None, None]  # (M, S, J)
        out.index_add_(0, i.to(out.device), contrib.detach())
    return out


@torch.no_grad()
def _ablation(ctx: PairContext, rows: torch.Tensor, base_S: torch.Tensor, targets_BJ: torch.Tensor,
              t_full_RJ: torch.Tensor, batch_size: int, active_only: bool) -> torch.Tensor:
    """T(a) − T(a with latent k's codes set to its baseline at every position) → (R, S, J)."""
    a = ctx.a_BNS[rows]
    R, S, J = len(rows), ctx.n_sources, targets_BJ.shape[1]
    out = a.new_zeros(R, S, J)
    differs = (a != base_S).any(1)  # (R, S)
    if active_only:
        differs &= (a != 0).any(1)
    pairs = differs.nonzero()  # (P, 2): (image, latent)
    for c in range(0, len(pairs), batch_size):
        i, k = pairs[c:c + batch_size, 0], pairs[c:c + batch_size, 1]
        inp = a[i].clone()
        inp[torch.arange(len(i)), :, k] = base_S[k][:, None]
        T = ctx.evaluate(inp, rows[i], targets_BJ[rows[i]])
        out[i, k] = t_full_RJ[i] - T
    return out


@torch.no_grad()
def _eval_rows(ctx: PairContext, a_MNS: torch.Tensor, rows: torch.Tensor, targets_BJ: torch.Tensor,
               batch_size: int) -> torch.Tensor:
    outs = [ctx.evaluate(a_MNS[c:c + batch_size], rows[c:c + batch_size], targets_BJ[rows[c:c + batch_size]])
            for c in range(0, len(rows), batch_size)]
    return torch.cat(outs)


def attribute_pair(ctx: PairContext, method: Method = "ig", steps: int = 32,
                   baseline: str | torch.Tensor = "zeros", targets=None, top_k_targets: int | None = None,
                   rule: Literal["riemann_right", "trapezoid"] = "trapezoid", batch_size: int = 64,
                   active_only: bool = False, seed: int = 0) -> ICATResult:
    """Attribution scores of one prepared layer pair (see :func:`attribute`)."""
    if method not in METHODS:
        raise SaeCafeError(f"unknown ICAT method {method!r}; choose one of {METHODS}")
    base_S = resolve_baseline(ctx, baseline)
    tg = _targets_BJ(ctx, targets, top_k_targets)
    B = ctx.n_images
    rows = torch.arange(B, device=ctx.a_BNS.device)
    t_full = ctx.t_full_BT.gather(1, tg)
    t_base = _eval_rows(ctx, base_S.expand_as(ctx.a_BNS).contiguous(), rows, tg, batch_size)
    comp = None
    if method == "ig":
        alphas, weights = ig_quadrature(steps, rule)
        scores = _gradient_terms(ctx, rows, alphas, weights, base_S, tg, batch_size, times_input=True)
        delta = t_full - t_base
        comp = (scores.sum(1) - delta).abs() / delta.abs().clamp_min(1e-8)
    elif method in ("grad", "grad_x_input"):
        one = torch.ones(1)
        scores = _gradient_terms(ctx, rows, one, one, base_S, tg, batch_size,
                                 times_input=method == "grad_x_input")
    elif method == "ablation":
        scores = _ablation(ctx, rows, base_S, tg, t_full, batch_size, active_only)
    else:
        gen = torch.Generator().manual_seed(seed)
        scores = torch.randn(B, ctx.n_sources, tg.shape[1], generator=gen).to(ctx.a_BNS)
    ssum = scores.sum(1)
    if active_only:  # after the completeness sums, which need every latent that differs from the baseline
        scores = scores * (ctx.a_BNS != 0).any(1)[:, :, None]
    return ICATResult(ctx.source, ctx.target, method, scores, tg, t_full, t_base, comp, base_S,
                      ctx.n_targets, ssum)


def attribute(model, saes: dict, x: torch.Tensor, source_layer: str | int, target_layer: str | int,
              method: Method = "ig", steps: int = 32, baseline: str | torch.Tensor = "zeros",
              targets: Sequence[int] | torch.Tensor | None = None, top_k_targets: int | None = None,
              target_fn: Literal["pre", "post"] = "pre", aggregate: Literal["argmax", "sum"] = "argmax",
              rule: Literal["riemann_right", "trapezoid"] = "trapezoid", sparse: bool = False,
              batch_size: int = 64, return_result: bool = False, active_only: bool = False
              ) -> torch.Tensor | ICATResult:
    """ICAT scores from SAE latents at ``source_layer`` to latents at ``target_layer`` (or ``"logits"``).

    Args:
        model: a model adapter or an ``nn.Module``; saes: {layer: sae_lens.SAE} holding both layers.
        x: (N, 3, H, W) preprocessed images.
        method: ``ig`` (default), ``grad`` (Σ_n ∂T/∂a at the input), ``grad_x_input``, ``ablation``
            (T(a) − T(a with latent k at its baseline)), ``random``.
        steps, rule: IG quadrature: ``trapezoid`` (default; ``steps`` points α ∈ linspace(0, 1)) or
            ``riemann_right`` (α = s/steps, as Captum's ``riemann_right``); IG steps are batched.
        baseline: ``"zeros"``, ``"mean"`` (mean code of this batch) or an (S,) tensor of dataset means.
        targets: target ids (J,) or (N, J); ``top_k_targets``: the k largest targets per image;
            default: all targets (dense).
        target_fn / aggregate: T = pre-activation (or ``post``) at n* (``argmax``) or summed over positions.
        sparse: return a sparse COO tensor; return_result: return the :class:`ICATResult` (completeness).
        active_only: scores only for source latents active on the image (others 0; ablation runs faster).

    Returns:
        (N, S_source, S_target) scores (S_target = number of classes for logits), zero where a target was
        not requested.
    """
    ctx = prepare_pair(model, saes, x, source_layer, target_layer, target_fn, aggregate)
    res = attribute_pair(ctx, method, steps, baseline, targets, top_k_targets, rule, batch_size, active_only)
    if return_result:
        return res
    return res.sparse() if sparse else res.dense()
