"""Full-size SRD checks of torchvision DenseNet and Swin Transformer v1 (224 px, random weights): conservation,
iERF sums and cost, in one process.

For each model: BatchNorm statistics set to the batch statistics of random images (one forward in train mode,
momentum 1), BN / LayerNorm affines and biases re-randomised (Swin: relative position bias tables too); then,
in float32:

* conservation error: max over images of |Σ map − logit| / (Σ |map| + |logit|) (saliency, contrast 'none');
* iERF error: max |Σ iERF − 1| at one position of a middle layer;
* cost: SRD saliency time / (forward + input-gradient) time of the same batch (parameters frozen), both
  best of ``--repeat``, measured interleaved in this process, ``--threads`` intra-op threads.

Run: ``python benchmarks/model_zoo_densenet_swin.py [--models densenet121,swin_t] [--batch 2]``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

from sae_cafe.models import load_model
from sae_cafe.srd import srd_ierf, srd_saliency

warnings.filterwarnings("ignore")

#: model name → a middle PFV layer for the iERF check
MODELS = {"densenet121": "features.transition2", "swin_t": "features.3"}


def randomize(model: nn.Module, seed: int = 0) -> None:
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
            table = getattr(m, "relative_position_bias_table", None)
            if isinstance(table, torch.Tensor):
                table.copy_(torch.randn(table.shape, generator=g))
        model(torch.randn(4, 3, 224, 224, generator=g))  # BN running statistics = these batch statistics
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def fwd_grad(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    xg = x.clone().requires_grad_(True)
    model(xg).gather(1, target[:, None]).sum().backward()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def check(name: str, layer: str, batch: int, repeat: int) -> dict:
    adapter = load_model(name)
    model = adapter.model
    randomize(model)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    target = logits.argmax(1)
    maps = srd_saliency(adapter, x, target, contrast="none")  # builds and verifies the stage graph once
    picked = logits.gather(1, target[:, None])[:, 0]
    cons = ((maps.sum((1, 2)) - picked).abs() / (maps.abs().sum((1, 2)) + picked.abs())).max()
    h, w = adapter.layer(layer).grid
    ierf = srd_ierf(adapter, x, layer, (h // 2, w // 3))
    ierf_err = (ierf.sum((1, 2)) - 1).abs().max()
    t_srd, t_ref = [], []
    for _ in range(repeat):  # interleaved
        t_srd.append(timed(lambda: srd_saliency(adapter, x, target)))
        t_ref.append(timed(lambda: fwd_grad(model, x, target)))
    return dict(model=name, family=adapter.family, batch=batch, conservation=float(cons), ierf_layer=layer,
                ierf_error=float(ierf_err), srd_s=min(t_srd), ref_s=min(t_ref), ratio=min(t_srd) / min(t_ref))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, 224 px, float32, random weights")
    print(f"{'model':14s} {'family':10s} {'cons. err':>10s} {'iERF err':>10s} {'SRD s':>8s} {'fwd+grad s':>10s} "
          f"{'ratio':>6s}")
    for name in args.models.split(","):
        r = check(name, MODELS[name], args.batch, args.repeat)
        print(f"{r['model']:14s} {r['family']:10s} {r['conservation']:10.2e} {r['ierf_error']:10.2e} "
              f"{r['srd_s']:8.3f} {r['ref_s']:10.3f} {r['ratio']:6.2f}", flush=True)


if __name__ == "__main__":
    main()
