"""Coverage table: every supported model family at full size (224 px, random weights), float32, CPU.

For each model (by default one registered name per model class; ``--all`` for every name, ``--models`` to pick):
- saliency conservation: |Σmap + sink − target| / (Σ|map| + |sink| + |target|) with ``contrast="none"``, where
  target is the logit of class 1 or, for a headless backbone, ⟨output, direction⟩ for a random direction;
- iERF conservation at the middle PFV layer: max over 4 positions of |Σ iERF + sink − 1|;
- SRD cost: saliency time / (forward + input-gradient) time, batch 1, same process, interleaved, best of
  ``--repeat``; wall-clock and process-CPU-seconds ratios (the CPU ratio moves less on a shared machine), and
  the 1-minute load average when measured;
- extraction: PFVs of the middle layer round-trip exactly (``to_pfv`` → ``from_pfv``);
- CAFE: a 2-latent CAFE build (random TopK SAE) on 4 random images succeeds.

    .venv/bin/python benchmarks/model_zoo.py                  # writes benchmarks/results/model_zoo.{json,md}
    .venv/bin/python benchmarks/model_zoo.py --models resnet50 swin_t --out /tmp/zoo
    .venv/bin/python benchmarks/model_zoo.py --models convnext_tiny --update   # rerun some rows only

A model that fails a step shows the error in its row instead of a number. Needs no network: every model is
built from its constructor with random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from sae_cafe.cafe.build import build_cafe
from sae_cafe.errors import SaeCafeError
from sae_cafe.models import list_adapters, load_model
from sae_cafe.srd import srd_ierf, srd_saliency

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).resolve().parent / "results"
SMALL_FIRST = ("tiny", "small", "18", "b0", "_t", "400mf", "121", "v2", "16")
#: the default rows: the families users audit (issues' lists), torchvision / timm / Hugging Face / open_clip
DEFAULT_MODELS = (
    "resnet50", "timm/resnet50", "resnet50d", "resnext50_32x4d", "seresnet50", "vgg16", "efficientnet_b0",
    "timm/efficientnet_b0", "mobilenet_v3_small", "mobilenetv3_large_100", "mobilenet_v2", "regnet_y_400mf",
    "densenet121", "convnext_tiny", "timm/convnext_tiny", "swin_t", "vit_b_16", "vit_base_patch16_224",
    "deit_small_distilled_patch16_224", "vit_base_patch16_clip_224", "vit_base_patch16_siglip_224",
    "vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2", "hf_vit_base_patch16_224",
    "hf_clip_vit_base_patch16", "hf_dinov2_small", "hf_siglip_base_patch16_224", "openclip_vit_b_32",
    "openclip_vit_b_16")


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def best_pair(fa, fb, repeat: int) -> tuple[float, float, float, float]:
    """(wall a, wall b, CPU a, CPU b): best of ``repeat`` runs each, interleaved a, b, a, b, … so that a load
    change on a shared machine hits both alike; process CPU seconds beside wall-clock seconds."""
    wa, wb, ca, cb = [], [], [], []
    for _ in range(repeat):
        for fn, w, c in ((fa, wa, ca), (fb, wb, cb)):
            t, p = time.perf_counter(), time.process_time()
            fn()
            w.append(time.perf_counter() - t)
            c.append(time.process_time() - p)
    return min(wa), min(wb), min(ca), min(cb)


def model_class(model) -> type:
    """The class a model was constructed from (a wrapped Hugging Face model counts as its own class)."""
    return type(getattr(model, "hf", model))


def representatives(names: list[str]) -> list[str]:
    """One registered name per model class, preferring small variants (mini models left out)."""
    by_class: dict[str, list[str]] = {}
    for n in names:
        if n.startswith("mini_"):
            continue
        cls = model_class(load_model(n).model)
        by_class.setdefault(f"{cls.__module__}.{cls.__qualname__}", []).append(n)
    out = []
    for group in by_class.values():
        group.sort(key=lambda n: (not any(s in n for s in SMALL_FIRST), len(n), n))
        out.append(group[0])
    return sorted(out)


def target_for(adapter, x: torch.Tensor) -> tuple[object, float]:
    """(target, explained value): class 1 of a classifier, else a random direction of the output."""
    with torch.no_grad():
        out = adapter.model(x)
    out = getattr(out, "logits", out)
    if isinstance(out, tuple | list):
        out = out[0]
    try:
        srd_saliency(adapter, x, 1, contrast="none")
        return 1, float(out[0, 1])
    except SaeCafeError as e:
        if "direction" not in str(e):
            raise
    direction = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(0))
    return direction, float(out[0] @ direction)


def reinit_zero_linears(model: torch.nn.Module) -> None:
    """Random weights for all-zero Linear layers (torchvision's ViT zero-initialises its head, which makes every
    logit and every map exactly 0 and the relative conservation error 0/0)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and not m.weight.any():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * m.in_features ** -0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def zoo_row(row: dict, repeat: int) -> None:
    """Fill ``row`` (which holds "model") step by step; a failing step leaves the earlier results in it."""
    name = row["model"]
    adapter = load_model(name)
    reinit_zero_linears(adapter.model)
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    cls = model_class(adapter.model)
    row["constructor"] = f"{cls.__module__.split('.')[0]}.{cls.__name__}"
    h, w = adapter.input_size
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    target, value = target_for(adapter, x)
    maps, sink = srd_saliency(adapter, x, target, contrast="none", return_sink=True)
    total = float(maps.sum() + sink.sum())
    row["saliency_err"] = abs(total - value) / (float(maps.abs().sum() + sink.abs().sum()) + abs(value))

    def grad_ref():
        xg = x.clone().requires_grad_(True)
        out = adapter.model(xg)
        out = getattr(out, "logits", out)
        out = out[0] if isinstance(out, tuple | list) else out
        (out[:, 1].sum() if not torch.is_tensor(target) or target.ndim == 0 else out @ target).sum().backward()

    srd_saliency(adapter, x, target)
    grad_ref()
    t_srd, t_ref, c_srd, c_ref = best_pair(lambda: srd_saliency(adapter, x, target), grad_ref, repeat)
    row["cost"] = t_srd / t_ref
    row["cost_cpu"] = c_srd / c_ref
    row["srd_s"] = t_srd
    row["load"] = round(os.getloadavg()[0], 2)
    row["threads"] = torch.get_num_threads()

    layers = list(adapter.layers())
    mid = layers[len(layers) // 2]
    gh, gw = adapter.grid(mid)
    errs = []
    for r, c in ((0, 0), (gh // 2, gw // 2), (gh - 1, gw - 1), (gh // 3, 2 * gw // 3)):
        m, s = srd_ierf(adapter, x, mid, (r, c), return_sink=True)
        errs.append(abs(float(m.sum() + s.sum()) - 1.0))
    row["ierf_layer"], row["ierf_err"] = mid, max(errs)

    act = adapter.capture(x, [mid])[mid]
    pfv = adapter.to_pfv(act, mid)
    row["extraction_ok"] = bool(torch.equal(adapter.from_pfv(pfv), act))

    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=pfv.pfv.shape[-1], d_sae=2, k=1)).eval()
    imgs = torch.randn(4, 3, h, w, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as d:
        cafe = build_cafe(adapter, sae, mid, imgs, out_dir=Path(d) / "cafe", k=2, n_sample=0, progress=False)
        row["cafe_ok"] = len(cafe.latent_rows) == 2


def _cell(r: dict, key: str, fmt: str) -> str:
    v = r.get(key)
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "ok" if v else "FAIL"
    return format(v, fmt)


def render(rows: list[dict]) -> str:
    lines = ["| model | constructor | saliency conservation err | iERF err | iERF layer "
             "| SRD cost × (fwd + input-grad), wall | CPU s | threads | load | extraction | CAFE 2-latent build "
             "| error |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cost = _cell(r, "cost", ".2f") + ("×" if "cost" in r else "")
        cpu = _cell(r, "cost_cpu", ".2f") + ("×" if "cost_cpu" in r else "")
        lines.append(f"| {r['model']} | {r.get('constructor', '—')} | {_cell(r, 'saliency_err', '.1e')} | "
                     f"{_cell(r, 'ierf_err', '.1e')} | {r.get('ierf_layer', '—')} | {cost} | {cpu} | "
                     f"{r.get('threads', '—')} | {_cell(r, 'load', '.1f')} | "
                     f"{_cell(r, 'extraction_ok', '')} | {_cell(r, 'cafe_ok', '')} | {r.get('error', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="registered names (default: DEFAULT_MODELS)")
    ap.add_argument("--per-class", action="store_true", help="one registered name per model class instead")
    ap.add_argument("--all", action="store_true", help="every registered name")
    ap.add_argument("--update", action="store_true", help="replace only these models' rows of an existing table")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for model_zoo.json / model_zoo.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.models or (list_adapters() if args.all else representatives(list_adapters()) if args.per_class
                            else list(DEFAULT_MODELS))
    args.out.mkdir(parents=True, exist_ok=True)
    old = (json.loads((args.out / "model_zoo.json").read_text())["rows"]
           if args.update and (args.out / "model_zoo.json").is_file() else [])
    meta = {"threads": args.threads, "torch": torch.__version__, "input": "224 px (the adapter's input size)",
            "weights": "random", "dtype": "float32", "batch": 1, "repeat": args.repeat}
    rows: list[dict] = []
    table = old
    for n in names:
        t = time.perf_counter()
        row: dict = {"model": n}
        try:
            zoo_row(row, args.repeat)
        except Exception as e:  # noqa: BLE001 - the table shows what failed
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        row["wall_s"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        new = {r["model"]: r for r in rows}  # written after every row: an interrupted run keeps what it measured
        table = [new.pop(r["model"], r) for r in old] + list(new.values())
        (args.out / "model_zoo.json").write_text(json.dumps({"meta": meta, "rows": table}, indent=1))
        (args.out / "model_zoo.md").write_text(render(table))
    print(render(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
