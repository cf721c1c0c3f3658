"""``sae-cafe srd``: SRD saliency maps and iERFs of images, saved as PNG (and safetensors)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli_help import DEVICE_HELP, MODEL_HELP, HelpFormatter

    p = sub.add_parser("srd", help="SRD class saliency maps / iERFs of images, saved as PNG + safetensors",
                       description="SRD saliency maps (and optionally hidden-layer relevance maps and the iERF of "
                                   "one PFV) of images, written to OUT/maps.png and OUT/maps.safetensors.",
                       formatter_class=HelpFormatter)
    p.add_argument("images", nargs="+", help="image files or folders (folders are read recursively; unreadable "
                   "files are skipped and reported)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--weights", default=None, help="local weights file (.pth/.pt/.safetensors; nothing is "
                   "downloaded). Default: the model's shipped weights (mini models), else random initialisation "
                   "with a warning")
    p.add_argument("--target", type=int, default=None, help="class index explained (default: each image's "
                   "predicted class)")
    p.add_argument("--contrast", choices=["mean", "none"], default="mean",
                   help="'mean': relevance of the target against the mean of the other classes; 'none': the "
                        "target logit alone")
    p.add_argument("--ierf", default=None, metavar="LAYER:ROW:COL", help="also the iERF of the PFV at grid "
                   "position (ROW, COL) of LAYER, e.g. layer3:4:5")
    p.add_argument("--layers", default="", help="comma-separated layers for hidden relevance maps, e.g. "
                   "layer2,layer3 (default: none)")
    p.add_argument("--out", default="indexes/srd", help="output folder, relative to the working directory "
                   "(default: indexes/srd); maps.png and maps.safetensors are (over)written there")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from ..images import SkipReport, iter_images
    from ..models import load_model
    from ..viz import save_map_grid
    from . import srd_ierf, srd_relevance, srd_saliency

    adapter = load_model(args.model, weights=args.weights, device=args.device)
    report = SkipReport()
    named = [item for src in args.images for item in iter_images(src, skip_bad=True, report=report)]
    if not named:
        print(report.summary())
        return 2
    names = [n for n, _ in named]
    x = adapter.preprocess([im for _, im in named])
    with torch.no_grad():
        logits = adapter.model(x)
    target = torch.full((len(x),), args.target) if args.target is not None else logits.argmax(1)
    maps = {"saliency": srd_saliency(adapter, x, target, contrast=args.contrast)}
    if args.layers:
        for layer, r in srd_relevance(adapter, x, target, args.layers.split(","), args.contrast).items():
            maps[f"relevance:{layer}"] = torch.nn.functional.interpolate(r[:, None], size=x.shape[-2:])[:, 0]
    if args.ierf:
        layer, row, col = args.ierf.rsplit(":", 2)
        maps[f"ierf:{layer}:{row}:{col}"] = srd_ierf(adapter, x, layer, (int(row), int(col)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in maps.items()}, str(out / "maps.safetensors"),
              metadata={"model": args.model, "images": ",".join(names), "targets": ",".join(map(str, target.tolist()))})
    png = save_map_grid(out / "maps.png", adapter.denormalize(x), list(maps.values()), list(maps),
                        [f"{n[:14]} → {int(t)}" for n, t in zip(names, target)])
    print(f"wrote {png} and {out / 'maps.safetensors'}")
    if report.skipped:
        print(report.summary())
    return 0
