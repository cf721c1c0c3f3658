"""Stage ``srd/<model>``: SRD saliency maps of a few images spread across the classes (``maps.png`` +
``maps.safetensors``), a quick look at the model's explanations."""

from __future__ import annotations

import time
from typing import Any

from .dag import Stage


def stages(ctx) -> list[Stage]:
    out = []
    for m in ctx.cfg.models:
        if m.srd:
            out.append(Stage(f"srd/{m.name}", ctx.image_deps(),
                             {**ctx.model_key(m), "n": ctx.cfg.srd_images, "spread": "classes"},
                             lambda m=m: [ctx.stage_dir("srd", m.name)], lambda notes, m=m: build(ctx, m, notes)))
    return out


def build(ctx, m, notes: list[str]) -> dict[str, Any]:
    """SRD maps of ``cfg.srd_images`` images taken round-robin over the classes (evenly over a flat
    folder), explaining the predicted class (titles ``id: predicted class name``), or with
    ``target = "mean_direction"`` the value ⟨output, d⟩ (``RunContext.direction``; titles show it)."""
    import torch
    from safetensors.torch import save_file

    from sae_cafe.artifacts import stage_dir, write_manifest
    from sae_cafe.srd import srd_saliency
    from sae_cafe.viz import save_map_grid

    ad = ctx.adapter(m)
    direction = m.target == "mean_direction"  # a headless backbone: explain ⟨output, d⟩ (contrast "none")
    x, labels, _, ids = ctx.labelled_images(ctx.cfg.srd_images, ad, spread=True, label=not direction)
    x = x.to(ctx.device)
    with torch.no_grad():
        out = ad.model(x)
    if direction:
        dv = ctx.direction(m)
        target = dv["d"].to(out.device)
        pred = (out.float() @ target).float().cpu()  # the explained value ⟨output, d⟩ per image
        titles = [f"{i}: ⟨out,d⟩={v:.2f}"[:22] for i, v in zip(ids, pred.tolist())]
    else:
        target = pred = out.argmax(1)
        names = ctx.class_names(ad)
        titles = [f"{i}: {names[int(p)] if int(p) < len(names) else int(p)}"[:22] for i, p in zip(ids, pred.tolist())]
    t0 = time.perf_counter()
    maps = srd_saliency(ad, x, target).detach().float().cpu()
    sec = (time.perf_counter() - t0) / len(x)
    tensors = {"saliency": maps.contiguous(), "target": pred.cpu().contiguous()}
    if direction:
        tensors["direction"] = dv["d"].contiguous()
    with stage_dir(ctx.stage_dir("srd", m.name)) as d:
        save_file(tensors, str(d / "maps.safetensors"), metadata={"model": m.name, "images": ",".join(ids)})
        save_map_grid(d / "maps.png", ad.denormalize(x).cpu(), [maps], ["SRD saliency"], titles)
        what = ({"target": "mean_direction", "contrast": "none", "direction": {k: v for k, v in dv.items() if k != "d"}}
                if direction else {"target": "predicted", "contrast": "mean"})
        write_manifest(d, "srd", {"n": len(x), **what, "spread": "classes"},
                       None, model=m.name, image_ids=ids, labels=None if labels is None else labels.tolist(),
                       predicted=pred.tolist(), **ctx.weights_record(m))
    return {"maps": len(x), "classes": len(set(ctx.image_labels()[i] for i in ctx.spread(len(x)))) if direction
            else len(set(labels.tolist())), "sec_per_map": round(sec, 3),
            "png": str(ctx.stage_dir("srd", m.name) / "maps.png")}
