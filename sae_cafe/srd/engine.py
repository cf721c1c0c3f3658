"""SRD propagation over a :class:`~sae_cafe.srd.graph.SRDGraph`: forward record, sharing ratios, backward.

Batched over images and over relevance seeds; no Python loops over positions. μ of a stage is computed
once per image (lazily, only for the stages a propagation visits) and reused by every seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NonFiniteError
from . import rules_post
from .graph import Branch, FrozenAffine, Head, SRDGraph
from .rules import branch_mu, fused_stage, make_scatter


class SRDRun:
    """Forward record of one batch through a stage graph, with lazily computed sharing ratios.

    Args:
        graph: the stage graph (weights already in the compute dtype).
        x: (N, 3, H, W) input in the graph's dtype.
        until: stop the forward after this node (iERFs need nothing above their layer).
        fuse: compute μ of eligible one-branch stages during the forward, from the same products that give z
            (:func:`~sae_cafe.srd.rules.fused_stage`; z then equals the model's up to float summation order).
    """

    def __init__(self, graph: SRDGraph, x: torch.Tensor, until: str | None = None, fuse: bool = False):
        self.graph, self.x = graph, x
        self.post: dict[str, torch.Tensor] = {"input": x}
        self.pre: dict[str, torch.Tensor] = {}
        self.out: dict[tuple[int, int], torch.Tensor] = {}
        self.pooled: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.frozen: dict[tuple[int, int], FrozenAffine] = {}  # input-dependent affine branches (Branch.freeze)
        self._mu: dict[int, list[torch.Tensor]] = {}
        self._terms: dict[int, tuple] = {}  # direct-route factors computed ahead (rules_post.direct_terms)
        self.n_stages = len(graph.stages)
        for i, stage in enumerate(graph.stages):
            z = self._fused(i, stage.branches[0]) if fuse and len(stage.branches) == 1 else None
            if z is None and hasattr(stage, "combine"):  # one map over all sources (a concatenation's BN)
                z = stage.combine([self.post[br.source] for br in stage.branches])
            for j, br in enumerate(stage.branches if z is None else ()):
                u = self._pool(br)[0] if br.pool is not None else self.post[br.source]
                if br.freeze is not None:
                    self.frozen[i, j] = rec = br.freeze(u)
                    out = rec.out
                else:
                    out = br.forward(u)
                self.out[i, j] = out
                z = out if z is None else z + out
            if not torch.isfinite(z.sum()):  # one reduction: NaN/inf anywhere propagates into the sum
                raise NonFiniteError(f"non-finite (NaN/inf) activations at node {stage.target!r}: check the input "
                                     "image values and the model weights for NaN/inf or overflow")
            self.pre[stage.target] = z
            self.post[stage.target] = _activate(stage.act, z) if stage.act is not None else z
            if stage.target == until:
                self.n_stages = i + 1
                break

    def _fused(self, i: int, br: Branch) -> torch.Tensor | None:
        if br.freeze is not None:
            return None
        pooled, idx = self._pool(br) if br.pool is not None else (None, None)
        res = fused_stage(br, self.post[br.source], pooled, idx)
        if res is None:
            return None
        self.out[i, 0], self._mu[i] = res[0], [res[1]]
        return res[0]

    def _pool(self, br: Branch) -> tuple[torch.Tensor, torch.Tensor]:
        key = (br.source, id(br.pool))
        if key not in self.pooled:
            self.pooled[key] = br.pool(self.post[br.source])
        return self.pooled[key]

    # ----- sharing ratios --------------------------------------------------------------------------------
    def mu(self, i: int) -> list[torch.Tensor]:
        """Per branch of stage ``i``: μ (N, J, h', w')."""
        if i not in self._mu:
            stage, z = self.graph.stages[i], self.pre[self.graph.stages[i].target]
            mus = []
            for j, br in enumerate(stage.branches):
                pooled, idx = self._pool(br) if br.pool is not None else (None, None)
                rec = self.frozen.get((i, j))
                if hasattr(br, "path_mu"):  # a branch with its own paths (e.g. Swin window attention)
                    mus.append(br.path_mu(self.post[br.source], z, self.out.get((i, j)), rec))
                elif rec is None:
                    mus.append(_branch_mu(br, self.post[br.source], z, self.out[i, j], pooled, idx))
                else:
                    mus.append(_frozen_mu(br, rec, z, self.out[i, j]))
            self._mu[i] = mus
        return self._mu[i]

    def mu_sum_error(self) -> dict[str, float]:
        """Per node, max |Σ μ − 1| over targets with ‖z‖ > 0 (diagnostic)."""
        out = {}
        for i in range(self.n_stages):
            stage = self.graph.stages[i]
            total = sum(m.sum(1) for m in self.mu(i))
            active = (self.pre[stage.target] ** 2).sum(1) > 0
            out[stage.target] = float((total - 1).abs()[active].max()) if active.any() else 0.0
        return out

    # ----- propagation -----------------------------------------------------------------------------------
    def propagate(self, seeds: dict[str, torch.Tensor], record: tuple[str, ...] = (),
                  deltas: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Propagate relevance seeds (node → (N, S, h, w)) to the pixels.

        Returns the input relevance (N, S, H, W) and the relevance at the ``record`` nodes. With ``deltas``
        a dict, it is filled with |Σ R_sources − Σ R_target| per stage (conservation diagnostics).
        """
        rel: dict[str, torch.Tensor] = dict(seeds)
        recorded: dict[str, torch.Tensor] = {}
        last = max(self.graph.stage_index(n) for n in seeds)
        if not (torch.is_grad_enabled() and any(r.requires_grad for r in seeds.values())):
            self._prefetch(last, max(r.shape[1] for r in seeds.values()))
        for i in range(last, -1, -1):
            stage = self.graph.stages[i]
            r = rel.pop(stage.target, None)
            if stage.target in record and r is not None:
                recorded[stage.target] = r
            if r is None:
                continue
            N, S = r.shape[:2]
            moved = 0.0
            back = self._direct_back(i, r)
            if back is not None:  # one post-matrix branch, few maps: relevance routed without forming μ
                src = stage.branches[0].source
                rel[src] = rel[src] + back if src in rel else back
                if deltas is not None:
                    deltas[stage.target] = float((back.sum() - r.sum()).abs())
                continue
            for br, m in zip(stage.branches, self.mu(i)):
                src = self.post[br.source]
                pooled_hw = self._pool(br)[0].shape[-2:] if br.pool is not None else None
                scatter = (br.path_scatter(src.shape[-2:]) if hasattr(br, "path_scatter")
                           else make_scatter(br, src.shape[-2:], pooled_hw))
                prod = (m.unsqueeze(1) * r.unsqueeze(2)).flatten(0, 1)  # (N*S, J, h', w')
                back = scatter(prod).view(N, S, *src.shape[-2:])
                rel[br.source] = rel[br.source] + back if br.source in rel else back
                if deltas is not None:
                    moved = moved + back.sum()
            if deltas is not None:
                deltas[stage.target] = float((moved - r.sum()).abs())
        inp = rel.pop("input", None)
        if inp is None:
            inp = torch.zeros(self.x.shape[0], 1, *self.x.shape[-2:], dtype=self.x.dtype, device=self.x.device)
        return inp, recorded

    def _direct_source(self, i: int, n_maps: int) -> tuple[Branch, torch.Tensor] | None:
        """(branch, conv input) of stage ``i`` when its relevance goes by the direct route: one depthwise +
        post-matrix branch, μ not computed yet, at most ``DIRECT_MAX_MAPS`` maps per image; else None."""
        stage = self.graph.stages[i]
        if i in self._mu or len(stage.branches) != 1 or n_maps > rules_post.DIRECT_MAX_MAPS:
            return None
        br = stage.branches[0]
        if br.conv is None or br.conv.post is None or br.pool is not None or hasattr(br, "path_mu"):
            return None
        rec = self.frozen.get((i, 0))
        return br, (self.post[br.source] if rec is None else rec.source)

    def _prefetch(self, last: int, n_maps: int) -> None:
        """Everything of stages 0..``last`` that depends on the forward only, ahead of the relevance and two or
        more stages at a time (:func:`~sae_cafe.srd.rules_post.run_concurrently`): the direct-route factors of
        the depthwise + post-matrix stages (:func:`~sae_cafe.srd.rules_post.direct_terms`, their path norms
        included) and μ of the other stages. Only on CPU, outside autograd, with two or more direct stages."""
        self._terms = {}
        direct = {i: src for i in range(last + 1) if (src := self._direct_source(i, n_maps)) is not None
                  and src[0].conv.stride == (1, 1)}
        if len(direct) < 2 or self.x.device.type != "cpu" or torch.is_grad_enabled() and (
                self.x.requires_grad or any(v.requires_grad for _, v in direct.values())):
            return
        jobs, costs, keys = [], [], []
        for i, (br, v) in direct.items():
            rules_post.factors_ready(br.conv)  # filled here, not by two threads at once
            z = self.pre[self.graph.stages[i].target]
            jobs.append(lambda i=i, br=br, v=v, z=z: rules_post.direct_terms(br, v, z, **self._direct_kwargs(i, z)))
            costs.append(float(v.numel() * v.shape[1]))
            keys.append(i)
        for i in range(last + 1):
            stage = self.graph.stages[i]
            if i in direct or i in self._mu or any(br.pool is not None for br in stage.branches):
                continue
            jobs.append(lambda i=i: self.mu(i))
            costs.append(float(self.pre[stage.target].numel()))
            keys.append(None)
        for key, res in zip(keys, rules_post.run_concurrently(jobs, costs)):
            if key is not None:
                self._terms[key] = res

    def _direct_back(self, i: int, r: torch.Tensor) -> torch.Tensor | None:
        """Source relevance (N, S, H, W) of stage ``i`` by :func:`~sae_cafe.srd.rules_post.post_branch_back` (the
        μ route's numbers, in another order of sums) when :meth:`_direct_source` allows it; else None."""
        src = self._direct_source(i, r.shape[1])
        if src is None:
            return None
        br, v = src
        z, terms = self.pre[self.graph.stages[i].target], self._terms.pop(i, None)
        kwargs = self._direct_kwargs(i, z) if terms is None else {}
        return rules_post.post_branch_back(br, v, z, r, terms=terms, **kwargs)

    def _direct_kwargs(self, i: int, z: torch.Tensor) -> dict:
        """The frozen statistics of stage ``i``'s branch as keyword arguments of the direct route (parts, scale,
        ⟨b_q, z_q⟩); none for a branch without a frozen record."""
        rec = self.frozen.get((i, 0))
        if rec is None:
            return {}
        return dict(parts=getattr(rec, "node_parts", None), scale=rec.scale, bias_dot=rec.bias_dot(z))

    # ----- head: top relevance ---------------------------------------------------------------------------
    def logits(self) -> torch.Tensor:
        head = self.graph.head
        f = head.pool(self.post[head.source]).flatten(1)
        for m in head.mlp:
            f = _apply_head_module(m, f)
        return f

    def top_relevance(self, target: torch.Tensor) -> torch.Tensor:
        """Each top-node position's exact additive share of logit ``target`` (N,) — or of ⟨logits, d⟩ for a
        direction ``target`` d (N, K) — as (N, h, w).

        The head is linear given its activation pattern (ReLU masks or gates act(a)/a frozen, pool indices
        stored, dropout off): logit_y = Σ_{c,p} w_eff[c,p] v[c,p] + b_eff. The channel term of each position is
        exact; b_eff is split equally over the head's flattened cells and routed back through the head
        pooling in proportion to the share of each cell's entries a position supplies (average pools: their
        weights, e.g. b/49 per position of a 7×7 global pool; max-pools: the fraction of channels selected
        from the position).
        """
        head, v = self.graph.head, self.post[self.graph.head.source]
        with torch.enable_grad():
            vv = v if v.requires_grad else v.detach().requires_grad_(True)
            cells = head.pool(vv)  # (N, C, hc, wc)
            f = cells.flatten(1)
            w_eff = _effective_weights(head, f, target)  # (N, F)
            create = v.requires_grad
            g_chan, = torch.autograd.grad(cells, vv, w_eff.view_as(cells), create_graph=create, retain_graph=True)
            n_cells = cells.shape[2] * cells.shape[3]
            out = _logits_from(head, f)
            logit = (out * target).sum(1) if target.is_floating_point() else out.gather(1, target.view(-1, 1))[:, 0]
            b_eff = logit - (w_eff * f).sum(1)
            unit = torch.full_like(cells, 1.0 / (cells.shape[1] * n_cells))
            g_bias, = torch.autograd.grad(cells, vv, unit, create_graph=create)
        chan = (g_chan * v).sum(1)
        bias = g_bias.sum(1) * b_eff.view(-1, 1, 1)
        return chan + bias


#: parameter-free element-wise activations (module classes; also ``torch.relu``): layout-independent
_POINTWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Sigmoid)


def _activate(act, z: torch.Tensor) -> torch.Tensor:
    """act(z) (N, C, h, w); a node stored channel-last (a permuted Linear output, as in a ConvNeXt block) goes
    through its dense (N, h, w, C) view: element-wise kernels on the permuted view measured 1.8-3× slower."""
    if ((isinstance(act, _POINTWISE) or act is torch.relu) and z.dim() == 4 and not z.is_contiguous()
            and z.permute(0, 2, 3, 1).is_contiguous()):
        return act(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return act(z)


def _branch_mu(br: Branch, v: torch.Tensor, z: torch.Tensor, out: torch.Tensor, pooled: torch.Tensor | None,
               idx: torch.Tensor | None, bias_map: torch.Tensor | None = None) -> torch.Tensor:
    """μ of one branch: :func:`~sae_cafe.srd.rules_post.post_branch_mu` for a depthwise conv with a post matrix,
    else :func:`~sae_cafe.srd.rules.branch_mu`."""
    if br.conv is not None and br.conv.post is not None:
        return rules_post.post_branch_mu(br, v, z, bias_map)
    return branch_mu(br, v, z, out, pooled, idx, bias_map=bias_map)


def _frozen_mu(br: Branch, rec: FrozenAffine, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """μ of a branch ``z_b = s_q·conv(u)_q + b_q`` with a frozen per-target scale s_q > 0 and bias map b_q.

    Dividing the node by s_q leaves every ratio unchanged: with z' = z/s_q and bias b_q/s_q,
    (⟨conv_k u, z'⟩ + frac_k⟨b_q/s_q, z'⟩)/‖z'‖² = (s_q⟨conv_k u, z⟩ + frac_k⟨b_q, z⟩)/‖z‖² (frac_k, a ratio of
    norms at one target, is scale-free), so the ordinary branch rule applies to the conv's input u.
    """
    if br.conv is not None and br.conv.post is not None:  # the same ratios without dividing the maps by s
        return rules_post.post_branch_mu(br, rec.source, z, scale=rec.scale, parts=getattr(rec, "node_parts", None),
                                         bias_dot=rec.bias_dot(z))
    bias = rec.bias_map()
    if rec.scale is None:
        return _branch_mu(br, rec.source, z, out, None, None, bias_map=bias)
    if bias is None and br.bias is not None:
        bias = br.bias.view(1, -1, 1, 1)
    s = rec.scale
    return branch_mu(br, rec.source, z / s, out / s, None, None, bias_map=bias / s if bias is not None else None)


def _apply_head_module(m: nn.Module, f: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(m, nn.Linear):
        return F.linear(f, m.weight.to(f.dtype), m.bias.to(f.dtype) if m.bias is not None else None)
    if isinstance(m, (nn.Dropout, nn.Identity, nn.Flatten)):
        return f
    return f * gate if gate is not None else m(f)


def _logits_from(head: Head, f: torch.Tensor) -> torch.Tensor:
    for m in head.mlp:
        f = _apply_head_module(m, f)
    return f


def _effective_weights(head: Head, f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """w_eff (N, F): row ``target`` of W_L·J_{L-1}·…·W_1 with this input's activation gates diag(act(a)/a) and
    frozen-statistics maps (modules with ``frozen_vjp``, e.g. a LayerNorm with σ frozen) as the J's."""
    steps, a, last, n_last = [], f, None, 0
    for m in head.mlp:
        if isinstance(m, nn.Linear):
            last, n_last, weight = m, len(steps), m.weight.to(f.dtype)
            steps.append(lambda w, W=weight: w @ W)
            a = _apply_head_module(m, a)
        elif isinstance(m, (nn.Dropout, nn.Identity, nn.Flatten)):
            continue
        elif hasattr(m, "frozen_vjp"):
            steps.append(m.frozen_vjp(a))
            a = m(a)
        else:
            out = m(a)
            safe = torch.where(a != 0, a, torch.ones_like(a))
            gate = torch.where(a != 0, out / safe, torch.zeros_like(a))
            steps.append(lambda w, g=gate: w * g)
            a = out
    W = last.weight.to(f.dtype)  # what follows the last Linear is not decomposed
    w = target.to(f.dtype) @ W if target.is_floating_point() else W[target]  # (N, out_{L-1}); direction or row
    for step in reversed(steps[:n_last]):
        w = step(w)
    return w
