"""SRD on torchvision Swin Transformer v1 (shifted window attention with relative position bias as frozen
attention, patch merging, LayerNorms with σ frozen) on reduced-depth instances; the rules against an explicit
float64 per-path reference."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from srd_path_reference import cafe_and_icat, check_family
from torch import nn
from torchvision.models import SwinTransformer

from sae_cafe.models import get_adapter, load_model, srd_swin
from sae_cafe.srd import apop_forward, srd_ierf, srd_saliency
from sae_cafe.srd.window_attention import WindowBlockBranch

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_swin(seed: int = 0, window: int = 2) -> nn.Module:
    """Two stages (2 blocks each, the second shifted) around one patch merging, 2×2 windows: at 16 px the first
    stage's 4×4 grid has shifted windows, the second's 2×2 grid one window (shift dropped, as torchvision
    does). LayerNorm affines, biases and the relative position bias tables re-randomised."""
    torch.manual_seed(seed)
    m = SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[2, 4], window_size=[window] * 2,
                        num_classes=5).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.rand(mod.bias.shape, generator=g) * 0.4 - 0.2)
            elif isinstance(mod, (nn.Linear, nn.Conv2d)) and mod.bias is not None:
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
        for n, p in m.named_parameters():
            if n.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=g))
    return m


def images(n: int = 2, size: int = 16, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----- explicit per-path reference (token grids (h, w, C), loops over targets and paths) --------------------------
def _ln_lin(ln: nn.LayerNorm, a: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """LayerNorm without its shift, σ given (frozen)."""
    return ln.weight * (a - a.mean()) / sigma


def _sigma(ln: nn.LayerNorm, a: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(a.var(correction=0) + ln.eps)


def _share(paths: list, bias: torch.Tensor) -> list:
    norms = torch.stack([c.norm() for _, c in paths])
    tot = norms.sum()
    share = norms / tot if tot > 0 else torch.full_like(norms, 1.0 / len(paths))
    return [(p, c + s * bias) for (p, c), s in zip(paths, share)]


def _stem_paths(m: nn.Module, x: torch.Tensor) -> tuple[dict, torch.Tensor]:
    conv, ln = m[0], m[2]
    out = m(x[None])[0]  # (h, w, C)
    k = conv.kernel_size[0]
    paths = {}
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            pre = conv(x[None, :, i * k:(i + 1) * k, j * k:(j + 1) * k])[0, :, 0, 0]
            sig = _sigma(ln, pre)
            ps = [((i * k + a, j * k + b), _ln_lin(ln, conv.weight[:, :, a, b] @ x[:, i * k + a, j * k + b], sig))
                  for a in range(k) for b in range(k)]
            paths[i, j] = _share(ps, _ln_lin(ln, conv.bias, sig) + ln.bias)
    return paths, out


def _region(r: int, n: int, ws: int, sh: int) -> int:
    return 0 if r < n - ws else (1 if r < n - sh else 2)


def _block_paths(blk: nn.Module, x: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Attention-add paths {t: [(s, c_{s→t})] + skip}, the attention-add output y and the block output."""
    attn = blk.attn
    H, W, C = x.shape
    ws = attn.window_size[0]
    sh = attn.shift_size[0] if ws < H else 0
    heads, e = attn.num_heads, C // attn.num_heads
    table = attn.relative_position_bias_table
    ln1 = blk.norm1(x)
    y_model = x + attn(ln1[None])[0]
    qkv = F.linear(ln1, attn.qkv.weight, attn.qkv.bias).view(H, W, 3, heads, e)
    wv, bv = attn.qkv.weight[2 * C:], attn.qkv.bias[2 * C:]
    b_attn = attn.proj.weight @ (wv @ blk.norm1.bias + bv) + attn.proj.bias
    paths = {}
    for ti in range(H):
        for tj in range(W):
            ri, rj = (ti - sh) % H, (tj - sh) % W  # the target in the rolled grid
            wi, wj = ri // ws, rj // ws
            members = [(wi * ws + a, wj * ws + b) for a in range(ws) for b in range(ws)]
            ps = []
            for h in range(heads):
                logits = []
                for si, sj in members:
                    rel = ((ri % ws) - (si % ws) + ws - 1) * (2 * ws - 1) + (rj % ws) - (sj % ws) + ws - 1
                    lg = qkv[ti, tj, 0, h] @ qkv[(si + sh) % H, (sj + sh) % W, 1, h] * e ** -0.5 + table[rel, h]
                    if sh and (_region(ri, H, ws, sh), _region(rj, W, ws, sh)) != (_region(si, H, ws, sh),
                                                                                  _region(sj, W, ws, sh)):
                        lg = lg - 100.0
                    logits.append(lg)
                A = torch.stack(logits).softmax(0)
                for a, (si, sj) in zip(A, members):
                    s = ((si + sh) % H, (sj + sh) % W)
                    sig = _sigma(blk.norm1, x[s])
                    c = a * attn.proj.weight[:, h * e:(h + 1) * e] @ (wv[h * e:(h + 1) * e] @ _ln_lin(blk.norm1, x[s],
                                                                                                           sig))
                    ps.append((s, c))
            paths[ti, tj] = _share(ps, b_attn) + [((ti, tj), x[ti, tj])]
    return paths, y_model, blk(x[None])[0]


def _merge_paths(m: nn.Module, x: torch.Tensor) -> tuple[dict, torch.Tensor]:
    out = m(x[None])[0]
    C = x.shape[-1]
    paths = {}
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            src = [(2 * i, 2 * j), (2 * i + 1, 2 * j), (2 * i, 2 * j + 1), (2 * i + 1, 2 * j + 1)]  # torchvision order
            cat = torch.cat([x[p] for p in src])
            sig = _sigma(m.norm, cat)
            ps = []
            for g, p in enumerate(src):
                only = torch.zeros(4 * C, dtype=F64)
                only[g * C:(g + 1) * C] = x[p]
                ps.append((p, m.reduction.weight @ _ln_lin(m.norm, only, sig)))
            paths[i, j] = _share(ps, m.reduction.weight @ m.norm.bias)
    return paths, out


def reference_saliency(model: nn.Module, x: torch.Tensor, target: int, ierf: tuple | None = None) -> torch.Tensor:
    """SRD saliency (H, W) of one image (contrast 'none'), or the iERF of ``ierf=(layer, (row, col))``."""
    model = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        logit = model(x.double()[None])[0, target]
        paths, v = _stem_paths(model.features[0], x.double())
        records = [("features.0", paths)]
        for i, m in enumerate(model.features):
            if i == 0:
                continue
            if isinstance(m, nn.Sequential):
                for j, blk in enumerate(m):
                    paths, y, out = _block_paths(blk, v)
                    for (ti, tj), ps in paths.items():
                        assert torch.allclose(sum(c for _, c in ps), y[ti, tj], atol=1e-10)  # exact decomposition
                    records.append((f"features.{i}.{j}", paths, y))
                    v = out
            else:
                paths, v = _merge_paths(m, v)
                records.append((f"features.{i}", paths))
            for (ti, tj), ps in records[-1][1].items():
                if len(records[-1]) == 2:
                    assert torch.allclose(sum(c for _, c in ps), v[ti, tj], atol=1e-10)
        feat = model.norm(v)
        h, w = feat.shape[:2]
        r = (feat @ model.head.weight[target] + model.head.bias[target]) / (h * w)
        assert torch.allclose(r.sum(), logit, atol=1e-10)
        if ierf is not None:
            layer, (pi, pj) = ierf
            records = records[:[rec[0] for rec in records].index(layer) + 1]
            grid = max(records[-1][1])
            r = torch.zeros(grid[0] + 1, grid[1] + 1, dtype=F64)
            r[pi, pj] = 1.0
        for rec in reversed(records):
            paths = rec[1]
            z = rec[2] if len(rec) == 3 else None
            acc = torch.zeros(x.shape[1:] if rec[0] == "features.0" else
                              (max(p[0] for ps in paths.values() for p, _ in ps) + 1,
                               max(p[1] for ps in paths.values() for p, _ in ps) + 1), dtype=F64)
            for (ti, tj), ps in paths.items():
                zt = z[ti, tj] if z is not None else sum(c for _, c in ps)
                zz = zt @ zt
                for p, c in ps:
                    if zz > 0:
                        acc[p] += (c @ zt) / zz * r[ti, tj]
            r = acc
        return r


def reference_error(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        target = model(x).argmax(1)
    err = 0.0
    for n in range(x.shape[0]):
        ref = reference_saliency(model, x[n], int(target[n]))
        ours = srd_saliency(model, x[n:n + 1], target[n:n + 1], contrast="none", dtype=F64)[0]
        err = max(err, float((ours - ref).abs().max()) / max(1.0, float(ref.abs().max())))
        ref = reference_saliency(model, x[n], 0, ierf=("features.1.1", (3, 0)))
        ours = srd_ierf(model, x[n:n + 1], "features.1.1", (3, 0), dtype=F64)[0]
        err = max(err, float((ours - ref).abs().max()))
    return err


# ----- tests ------------------------------------------------------------------------------------------------------
def test_swin_matches_explicit_reference():
    model = tiny_swin()
    assert model.features[1][1].attn.shift_size == [1, 1]  # shifted windows on the 4×4 grid are covered
    assert reference_error(model, images(1)) < 1e-10


PATH_MU, PATH_SCATTER, MERGE = WindowBlockBranch.path_mu, WindowBlockBranch.path_scatter, srd_swin._merge


def _bias_on_skip(self, v, z, out, rec):
    """A wrong attention rule: the attention bias given to the skip instead of the attention paths."""
    b, self.b_attn = self.b_attn, torch.zeros_like(self.b_attn)
    try:
        mu = PATH_MU(self, v, z, out, rec)
    finally:
        self.b_attn = b
    zz = (z * z).sum(1)
    extra = (b.view(1, -1, 1, 1) * z).sum(1) / zz  # the skip's slot is the target's own slot
    wh, ww = self.p.window
    shift = rec.extra["shift"]
    H, W = z.shape[-2:]
    rows = (torch.arange(H) - shift[0]) % H % wh
    cols = (torch.arange(W) - shift[1]) % W % ww
    own = (rows.view(-1, 1) * ww + cols.view(1, -1))
    return mu.scatter_add(1, own.expand(mu.shape[0], 1, H, W), extra[:, None])


def _unshifted_scatter(self, src_hw):
    """A wrong shift rule: relevance scattered through unshifted windows."""
    shift, self.p.shift = self.p.shift, (0, 0)
    try:
        return PATH_SCATTER(self, src_hw)
    finally:
        self.p.shift = shift


def _swapped_merge(m, name, source, dtype):
    """A wrong patch-merging rule: neighbours (1, 0) and (0, 1) swapped in the paths (forward unchanged)."""
    stage = MERGE(m, name, source, dtype)
    w = stage.branches[0].conv.weight
    w[:, :, 1, 0], w[:, :, 0, 1] = w[:, :, 0, 1].clone(), w[:, :, 1, 0].clone()
    return stage


@pytest.mark.parametrize("broken", ["bias_on_skip", "unshifted", "merge"])
def test_swin_reference_check_fails_on_a_broken_rule(monkeypatch, broken):
    if broken == "bias_on_skip":
        monkeypatch.setattr(WindowBlockBranch, "path_mu", _bias_on_skip)
    elif broken == "unshifted":
        monkeypatch.setattr(WindowBlockBranch, "path_scatter", _unshifted_scatter)
    else:
        monkeypatch.setattr(srd_swin, "_merge", _swapped_merge)
    assert reference_error(tiny_swin(), images(1)) > 1e-4


def test_swin_conservation_adapter_apop_pfv(tmp_path):
    model = tiny_swin(1)
    errs = check_family(model, images(3, seed=4), "features.1")
    assert errs[F64][0] < 1e-12
    ad = get_adapter(model)
    assert type(ad).__name__ == "SwinAdapter"
    assert ad._pfv_layer_names() == ["features.0", "features.1.0", "features.1.1", "features.1", "features.2",
                                     "features.3.0", "features.3.1", "features.3"]
    x = images(2, seed=5)
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(apop_forward(model, x, x), ref, atol=1e-4, rtol=1e-4)
    act = ad.capture(x, ["features.1"])["features.1"]  # channels-last (B, h, w, C)
    batch = ad.to_pfv(act)
    assert batch.pfv.shape == (2, 16, 8) and batch.grid == (4, 4) and torch.equal(ad.from_pfv(batch), act)
    assert torch.equal(batch.pfv[1, 5], act[1, 1, 1])
    cafe_and_icat(model, "features.1", "features.3", tmp_path / "cafe")


def test_swin_t_full_size_layers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = load_model("swin_t")
    info = ad.layers()
    assert info["features.0"].grid == (56, 56) and info["features.0"].channels == 96 and info["features.0"].rf_size == 4
    assert info["features.1"].rf_size == 4 + 2 * 6 * 4 and info["features.1"].stride == 4
    assert info["features.7"].grid == (7, 7) and info["features.7"].channels == 768 and info["features.7"].stride == 32
    assert info["features.5.3"].grid == (14, 14)
