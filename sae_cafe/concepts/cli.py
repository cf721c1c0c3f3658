"""``sae-cafe dissect``: Network Dissection of an SAE's latents on a segmentation dataset (a mask folder or an
index file, :mod:`sae_cafe.concepts.dissection`), written as ``labels.json`` + ``iou.safetensors`` +
``dissection.json`` into one output folder (replaced as a whole: written to a temporary sibling, then renamed).

The model, layer and SAE come either from a CAFE stage (``--cafe STAGE``: its recorded model weights, layer and
SAE; with ``--evidence`` also the iERF version from the stage's exemplars, when the stage was built over the
dataset's images) or from a run (``--run R --model M --layer L [--sae DIR]``: the run's recorded weights; the SAE
defaults to ``<root>/<run>/saes/<model>/<layer>``).
"""

from __future__ import annotations

import argparse
import shutil
import uuid
from pathlib import Path

FORMATS = ("auto", "folder", "json", "csv")


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..cli_help import DEVICE_HELP, ROOT_HELP, WEIGHTS_HELP, HelpFormatter

    p = subparsers.add_parser(
        "dissect", help="Network Dissection: label every SAE latent with the concept whose masks its maps overlap "
                        "best (IoU) on a segmentation dataset", formatter_class=HelpFormatter,
        description="Label every latent of an SAE with the concept of a segmentation dataset whose masks its "
                    "thresholded activation maps overlap best (Bau et al. 2017; docs/concept_labels_dissection.md). "
                    "Give either a CAFE stage (--cafe) or a run, model, layer (and SAE). Writes labels.json, "
                    "iou.safetensors and dissection.json to --out and prints the best-matching latents.")
    p.add_argument("--masks", required=True, help="segmentation dataset: a folder holding images/ + "
                   "masks/<image name>/<concept>.png, or index.json / index.csv (or the index file itself)")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="dataset format; auto: detected (index.json, then index.csv, else the images/+masks/ "
                   "folder); another value is checked against what is found")
    p.add_argument("--cafe", default=None, help="CAFE stage directory: model (its recorded weights), layer and "
                   "SAE as the stage recorded them")
    p.add_argument("--evidence", action="store_true", help="also the evidence version (SRD iERFs of the CAFE "
                   "stage's exemplars); needs --cafe built over the dataset's images in the same order")
    p.add_argument("--run", default="demo", help="run name (default demo; with --model and --layer; not needed "
                   "with --cafe)")
    p.add_argument("--root", default=None, help=ROOT_HELP)
    p.add_argument("--model", default=None, help="registered model name (with --run; with --cafe: checked)")
    p.add_argument("--layer", default=None, help="layer id (with --run; with --cafe: checked against the stage)")
    p.add_argument("--sae", default=None, help="SAE directory (default: the CAFE stage's SAE, or "
                   "<root>/<run>/saes/<model>/<layer>)")
    p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--quantile", type=float, default=0.005, help="top quantile of a latent's activation values "
                   "that counts as 'on' (the threshold T_k)")
    p.add_argument("--iou-min", type=float, default=0.04, help="a latent is labelled when its best IoU reaches this "
                   "(Network Dissection's detector threshold)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--out", default=None, help="output folder (replaced when it holds an earlier dissection; "
                   "default: <root>/<run>/dissection/<model>/<layer>, the run of --cafe or --run)")
    p.add_argument("--top", type=int, default=10, help="latents shown in the printed table")
    p.set_defaults(func=_dissect)


def _resolve(args):
    """(adapter, layer, SAE, SAE path, CAFE stage dir or None, default output folder)."""
    from ..artifacts import read_manifest, run_dir, stage_path
    from ..errors import MismatchError, SaeCafeError
    from ..model_record import load_from_record, read_record, resolve_run_model
    from ..models import load_model
    from ..saes import load_sae

    if args.cafe is not None:
        stage = Path(args.cafe)
        if not (stage / "manifest.json").exists():
            raise SaeCafeError(f"--cafe {stage}: not a CAFE stage (no manifest.json); pass a directory "
                               "<root>/<run>/cafe/<model>/<layer> built by `sae-cafe build-index` or a run")
        m = read_manifest(stage, "cafe")
        if args.model is not None and args.model != m.get("model"):
            raise MismatchError(f"--model {args.model} but the CAFE stage {stage} was built with {m.get('model')}; "
                                "leave --model out or pass the stage's model")
        rec = read_record(m, str(stage))
        adapter = (load_from_record(rec, args.weights, args.device, what=f"the CAFE stage {stage}")
                   if rec is not None else load_model(m["model"], weights=args.weights, device=args.device))
        layer = str(m["layer"])
        if args.layer is not None and adapter.resolve_layer(args.layer) != layer:
            raise MismatchError(f"--layer {args.layer} is {adapter.resolve_layer(args.layer)!r} but the CAFE stage "
                                f"{stage} is of layer {layer!r}; leave --layer out or pass that stage's layer")
        sae_path = args.sae or m.get("sae_path")
        if not sae_path:
            raise SaeCafeError(f"the CAFE stage {stage} does not record its SAE; pass --sae")
        # beside the stage, never inside it (a finished stage is never rewritten)
        out = (stage.parents[2] / "dissection" / stage.parent.name / stage.name if stage.parent.parent.name == "cafe"
               else stage.with_name(f"{stage.name}_dissection"))
    else:
        if args.evidence:
            raise SaeCafeError("--evidence needs --cafe: the iERFs come from a CAFE stage built over the dataset's "
                               "images")
        missing = [f"--{n}" for n in ("model", "layer") if getattr(args, n) is None]
        if missing:
            raise SaeCafeError(f"pass --cafe STAGE, or --model and --layer with --run (default demo) "
                               f"(missing: {', '.join(missing)})")
        adapter = resolve_run_model(run_dir(args.run, args.root), args.model, args.weights, args.device)
        layer = adapter.resolve_layer(args.layer)
        stage = None
        sae_path = args.sae or stage_path(args.run, "saes", adapter.name, layer, root=args.root)
        if not Path(sae_path).exists():
            raise SaeCafeError(f"no SAE at {sae_path}; train one (`sae-cafe train-sae`) or pass --sae")
        out = run_dir(args.run, args.root) / "dissection" / adapter.name.replace("/", "_") / layer.replace("/", "_")
    sae = load_sae(sae_path, adapter, layer, check_model=False)  # MismatchError for another layer's SAE
    return adapter, layer, sae, Path(sae_path), stage, Path(args.out) if args.out else out


def _dataset(path: str, fmt: str):
    from ..errors import SaeCafeError
    from .dissection import load_segmentation

    p = Path(path)
    if not p.exists():
        raise SaeCafeError(f"--masks {p} does not exist; pass a segmentation folder (images/ + masks/) or an "
                           "index.json / index.csv (docs/concept_labels_dissection.md)")
    if p.is_file() and p.suffix not in (".json", ".csv"):
        raise SaeCafeError(f"--masks {p}: unknown format {p.suffix!r}; an index file is .json or .csv, or pass the "
                           "folder (images/ + masks/<image name>/<concept>.png)")
    ds = load_segmentation(p)
    if fmt != "auto" and ds.format != fmt:
        raise SaeCafeError(f"--masks {p} holds the {ds.format!r} format, not --format {fmt}; pass --format "
                           f"{ds.format} or auto")
    return ds


def _publish(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` (two renames; an existing ``out`` must be an earlier dissection)."""
    from ..errors import SaeCafeError

    if out.exists():
        if not (out / "dissection.json").exists() and any(out.iterdir()):
            raise SaeCafeError(f"--out {out} exists and is not a dissection output; choose another folder")
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _dissect(args) -> int:
    import json

    from ..artifacts import atomic_write_json
    from .dissection import dissect, write_dissection

    ds = _dataset(args.masks, args.format)
    adapter, layer, sae, sae_path, stage, out = _resolve(args)
    res = dissect(adapter, sae, layer, ds, cafe=stage if args.evidence else None, quantile=args.quantile,
                  iou_min=args.iou_min, batch_size=args.batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write_dissection(res, tmp)
        doc = json.loads((tmp / "dissection.json").read_text())
        doc.update(model=adapter.name, layer=layer, sae=str(sae_path), masks=str(Path(args.masks).resolve()),
                   format=ds.format, n_images=len(ds), cafe=None if stage is None else str(stage))
        atomic_write_json(tmp / "dissection.json", doc)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(res, args.top))
    print(f"written {out} (labels.json, iou.safetensors, dissection.json)")
    return 0


def table(res, top: int = 10) -> str:
    """A short text table: labelled counts per method and the ``top`` latents by best activation-map IoU."""
    methods = sorted(res.labels)
    S = len(res.labels[methods[0]])
    lines = [f"{len(res.concepts)} concepts; labelled (IoU ≥ {res.iou_min}): "
             + ", ".join(f"{m} {sum(lab.labelled for lab in res.labels[m])}/{S}" for m in methods)]
    first = res.iou["act"] if "act" in res.iou else next(iter(res.iou.values()))
    order = first.max(1).values.argsort(descending=True, stable=True)[:top].tolist()
    lines.append("latent  " + "  ".join(f"{m + ' (IoU)':<30}" for m in methods))
    for s in order:
        cells = []
        for m in methods:
            lab = res.labels[m][s]
            key = m.removeprefix("dissection-")
            iou = float(res.iou[key][s].max())
            cells.append(f"{(lab.name if lab.labelled else '-') + f' ({iou:.3f})':<30}")
        lines.append(f"{s:>6}  " + "  ".join(cells))
    return "\n".join(lines)
