"""SRD facts about the shipped mini models: APOP agreement and ViT sink shares.

* APOP agreement: the share of scenes on which ``apop_forward(model, x, 0)`` (the activation pattern of x —
  ReLU gates, pool indices, frozen LayerNorm σ and attention probabilities — applied to the input 0 of the
  model's normalised input space, i.e. the dataset-mean image)
  predicts the class that ``model(x)`` predicts. Chance is 1/12.
* Sink share |sink| / (Σ|map| + |sink|): the relevance that reaches no pixel (ViT class token), for
  uncontrasted saliency maps of the predicted class and for iERFs of the centre token at a middle block
  (zero by construction for the CNNs).

    .venv/bin/python benchmarks/bench_mini_srd.py [--n 500] [--n-sink 100] [--out benchmarks/results/mini_srd]

Writes ``OUT.json`` and ``OUT.md`` (rendered into README.md by ``benchmarks/render_readme.py``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sae_cafe.artifacts import hash_file
from sae_cafe.models import load_model
from sae_cafe.models.mini import MINI_ARCHS, weights_path
from sae_cafe.srd import apop_forward, srd_ierf, srd_saliency
from sae_cafe.world import generate
from sae_cafe.world.train import EVAL_SEED_BASE, world_tensor

MIDDLE = {"mini_vit": "encoder.layers.encoder_layer_1"}


def _share(maps: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """(N,) |sink| / (Σ|map| + |sink|)."""
    return sink.abs() / (maps.abs().sum((-2, -1)) + sink.abs())


def bench(arch: str, n: int, n_sink: int, seed: int, batch: int = 50) -> dict:
    adapter = load_model(arch)
    world = generate(n, seed)
    x = world_tensor(world.images, adapter.mean, adapter.std)
    agree, sink_sal, sink_ierf = [], [], []
    for s in range(0, n, batch):
        xb = x[s:s + batch]
        with torch.no_grad():
            pred = adapter(xb).argmax(1)
        agree.append(apop_forward(adapter, xb, 0).argmax(1) == pred)
        if s < n_sink:
            maps, sink = srd_saliency(adapter, xb, pred, contrast="none", return_sink=True)
            sink_sal.append(_share(maps, sink))
            if arch in MIDDLE:
                h, w = adapter.layer(MIDDLE[arch]).grid
                im, isink = srd_ierf(adapter, xb, MIDDLE[arch], (h // 2, w // 2), return_sink=True)
                sink_ierf.append(_share(im, isink))
    out = {"apop_agreement": torch.cat(agree).float().mean().item(), "n": n, "seed": seed,
           "sink_share_saliency": torch.cat(sink_sal).mean().item(), "n_sink": n_sink,
           "weights_sha256": hash_file(weights_path(arch))}
    if sink_ierf:
        out.update(sink_share_ierf=torch.cat(sink_ierf).mean().item(), ierf_layer=MIDDLE[arch])
    return out


def markdown(res: dict) -> str:
    lines = ["| model | APOP agrees with model(x) | sink share, saliency (no contrast) "
             "| sink share, middle-block iERF |", "|---|---|---|---|"]
    for arch, r in res["models"].items():
        ierf = f"{r['sink_share_ierf']:.3f} ({r['ierf_layer']})" if "sink_share_ierf" in r else "0 (CNN)"
        sal = f"{r['sink_share_saliency']:.3f}" if arch in MIDDLE else "0 (CNN)"
        lines.append(f"| `{arch}` | {100 * r['apop_agreement']:.1f} % | {sal} | {ierf} |")
    r0 = next(iter(res["models"].values()))
    lines += ["", f"APOP on {r0['n']} fresh scenes (seed {r0['seed']}; chance 8.3 %); sink shares on the first "
              f"{r0['n_sink']}; x′ = 0 in the normalised input space (the mean image); `benchmarks/bench_mini_srd.py`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--n-sink", type=int, default=100)
    ap.add_argument("--seed", type=int, default=EVAL_SEED_BASE + 3)
    ap.add_argument("--arch", nargs="*", default=list(MINI_ARCHS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/mini_srd", help="results stem (STEM.json, STEM.md)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.out + ".json")
    res = json.loads(path.read_text()) if path.exists() else {"models": {}}
    for arch in args.arch:
        t = time.perf_counter()
        res["models"][arch] = bench(arch, args.n, args.n_sink, args.seed)
        print(arch, json.dumps(res["models"][arch]), f"{time.perf_counter() - t:.1f}s", flush=True)
    res["models"] = {a: res["models"][a] for a in MINI_ARCHS if a in res["models"]}
    path.write_text(json.dumps(res, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
