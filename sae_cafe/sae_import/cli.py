"""``sae-cafe convert-sae``: an SAE trained by SAELens, saev or ViT-Prisma → sae-cafe's SAE stage."""

from __future__ import annotations

from ..cli_help import HelpFormatter, add_common
from .common import FORMATS, TOKEN_SETS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-sae", help="import an SAE trained elsewhere (SAELens, saev, ViT-Prisma) as this run's SAE stage",
        description="Convert an outside SAE into <root>/<run>/saes/<model>/<layer> (or --out): a sae-lens "
                    "inference export (cfg.json + sae_weights.safetensors) with a manifest recording the source "
                    "format, files and sha256, its hook and the tokens it was trained on. The hook name is mapped "
                    "to the model's block (blocks.9.hook_resid_post -> block 9); d_in must equal the layer's PFV "
                    "width. Afterwards build-index / graph / view read it like any other SAE. See "
                    "docs/sae_import.md.",
        formatter_class=HelpFormatter)
    p.add_argument("src", help="the outside SAE: SAELens folder, saev sae.pt (or its run/checkpoint folder), "
                               "ViT-Prisma folder (config.json + weights) or its weights file")
    p.add_argument("--from", dest="fmt", required=True, choices=FORMATS, help="format of SRC")
    add_common(p)
    p.add_argument("--layer", default=None,
                   help="block index (negative counts from the end, as saev's layer) or layer id; default: the "
                        "hook the SAE records (saev records none: required there)")
    p.add_argument("--out", default=None, help="stage directory to write instead of <root>/<run>/saes/<model>/<layer> "
                   "(the model then loads from --weights alone, not from the run's record)")
    p.add_argument("--tokens", choices=TOKEN_SETS, default=None,
                   help="tokens the SAE was trained on, when the format does not record it (saev, SAELens)")
    p.add_argument("--norm-scaling-factor", type=float, default=None,
                   help="constant the activations were multiplied by before the SAE (SAELens "
                        "expected_average_only_in, saev scaled shards); folded into the weights")
    p.add_argument("--saev-subtract-b-dec", choices=("auto", "yes", "no"), default="auto",
                   help="saev only: whether the encoder subtracts b_dec (auto: schema 2 no, older yes)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from .convert import convert_sae

    sub = {"auto": None, "yes": True, "no": False}[args.saev_subtract_b_dec]
    out = convert_sae(args.src, args.fmt, args.model, args.layer, args.out, run=None if args.out else args.run,
                      root=args.root,
                      weights=args.weights, device=args.device, tokens=args.tokens,
                      norm_scaling_factor=args.norm_scaling_factor, saev_subtract_b_dec=sub)
    from ..artifacts import read_manifest

    m = read_manifest(out, "saes")
    print(f"converted {args.fmt} SAE {args.src} -> {out}\n  layer {m['layer']} (source hook {m['source']['hook']}), "
          f"d_in {m['d_in']}, d_sae {m['d_sae']}, {m['architecture']}, tokens {m['trained_on_tokens']}")
    for w in m.get("warnings", []):
        print(f"  warning: {w}")
    return 0
