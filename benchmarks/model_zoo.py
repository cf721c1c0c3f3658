"""Coverage table: every supported model family at full size (224 px, random weights), float32, CPU.

For each model (by default ``DEFAULT_MODELS``; ``--per-class`` one registered name per model class, ``--all``
every name, ``--models`` to pick, ``--family`` a preset of the per-family checks):
- saliency conservation: |Σmap + sink − target| / (Σ|map| + |sink| + |target|) with ``contrast="none"``, where
  target is the logit of class 1 or, for a headless backbone, ⟨output, direction⟩ for a random direction (max
  over the ``--batch`` images);
- iERF conservation at the middle PFV layer (or ``--ierf-layer``): max over 4 positions (and the images) of
  |Σ iERF + sink − 1|;
- SRD cost: saliency time / (forward + input-gradient) time, batch 1, same process, interleaved, best of
  ``--repeat``; wall-clock and process-CPU-seconds ratios (the CPU ratio moves less on a shared machine), and
  the 1-minute load average when measured;
- extraction: PFVs of the middle layer round-trip exactly (``to_pfv`` → ``from_pfv``);
- CAFE: a 2-latent CAFE build (random TopK SAE) on 4 random images succeeds.

    .venv/bin/python benchmarks/model_zoo.py                  # writes benchmarks/results/model_zoo.{json,md}
    .venv/bin/python benchmarks/model_zoo.py --models resnet50 swin_t --out /tmp/zoo
    .venv/bin/python benchmarks/model_zoo.py --models convnext_tiny --update   # rerun some rows only
    .venv/bin/python benchmarks/model_zoo.py --family cnn     # writes benchmarks/results/model_zoo_cnn.{json,md}

``--family`` presets (the former per-family scripts ``model_zoo_cnn.py``, ``model_zoo_densenet_swin.py``,
``model_zoo_vit.py``; explicit options override a preset's batch / repeat):

- ``cnn``: the timm / torchvision CNN families, ``--randomize``d, batch 2, best of 3;
- ``densenet_swin``: torchvision DenseNet-121 and Swin-T, ``--randomize``d, batch 2, best of 3;
- ``vit``: Hugging Face and open_clip vision towers built from their configs / architecture names
  (``CONSTRUCTED``: classifier, projection and headless variants that have no registered name), batch 1,
  best of 5.

``--randomize``: BatchNorm statistics set to the batch statistics of 4 random images (one forward in train
mode, momentum 1; timm zero-initialises the last BN of each block and every BN starts at mean 0 / var 1),
BatchNorm / LayerNorm affines, conv / linear biases, layer scales and Swin's relative position bias tables
re-drawn, so that no rule can hide behind the initialisation.

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
from sae_cafe.models import list_adapters, load_model, make_adapter
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


def _hf(cls: str, cfg: str, **kw):
    def make():
        import transformers

        return getattr(transformers, cls)(getattr(transformers, cfg)(**kw))

    return make


def _oc(arch: str):
    def make():
        import open_clip

        return open_clip.create_model(arch, pretrained=None).visual

    return make


#: models built here from a library config (no registered name): name → (constructor label, factory)
CONSTRUCTED = {
    "hf_vit_b16_cls": ("transformers ViTForImageClassification", _hf("ViTForImageClassification", "ViTConfig",
                                                                      num_labels=1000)),
    "hf_clip_b16_proj": ("transformers CLIPVisionModelWithProjection",
                         _hf("CLIPVisionModelWithProjection", "CLIPVisionConfig", patch_size=16, projection_dim=512,
                             hidden_act="quick_gelu")),
    "hf_dinov2_s": ("transformers Dinov2Model (518-px config run at 224)",
                    _hf("Dinov2Model", "Dinov2Config", hidden_size=384, num_attention_heads=6, image_size=518,
                        patch_size=14)),
    "hf_dinov2_s_cls": ("transformers Dinov2ForImageClassification",
                        _hf("Dinov2ForImageClassification", "Dinov2Config", hidden_size=384, num_attention_heads=6,
                            image_size=518, patch_size=14, num_labels=1000)),
    "hf_siglip_b16": ("transformers SiglipVisionModel", _hf("SiglipVisionModel", "SiglipVisionConfig")),
    "openclip_b32": ("open_clip ViT-B-32 .visual", _oc("ViT-B-32")),
    "openclip_b16": ("open_clip ViT-B-16 .visual", _oc("ViT-B-16")),
}
#: --family presets: model list and settings
FAMILIES = {
    "cnn": {"models": ("timm/resnet50", "resnet50d", "resnext50_32x4d", "seresnet50", "timm/efficientnet_b0",
                       "mobilenetv3_large_100", "mobilenet_v2", "regnet_y_400mf", "timm/convnext_tiny"),
            "randomize": True, "batch": 2, "repeat": 3},
    "densenet_swin": {"models": ("densenet121", "swin_t"), "randomize": True, "batch": 2, "repeat": 3},
    "vit": {"models": tuple(CONSTRUCTED), "randomize": False, "batch": 1, "repeat": 5},
}


def build(name: str):
    """(adapter, constructor label or None): a ``CONSTRUCTED`` model or a registered name."""
    if name in CONSTRUCTED:
        label, make = CONSTRUCTED[name]
        torch.manual_seed(0)
        return make_adapter(make().eval(), name), label
    return load_model(name), None


def randomize(model: torch.nn.Module, size: tuple[int, int], seed: int = 0) -> None:
    """Re-draw BN / LayerNorm affines, biases, layer scales and relative position bias tables; BN running
    statistics = the batch statistics of 4 random images (module docstring)."""
    nn = torch.nn
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
                if isinstance(m, nn.BatchNorm2d):
                    m.train()
                    m.momentum = 1.0
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
            for attr in ("gamma", "layer_scale"):
                t = getattr(m, attr, None)
                if isinstance(t, torch.Tensor):
                    t.copy_(torch.rand(t.shape, generator=g) * 0.5)
            table = getattr(m, "relative_position_bias_table", None)
            if isinstance(table, torch.Tensor):
                table.copy_(torch.randn(table.shape, generator=g))
        model(torch.randn(4, 3, *size, generator=g))  # BN running statistics = these batch statistics
    model.eval()


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


def target_for(adapter, x: torch.Tensor) -> tuple[object, torch.Tensor]:
    """(target, explained values (N,)): class 1 of a classifier, else a random direction of the output."""
    with torch.no_grad():
        out = adapter.model(x)
    out = getattr(out, "logits", out)
    if isinstance(out, tuple | list):
        out = out[0]
    try:
        srd_saliency(adapter, x, 1, contrast="none")
        return 1, out[:, 1]
    except SaeCafeError as e:
        if "direction" not in str(e):
            raise
    direction = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(0))
    return direction, out @ direction


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


def zoo_row(row: dict, repeat: int, batch: int = 1, random_init: bool = False, ierf_layer: str | None = None
            ) -> None:
    """Fill ``row`` (which holds "model") step by step; a failing step leaves the earlier results in it."""
    name = row["model"]
    adapter, label = build(name)
    reinit_zero_linears(adapter.model)
    if random_init:
        randomize(adapter.model, adapter.input_size)
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    cls = model_class(adapter.model)
    row["constructor"] = label or f"{cls.__module__.split('.')[0]}.{cls.__name__}"
    h, w = adapter.input_size
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0))
    target, value = target_for(adapter, x)
    maps, sink = srd_saliency(adapter, x, target, contrast="none", return_sink=True)
    total = maps.sum((-2, -1)) + sink.reshape(batch, -1).sum(1)
    row["saliency_err"] = float(((total - value).abs() / (maps.abs().sum((-2, -1))
                                                          + sink.reshape(batch, -1).abs().sum(1) + value.abs())).max())

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
    mid = adapter.resolve_layer(ierf_layer) if ierf_layer else layers[len(layers) // 2]
    gh, gw = adapter.grid(mid)
    errs = []
    for r, c in ((0, 0), (gh // 2, gw // 2), (gh - 1, gw - 1), (gh // 3, 2 * gw // 3)):
        m, s = srd_ierf(adapter, x, mid, (r, c), return_sink=True)
        errs.append(float((m.sum((-2, -1)) + s.reshape(batch, -1).sum(1) - 1.0).abs().max()))
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
    ap.add_argument("--models", nargs="*", help="registered names or CONSTRUCTED names (default: DEFAULT_MODELS, "
                    "or the --family preset's)")
    ap.add_argument("--family", choices=sorted(FAMILIES), help="a per-family preset (module docstring): its model "
                    "list, --randomize, batch and repeat; results go to model_zoo_<family>.{json,md}")
    ap.add_argument("--per-class", action="store_true", help="one registered name per model class instead")
    ap.add_argument("--all", action="store_true", help="every registered name")
    ap.add_argument("--update", action="store_true", help="replace only these models' rows of an existing table")
    ap.add_argument("--repeat", type=int, default=None, help="best of N timed calls (default 2, or the preset's)")
    ap.add_argument("--batch", type=int, default=None, help="images per call (default 1, or the preset's)")
    ap.add_argument("--randomize", action="store_true", help="re-draw norm affines, biases, BN statistics "
                    "(module docstring; on with --family cnn / densenet_swin)")
    ap.add_argument("--ierf-layer", default=None, help="layer of the iERF check (default: the middle PFV layer)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    ap.add_argument("--name", default=None, help="file stem of the results (default: model_zoo, or "
                    "model_zoo_<family>)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = FAMILIES.get(args.family, {})
    repeat = args.repeat or preset.get("repeat", 2)
    batch = args.batch or preset.get("batch", 1)
    random_init = args.randomize or preset.get("randomize", False)
    stem = args.name or (f"model_zoo_{args.family}" if args.family else "model_zoo")
    names = args.models or (list_adapters() if args.all else representatives(list_adapters()) if args.per_class
                            else list(preset.get("models", DEFAULT_MODELS)))
    args.out.mkdir(parents=True, exist_ok=True)
    old = (json.loads((args.out / f"{stem}.json").read_text())["rows"]
           if args.update and (args.out / f"{stem}.json").is_file() else [])
    meta = {"threads": args.threads, "torch": torch.__version__, "input": "224 px (the adapter's input size)",
            "weights": "random" + (", re-drawn norms/biases/BN statistics" if random_init else ""),
            "dtype": "float32", "batch": batch, "repeat": repeat, "family": args.family}
    rows: list[dict] = []
    table = old
    for n in names:
        t = time.perf_counter()
        row: dict = {"model": n}
        try:
            zoo_row(row, repeat, batch, random_init, args.ierf_layer)
        except Exception as e:  # noqa: BLE001 - the table shows what failed
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        row["wall_s"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        new = {r["model"]: r for r in rows}  # written after every row: an interrupted run keeps what it measured
        table = [new.pop(r["model"], r) for r in old] + list(new.values())
        (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": table}, indent=1))
        (args.out / f"{stem}.md").write_text(render(table))
    print(render(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
