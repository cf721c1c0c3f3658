"""Hugging Face and open_clip vision transformers at full size (224 px, random weights, float32, CPU): SRD rows.

Per model:
- saliency conservation: |Σmap + sink − v| / (Σ|map| + |sink| + |v|) with ``contrast="none"``, v the logit of
  class 1 (classifiers) or ⟨output, d⟩ for a random direction d (embedding / pooled-feature towers);
- iERF conservation at the middle block: max over 4 positions of |Σ iERF + sink − 1|;
- SRD cost: saliency time / (forward + input-gradient of the same scalar) time, same batch, same process,
  best of ``--repeat`` interleaved calls (after a warm-up call of each; SRD's builds and checks its form).

    nice -n 10 .venv/bin/python benchmarks/model_zoo_vit.py [--batch 1] [--repeat 3] [--models hf_clip ...]

Needs no network: every model is built from its config / open_clip architecture name with random weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings

import torch

from sae_cafe.models import make_adapter
from sae_cafe.srd import srd_ierf, srd_saliency

warnings.filterwarnings("ignore")


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


MODELS = {
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


def best_times(fns, repeat: int) -> list[float]:
    """Best of ``repeat`` for each function, the calls interleaved so that load changes hit all alike."""
    times = [[] for _ in fns]
    for _ in range(repeat):
        for f, ts in zip(fns, times, strict=True):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
    return [min(ts) for ts in times]


def row(name: str, batch: int, repeat: int) -> dict:
    label, make = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    a = make_adapter(model, name)
    h, w = a.input_size
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = a(x)
    if a.num_classes:
        target, value, kind = 1, out[:, 1], "class 1"
    else:
        target = torch.randn(out.shape[1], generator=torch.Generator().manual_seed(1))
        value, kind = out @ target, "direction"
    maps, sink = srd_saliency(a, x, target, contrast="none", return_sink=True)
    err = (maps.sum((-2, -1)) + sink - value).abs() / (maps.abs().sum((-2, -1)) + sink.abs() + value.abs())

    def grad_ref():
        xg = x.clone().requires_grad_(True)
        o = a(xg)
        (o[:, 1] if kind == "class 1" else o @ target).sum().backward()

    grad_ref()
    t_srd, t_ref = best_times([lambda: srd_saliency(a, x, target, contrast="none"), grad_ref], repeat)
    names = a.block_names()
    mid = names[len(names) // 2]
    gh, gw = a.patch_grid()
    ierr = 0.0
    for r, c in ((0, 0), (gh // 2, gw // 2), (gh - 1, gw - 1), (gh // 3, 2 * gw // 3)):
        m, s = srd_ierf(a, x, mid, (r, c), return_sink=True)
        ierr = max(ierr, float((m.sum((-2, -1)) + s - 1).abs().max()))
    return {"model": name, "constructor": label, "target": kind, "saliency_err": float(err.max()),
            "ierf_layer": mid, "ierf_err": ierr, "srd_s": round(t_srd, 3), "fwd_grad_s": round(t_ref, 3),
            "cost": t_srd / t_ref}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", choices=list(MODELS), help="default: all")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for n in args.models or list(MODELS):
        t = time.perf_counter()
        try:
            r = row(n, args.batch, args.repeat)
        except Exception as e:  # noqa: BLE001 - the table shows what failed
            traceback.print_exc()
            r = {"model": n, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        r["wall_s"] = round(time.perf_counter() - t, 1)
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"\n224 px, random weights, float32, batch {args.batch}, {args.threads} threads, best of {args.repeat}\n")
    print("| model | constructor | target | saliency conservation err | iERF err (block) | SRD cost × (fwd + grad) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | | | error: {r['error']} | | |")
        else:
            print(f"| {r['model']} | {r['constructor']} | {r['target']} | {r['saliency_err']:.1e} | "
                  f"{r['ierf_err']:.1e} ({r['ierf_layer']}) | "
                  f"{r['cost']:.2f}× ({r['srd_s']} s / {r['fwd_grad_s']} s) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
