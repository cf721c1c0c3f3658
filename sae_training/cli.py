"""``sae-cafe train-sae`` and ``sae-cafe eval-sae`` (flags or a TOML config)."""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from pathlib import Path
from typing import Any

from sae_cafe.errors import SaeCafeError


def register(subparsers: argparse._SubParsersAction) -> None:
    from .train import ARCHITECTURES

    p = subparsers.add_parser("train-sae", help="train an SAE on activation shards (sae-lens)",
                              description="Train an SAE with sae-lens on indexes/<run>/acts/<model>/<layer> and "
                                          "save it to indexes/<run>/saes/<model>/<layer> (cfg.json + "
                                          "sae_weights.safetensors), then evaluate it as reloaded from disk.")
    p.add_argument("--acts", default=None, help="acts stage directory (or --run/--model/--layer)")
    p.add_argument("--run", default="demo", help="run name (default: demo, the run `sae-cafe demo` builds)")
    p.add_argument("--root", default=None, help="artifact root (default indexes/ or $SAE_CAFE_ROOT)")
    p.add_argument("--model", default=None, help="model name (to find the acts, and for the spliced eval)")
    p.add_argument("--layer", default=None, help="layer id (to find the acts: <root>/<run>/acts/<model>/<layer>)")
    p.add_argument("--weights", default=None, help="model weights for the spliced-in evaluation")
    p.add_argument("--config", default=None, help="TOML file with SAETrainConfig keys (flags override it)")
    p.add_argument("--out", default=None, help="output directory (default: the run layout)")
    p.add_argument("--architecture", choices=ARCHITECTURES, default=None,
                   help="SAE architecture (default: the --config value, else SAETrainConfig's)")
    p.add_argument("--expansion", type=int, default=None, help="d_sae = expansion × d_in")
    p.add_argument("--d-sae", type=int, default=None, help="number of latents (overrides --expansion)")
    p.add_argument("--k", type=float, default=None, help="active latents per PFV of (batch)topk SAEs")
    p.add_argument("--l1-coefficient", type=float, default=None, help="sparsity coefficient of standard (L1) SAEs")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (a budget; with --seconds, whichever ends first)")
    p.add_argument("--seconds", type=float, default=None, help="wall-clock training budget in seconds")
    p.add_argument("--batch-size", type=int, default=None, help="PFVs per training step")
    p.add_argument("--lr", type=float, default=None, help="learning rate")
    p.add_argument("--holdout", type=float, default=None, help="fraction of images held out for the evaluation")
    p.add_argument("--seed", type=int, default=None, help="seed of the initialisation and the PFV order")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cpu)")
    p.add_argument("--eval-images", default=None, help="held-out images for accuracy/KL with the SAE spliced in")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints of an interrupted run")
    p.add_argument("--token-kinds", choices=["patch", "all", "cls"], default=None,
                   help="ViT token kinds trained on (SAETrainConfig.tokens; default patch); they must be in the shards")
    p.add_argument("--outliers", choices=["report", "exclude"], default=None,
                   help="high-norm outlier rows flagged at extraction: train on them with a note (default report) "
                        "or leave them out")
    p.add_argument("--normalize", default=None, help="sae-lens normalize_activations (default "
                   "expected_average_only_in: mean PFV norm √d_in, factor recorded and folded into the weights; none)")
    s = p.add_argument_group("streamed training (--stream: no activation shards; see docs/streaming.md)")
    s.add_argument("--stream", action="store_true",
                   help="train SAEs for several layers/architectures at once from the model's forward passes "
                        "over --images (sae-lens MultiSAETrainer), instead of from activation shards")
    s.add_argument("--images", default=None, help="image folder (or file) the model is run over (--stream)")
    s.add_argument("--layers", nargs="+", default=None, help="layer ids, one SAE per layer and variant (--stream)")
    s.add_argument("--architectures", nargs="+", choices=ARCHITECTURES, default=None,
                   help="SAE architectures trained side by side (--stream; default: --architecture)")
    s.add_argument("--expansions", nargs="+", type=int, default=None,
                   help="SAE sizes (d_sae = expansion × d_in) trained side by side (--stream; default: --expansion)")
    s.add_argument("--tokens", type=int, default=None,
                   help="PFVs per SAE (--stream; sets --steps = ceil(tokens / batch size))")
    s.add_argument("--image-batch-size", type=int, default=32, help="images per forward pass (--stream)")
    p.set_defaults(func=_train)

    e = subparsers.add_parser("eval-sae", help="evaluate an SAE (any sae-lens SAE directory)")
    e.add_argument("--sae", required=True, help="SAE directory (cfg.json + sae_weights.safetensors)")
    e.add_argument("--model", default=None, help="registered model name (for --images and the spliced-in accuracy)")
    e.add_argument("--weights", default=None, help="local weights file of --model (default: its shipped weights)")
    e.add_argument("--images", default=None, help="held-out images (needs --model)")
    e.add_argument("--acts", default=None, help="held-out acts stage (alternative to --images)")
    e.add_argument("--max-pfvs", type=int, default=1_000_000, help="at most this many held-out PFVs")
    e.add_argument("--out", default=None, help="write the metrics JSON and plots to this folder (default: print only)")
    e.add_argument("--device", default=None, help="cpu | cuda (default: cpu)")
    e.set_defaults(func=_eval)


def load_toml(path: str | Path) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    with open(path, "rb") as fd:
        data = tomllib.load(fd)
    return data.get("sae", data)


def config_from_args(args: argparse.Namespace):
    from .train import SAETrainConfig

    values: dict[str, Any] = load_toml(args.config) if args.config else {}
    names = {f.name for f in dataclasses.fields(SAETrainConfig)}
    unknown = set(values) - names
    if unknown:
        raise SaeCafeError(f"{args.config}: unknown keys {sorted(unknown)}; valid keys: {sorted(names)}")
    for f in names - {"tokens"}:  # args.tokens is the --stream PFV budget; the token kinds are --token-kinds
        v = getattr(args, f, None)
        if v is not None:
            values[f] = v
    if getattr(args, "token_kinds", None) is not None:
        values["tokens"] = args.token_kinds
    return SAETrainConfig(**values)


def _acts_dir(args: argparse.Namespace) -> Path:
    if args.acts:
        return Path(args.acts)
    if not (args.model and args.layer):
        raise SaeCafeError("give --acts DIR, or --model and --layer (with --run) to locate the activation shards")
    from sae_cafe.artifacts import stage_path
    from sae_cafe.models import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = load_model(args.model).resolve_layer(args.layer)
    return stage_path(args.run, "acts", args.model, layer.replace("/", "_"), root=args.root)


def _table(title: str, rows: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in rows.items():
        if isinstance(v, (dict, list)) or v is None:
            continue
        t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(t)


def _train(args: argparse.Namespace) -> int:
    from .train import train_sae

    if getattr(args, "stream", False):
        return _train_stream(args)
    stream_only = [f"--{n.replace('_', '-')}" for n in ("images", "layers", "architectures", "expansions", "tokens")
                   if getattr(args, n, None) is not None]
    if stream_only:
        raise SaeCafeError(f"{', '.join(stream_only)} only apply to streamed training; add --stream")
    cfg = config_from_args(args)
    acts = _acts_dir(args)
    model = None
    if args.eval_images:
        from sae_cafe.activations import ShardReader
        from sae_cafe.models import load_model

        model = load_model(args.model or ShardReader(acts).model, weights=args.weights, device=args.device)
    res = train_sae(acts, args.out, config=cfg, model=model, eval_images=args.eval_images,
                    resume=not args.no_resume)
    tr = res["training"]
    _table(f"SAE {tr['architecture']} d_sae={tr['d_sae']} → {res['sae_dir']}",
           {"steps": tr["steps"], "train seconds": tr["train_seconds"],
            "samples/s": tr["samples_per_second"], **res.get("eval", {})})
    return 0


def _eval(args: argparse.Namespace) -> int:
    from sae_cafe.models import load_model

    from .evaluate import evaluate_sae

    model = load_model(args.model, weights=args.weights, device=args.device) if args.model else None
    if args.images and model is None:
        raise SaeCafeError("--images needs --model (the model to run the images through)")
    res = evaluate_sae(args.sae, acts=args.acts, model=model, images=args.images, max_pfvs=args.max_pfvs,
                       out_dir=args.out)
    _table(f"SAE at {args.sae}", res)
    return 0


def _train_stream(args: argparse.Namespace) -> int:
    """``train-sae --stream``: every (layer, architecture, expansion) SAE from one stream of forward passes."""
    import math

    from sae_cafe.artifacts import run_dir
    from sae_cafe.model_record import resolve_run_model

    from .stream import SHARED, StreamConfig, StreamSAE, train_saes_streaming

    if not (args.model and args.images):
        raise SaeCafeError("--stream needs --model (the model to run) and --images (the images to run it over)")
    layers = args.layers or ([args.layer] if args.layer else None)
    if not layers:
        raise SaeCafeError("--stream needs --layers L [L ...] (or --layer L)")
    if args.seconds is not None:
        raise SaeCafeError("--stream has a step budget only: give --steps or --tokens instead of --seconds")
    if args.holdout is not None:
        raise SaeCafeError("--stream keeps no held-out split (the PFVs are not stored): drop --holdout and pass "
                           "held-out images with --eval-images")
    base = config_from_args(args)
    steps = math.ceil(args.tokens / base.batch_size) if args.tokens else base.steps
    shared = {f: getattr(base, f) for f in SHARED if f not in ("steps",)}
    cfg = StreamConfig(steps=int(steps), image_batch_size=args.image_batch_size, seed=base.seed,
                       buffer_rows=base.buffer_rows, **shared)
    archs = args.architectures or [base.architecture]
    exps = args.expansions or [base.expansion]
    variants = [(a, e) for a in archs for e in exps]
    specs = []
    for layer in layers:
        for i, (a, e) in enumerate(variants):
            name = None if i == 0 else (a if len(exps) == 1 else f"{a}-x{e}")
            specs.append(StreamSAE(layer, dataclasses.replace(base, architecture=a, expansion=e,
                                                              d_sae=None if len(exps) > 1 else base.d_sae), name))
    adapter = resolve_run_model(run_dir(args.run, args.root), args.model, args.weights, args.device)
    res = train_saes_streaming(adapter, args.images, specs, cfg, run=args.run, root=args.root,
                               resume=not args.no_resume, eval_images=args.eval_images)
    for name, r in res["saes"].items():
        tr = r["training"]
        _table(f"SAE {name} {tr['architecture']} d_sae={tr['d_sae']} → {r['sae_dir']}",
               {"steps": tr["steps"], "train seconds": tr["train_seconds"],
                "samples/s (all SAEs)": tr["samples_per_second"], **r.get("eval", {})})
    return 0
