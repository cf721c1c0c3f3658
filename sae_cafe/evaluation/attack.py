"""Targeted explanation-manipulation attack (Dombrowski et al. 2019, "Explanations can be manipulated and
geometry is to blame").

Find x_adv near x whose explanation looks like that of another image x_target while the model's output
stays that of x: minimise ``γ_e·MSE(ĥ(x_adv), ĥ(x_target)) + γ_o·MSE(softmax f(x_adv), softmax f(x))`` with
Adam, clamping x_adv to the valid pixel range after every step. During the attack every ``nn.ReLU`` of a
*deep copy* of the model is replaced by softplus-β (β grows geometrically from ``beta_start`` to
``beta_end``), so second derivatives exist; the user's model is never touched. The result is scored with
the real (ReLU) model: SSIM, Pearson and MSE of the explanation of x_adv to that of x_target and to that of x.

ĥ is |h| scaled to mean 1 per map (Dombrowski scale to unit sum; mean 1 makes γ independent of the image
size: γ_e = 1, γ_o = 1e4 correspond to the notebook's 1e11 / 1e6 at 224 px up to a factor ≈ 2.5).

Attackable methods (differentiable versions written here because the libraries compute maps without a
graph to the input; each is tested equal to the registry's library map): ``srd`` (``srd_saliency(...,
differentiable=True)``), ``saliency`` (gradient), ``input_x_gradient``, ``integrated_gradients`` (8
Gauss–Legendre steps: every attack step runs a double backward through all of them, so 8 halve the dearest
method's cost against 16), ``gradcam`` and ``lrp_epsilon_plus`` (zennit with ``create_graph=True``). Others:
"n/a (not differentiable)".
SRD is the exception to the surrogate: its stage graph is checked against the ReLU forward, so it is
attacked on the real network through ``differentiable=True``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models import get_adapter
from ..models.base import ModelAdapter
from .baselines import NotApplicable, applicability, cam_target_layer, lrp_maps

DiffFn = Callable[[ModelAdapter, torch.Tensor, torch.Tensor], torch.Tensor]
ATTACK_IG_STEPS = 8


# ------------------------------------------------------------------ softplus surrogate ----------------------
class SoftplusReLU(nn.ReLU):
    """ReLU whose forward is softplus-β while ``beta`` is set (a subclass, so ReLU rules still match)."""

    def __init__(self, beta: float | None = None):
        super().__init__(inplace=False)
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) if self.beta is None else F.softplus(x, beta=self.beta)


def surrogate_copy(model: ModelAdapter | nn.Module, beta: float | None = None) -> ModelAdapter:
    """Adapter over a deep copy of the model, every ``nn.ReLU`` module replaced by :class:`SoftplusReLU`."""
    adapter = get_adapter(model)
    clone = copy.copy(adapter)
    clone.model = copy.deepcopy(adapter.model).eval()
    for parent in list(clone.model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.ReLU:
                setattr(parent, name, SoftplusReLU(beta))
    for p in clone.model.parameters():
        p.requires_grad_(False)
    return clone


def set_beta(adapter: ModelAdapter, beta: float | None) -> None:
    for m in adapter.model.modules():
        if isinstance(m, SoftplusReLU):
            m.beta = beta


# ------------------------------------------------------------------ differentiable explanations -------------
def _score(a: ModelAdapter, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return a.model(x).gather(1, t[:, None]).sum()


def _input_grad(a: ModelAdapter, x: torch.Tensor, t: torch.Tensor, create_graph: bool) -> torch.Tensor:
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(_score(a, x, t), x, create_graph=create_graph)
    return g


def diff_saliency(a, x, t, create_graph=True):
    """|∂f_t/∂x| summed over channels (= Captum Saliency(abs=True))."""
    return _input_grad(a, x, t, create_graph).abs().sum(1)


def diff_input_x_gradient(a, x, t, create_graph=True):
    """x·∂f_t/∂x summed over channels (= Captum InputXGradient)."""
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    return (x * _input_grad(a, x, t, create_graph)).sum(1)


def diff_integrated_gradients(a, x, t, create_graph=True, n_steps: int = ATTACK_IG_STEPS):
    """Integrated gradients, zero baseline, Gauss–Legendre ``n_steps`` (= Captum IntegratedGradients)."""
    from captum.attr._utils.approximation_methods import approximation_parameters

    step_sizes, alphas = approximation_parameters("gausslegendre")
    al = torch.tensor(alphas(n_steps), dtype=x.dtype, device=x.device)
    w = torch.tensor(step_sizes(n_steps), dtype=x.dtype, device=x.device)
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    N = x.shape[0]
    xs = (al.view(-1, 1, 1, 1, 1) * x[None]).reshape(n_steps * N, *x.shape[1:])
    (g,) = torch.autograd.grad(_score(a, xs, t.repeat(n_steps)), xs, create_graph=create_graph)
    avg = (w.view(-1, 1, 1, 1, 1) * g.view(n_steps, *x.shape)).sum(0)
    return (x * avg).sum(1)


def _minmax(c: torch.Tensor) -> torch.Tensor:
    c = c - c.flatten(1).amin(1).view(-1, 1, 1, 1)
    return c / (1e-7 + c.flatten(1).amax(1).view(-1, 1, 1, 1))


def diff_gradcam(a, x, t, create_graph=True):
    """Grad-CAM as pytorch-grad-cam computes it: ReLU(Σ_c mean(∂f_t/∂A_c)·A_c), min–max, bilinear resize,
    min–max again, at the adapter's CAM layer."""
    layer, reshape = cam_target_layer(a)
    got = {}

    def hook(_m, _i, out):
        got["A"] = out

    with torch.enable_grad(), a.hooks({layer: hook}):
        xx = x if x.requires_grad else x.detach().requires_grad_(True)
        logits = a.model(xx)
    A = got["A"]
    (G,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), A, create_graph=create_graph)
    if reshape is not None:
        A, G = reshape(A), reshape(G)
    cam = F.relu((G.mean((2, 3), keepdim=True) * A).sum(1, keepdim=True))
    cam = F.interpolate(_minmax(cam), size=x.shape[-2:], mode="bilinear", align_corners=False)
    return _minmax(F.relu(cam))[:, 0]


def diff_lrp(a, x, t, create_graph=True):
    """zennit LRP EpsilonPlus with ``create_graph`` (the registry's map, kept differentiable)."""
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    return lrp_maps(a, x, t, create_graph=create_graph)


def diff_srd(a, x, t, create_graph=True):
    """``srd_saliency(..., differentiable=True)``."""
    from ..srd import srd_saliency

    return srd_saliency(a, x, t, differentiable=create_graph)


DIFFERENTIABLE: dict[str, DiffFn] = {
    "srd": diff_srd, "saliency": diff_saliency, "input_x_gradient": diff_input_x_gradient,
    "integrated_gradients": diff_integrated_gradients, "gradcam": diff_gradcam, "lrp_epsilon_plus": diff_lrp,
}


#: methods attacked on the real network (see :func:`manipulate`).
NO_SURROGATE = frozenset({"srd"})


def attack_applicability(method: str, model: ModelAdapter | nn.Module) -> str | None:
    """None if ``method`` can be attacked on ``model``, else "n/a (reason)"."""
    if method not in DIFFERENTIABLE:
        return "n/a (not differentiable)"
    reason = applicability(method, model)
    return f"n/a ({reason})" if reason else None


# ------------------------------------------------------------------ attack ----------------------------------
def _math_attention():
    """Fused CPU/flash attention kernels have no double backward: use the math kernel during the attack."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def flush_denormals():
    """Flush subnormal floats to zero while the attack runs (CPU). softplus-β with a large β underflows
    into subnormals for negative inputs, and CPU arithmetic on subnormals is slow: without this the
    surrogate-model steps of a mini ResNet take 2.3× as long (values change below 1.2e-38 only).
    Restores the default (off) on exit."""
    enabled = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)


def _attack_step(i, cfg, sur, fn, x_adv, t, goal, p_orig, opt, lo, hi, curve, stats) -> bool:
    """One Adam step of :func:`manipulate`; False when the loss is not finite."""
    beta = cfg.beta_start * (cfg.beta_end / cfg.beta_start) ** (i / max(1, cfg.iterations - 1))
    set_beta(sur, beta)
    opt.zero_grad()
    h = _hnorm(fn(sur, x_adv, t, create_graph=True))
    p = sur.model(x_adv).softmax(1)
    per_pair = (cfg.gamma_expl * ((h - goal) ** 2).flatten(1).mean(1)
                + cfg.gamma_out * ((p - p_orig) ** 2).mean(1))
    loss = per_pair.sum()
    if not math.isfinite(loss.item()):
        return False
    loss.backward()
    g = x_adv.grad
    if not torch.isfinite(g).all():  # e.g. 0/0 in a sharing ratio: drop those entries, count the step
        g.nan_to_num_(0.0, 0.0, 0.0)
        stats["nonfinite_grad_steps"] += 1
    opt.step()
    with torch.no_grad():
        x_adv.copy_(torch.maximum(torch.minimum(x_adv, hi), lo))
    curve.append(loss.item() / x_adv.shape[0])
    return True


@dataclass
class AttackConfig:
    iterations: int = 500
    lr: float = 5e-4
    gamma_expl: float = 1.0
    gamma_out: float = 1e4
    beta_start: float = 10.0
    beta_end: float = 100.0
    seed: int = 0


def _hnorm(h: torch.Tensor) -> torch.Tensor:
    """|h| scaled to mean 1 per map (N,H,W)."""
    h = h.abs()
    return h / (h.flatten(1).mean(1).view(-1, 1, 1) + 1e-12)


def _unit(h: torch.Tensor) -> np.ndarray:
    h = h.abs().detach().double()
    return (h / h.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1)).cpu().numpy()


def similarity_scores(h1: torch.Tensor, h2: torch.Tensor) -> dict[str, np.ndarray]:
    """SSIM, Pearson and MSE between |h| maps scaled to [0, 1] (by their max). → {name: (N,)}."""
    from skimage.metrics import structural_similarity

    a, b = _unit(h1), _unit(h2)
    ssim = np.array([structural_similarity(a[i], b[i], data_range=1.0) for i in range(len(a))])
    ac, bc = a.reshape(len(a), -1), b.reshape(len(b), -1)
    ac, bc = ac - ac.mean(1, keepdims=True), bc - bc.mean(1, keepdims=True)
    pcc = (ac * bc).sum(1) / (np.linalg.norm(ac, axis=1) * np.linalg.norm(bc, axis=1) + 1e-12)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    return {"ssim": ssim, "pearson": pcc, "mse": mse}


@dataclass
class AttackResult:
    method: str
    x_adv: torch.Tensor  # (N,3,H,W)
    maps: dict[str, torch.Tensor]  # "orig", "target", "adv": (N,H,W) with the real model
    scores: dict[str, np.ndarray]  # "<score>_to_target|_to_orig|_orig_to_target" (the last: before the attack),
    #                               max_prob_change, same_class, input_linf,
    #                               nonfinite_grad_steps (steps whose NaN/inf gradient entries were zeroed)
    loss_curve: list[float]


def manipulate(model: ModelAdapter | nn.Module, method: str, x: torch.Tensor, x_target: torch.Tensor,
               config: AttackConfig | None = None, progress: bool = False) -> AttackResult:
    """Attack ``method`` on pairs (x[i] → x_target[i]) of (N,3,H,W) preprocessed images.

    The explanation of x_adv is for x's predicted class; the target map is x_target's map for its own
    predicted class. Raises :class:`NotApplicable` for methods that cannot be attacked.
    """
    cfg = config or AttackConfig()
    adapter = get_adapter(model)
    reason = attack_applicability(method, adapter)
    if reason:
        raise NotApplicable(method, reason[5:-1])
    fn = DIFFERENTIABLE[method]
    torch.manual_seed(cfg.seed)
    x, x_target = x.detach(), x_target.detach()
    with torch.no_grad():
        p_orig = adapter.model(x).softmax(1)
        t = p_orig.argmax(1)
        t_target = adapter.model(x_target).argmax(1)
    h_orig = fn(adapter, x, t, create_graph=False).detach()
    h_tgt = fn(adapter, x_target, t_target, create_graph=False).detach()
    goal = _hnorm(h_tgt)

    # SRD rebuilds the network from its modules and checks that against model(x), so a softplus copy is
    # refused; SRD is attacked through its own differentiable mode on the real (ReLU) network.
    sur = adapter if method in NO_SURROGATE else surrogate_copy(adapter, cfg.beta_start)
    mean = torch.tensor(adapter.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(adapter.std, device=x.device).view(1, 3, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    x_adv = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([x_adv], lr=cfg.lr)
    curve: list[float] = []
    it = range(cfg.iterations)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"attack {method}", leave=False)
    stats = {"nonfinite_grad_steps": 0}
    with _math_attention(), flush_denormals():
        for i in it:
            if not _attack_step(i, cfg, sur, fn, x_adv, t, goal, p_orig, opt, lo, hi, curve, stats):
                break
    x_adv = x_adv.detach()
    h_adv = fn(adapter, x_adv, t, create_graph=False).detach()
    with torch.no_grad():
        p_adv = adapter.model(x_adv).softmax(1)
    scores = {f"{k}_to_target": v for k, v in similarity_scores(h_adv, h_tgt).items()}
    scores.update({f"{k}_to_orig": v for k, v in similarity_scores(h_adv, h_orig).items()})
    # reference: how alike the two maps already were before the attack
    scores.update({f"{k}_orig_to_target": v for k, v in similarity_scores(h_orig, h_tgt).items()})
    scores["max_prob_change"] = (p_adv - p_orig).abs().amax(1).cpu().numpy()
    scores["same_class"] = (p_adv.argmax(1) == t).float().cpu().numpy()
    linf = (adapter.denormalize(x_adv) - adapter.denormalize(x)).abs().flatten(1).amax(1)
    scores["input_linf"] = linf.cpu().numpy()
    scores["nonfinite_grad_steps"] = np.full(x.shape[0], float(stats["nonfinite_grad_steps"]))
    return AttackResult(method, x_adv, {"orig": h_orig, "target": h_tgt, "adv": h_adv}, scores, curve)


# ------------------------------------------------------------------ benchmark --------------------------------
ATTACK_SCORES = ("ssim_to_target", "pearson_to_target", "mse_to_target", "ssim_to_orig", "pearson_to_orig",
                 "mse_to_orig", "ssim_orig_to_target", "pearson_orig_to_target", "mse_orig_to_target",
                 "max_prob_change", "same_class", "nonfinite_grad_steps")


def make_pairs(model: ModelAdapter | nn.Module, x: torch.Tensor, n_pairs: int, seed: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) indices: image i is pushed toward the map of an image predicted as another class."""
    with torch.no_grad():
        pred = get_adapter(model).model(x).argmax(1)
    g = torch.Generator().manual_seed(seed)
    n = min(n_pairs, x.shape[0])
    src = torch.arange(n)
    dst = []
    for i in range(n):
        other = (pred != pred[i]).nonzero()[:, 0]
        pool = other if len(other) else torch.tensor([j for j in range(x.shape[0]) if j != i] or [i])
        dst.append(int(pool[torch.randint(len(pool), (1,), generator=g)]))
    return src, torch.tensor(dst)


def _save_result(path, res: AttackResult, sec: float) -> None:
    """One method's attack result → ``<path>.safetensors`` (tensors, scores) + ``<path>.json``, each renamed
    into place (the JSON last: its presence marks the result complete)."""
    from safetensors.torch import save

    from ..artifacts import atomic_write_bytes, atomic_write_json

    tensors = {"x_adv": res.x_adv.contiguous().cpu()} | {f"map.{k}": v.contiguous().cpu() for k, v in res.maps.items()}
    tensors |= {f"score.{k}": torch.as_tensor(np.ascontiguousarray(v)) for k, v in res.scores.items()}
    atomic_write_bytes(path.with_suffix(".safetensors"), save(tensors))
    atomic_write_json(path.with_suffix(".json"), {"method": res.method, "sec_per_pair": sec,
                                                  "loss_curve": res.loss_curve})


def _load_result(path) -> tuple[AttackResult, float] | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta, data = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if not (meta.exists() and data.exists()):
        return None
    try:
        info, t = json.loads(meta.read_text()), load_file(str(data))
    except (OSError, ValueError, SafetensorError):
        return None  # unreadable (e.g. cut short): recompute
    maps = {k[4:]: v for k, v in t.items() if k.startswith("map.")}
    scores = {k[6:]: v.numpy() for k, v in t.items() if k.startswith("score.")}
    return AttackResult(info["method"], t["x_adv"], maps, scores, info["loss_curve"]), info["sec_per_pair"]


def run_attack_benchmark(model: ModelAdapter | nn.Module, x: torch.Tensor, methods, n_pairs: int = 20,
                         config: AttackConfig | None = None, chunk: int = 20, progress: bool = True,
                         state_dir: str | Path | None = None) -> tuple[list[dict], dict[str, AttackResult]]:
    """Attack every method on ``n_pairs`` pairs of ``x``: rows of mean ± s.e. per score (or "n/a (…)").

    ``state_dir``: each finished method's result is kept there (keyed by model weights, pairs, config), so
    an interrupted run redoes only the methods it had not finished."""
    import time

    from tqdm import tqdm

    from ..artifacts import hash_json

    cfg = config or AttackConfig()
    adapter = get_adapter(model)
    src, dst = make_pairs(adapter, x, n_pairs, cfg.seed)
    state = None
    if state_dir is not None:
        key = hash_json({"cfg": asdict(cfg), "model": adapter.name, "weights": adapter.weights_hash,
                         "src": src.tolist(), "dst": dst.tolist(), "shape": list(x.shape[1:]),
                         "ig_steps": ATTACK_IG_STEPS})[:16]
        state = Path(state_dir) / key
        state.mkdir(parents=True, exist_ok=True)
    rows, results = [], {}
    for m in tqdm(list(methods), desc="attack", disable=not progress):
        reason = attack_applicability(m, adapter)
        if reason:
            rows.append({"method": m, "status": reason})
            continue
        done = _load_result(state / m) if state else None
        if done is not None:
            res, sec = done
        else:
            t0 = time.perf_counter()
            parts = [manipulate(adapter, m, x[src[i:i + chunk]], x[dst[i:i + chunk]], cfg)
                     for i in range(0, len(src), chunk)]
            sec = (time.perf_counter() - t0) / len(src)
            res = AttackResult(m, torch.cat([p.x_adv for p in parts]),
                               {k: torch.cat([p.maps[k] for p in parts]) for k in parts[0].maps},
                               {k: np.concatenate([p.scores[k] for p in parts]) for k in parts[0].scores},
                               parts[0].loss_curve)
            if state:
                _save_result(state / m, res, sec)
        results[m] = res
        row: dict = {"method": m, "status": "ok", "pairs": len(src), "iterations": cfg.iterations,
                     "sec_per_pair": sec}
        for k in ATTACK_SCORES:
            v = res.scores[k]
            row[f"{k}_mean"] = float(np.mean(v))
            row[f"{k}_se"] = float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
        rows.append(row)
    return rows, results


def plot_attack(results: dict[str, AttackResult], path, pair: int = 0) -> None:
    """Rows = attacked methods; columns: map of x, map of x_target, map of x_adv (first pair). PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        return
    fig, axes = plt.subplots(len(results), 3, figsize=(6, 2 * len(results)), squeeze=False)
    for r, (m, res) in enumerate(results.items()):
        for c, k in enumerate(("orig", "target", "adv")):
            axes[r, c].imshow(res.maps[k][pair].abs().cpu().numpy(), cmap="magma")
            axes[r, c].set_title(f"{m}: {k}", fontsize=7)
            axes[r, c].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
