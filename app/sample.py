"""A tiny artifact run built by the real pipeline (world → activations → SAEs → CAFE → ICAT → saliency), for
the viewer's tests and a quick look: ``python -m app.sample indexes`` then ``sae-cafe view indexes``.

Settings are tiny (24 scenes, 32-latent SAEs trained for a few steps) so the whole run takes well under a
minute on a CPU; the results are not meaningful, only well-formed.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

LAYERS = ("layer3", "layer4")


def build_sample_run(root: str | Path, run: str = "tiny", n: int = 24, model: str = "mini_resnet",
                     d_sae: int = 32, k: int = 3) -> Path:
    """Build ``<root>/<run>`` with every stage the viewer shows; returns the run directory."""
    import torch

    from sae_cafe.activations import extract_activations
    from sae_cafe.artifacts import stage_path
    from sae_cafe.cafe import build_cafe
    from sae_cafe.evaluation import BenchmarkConfig, run_saliency_benchmark, write_saliency_benchmark
    from sae_cafe.icat import GraphConfig, ICATConfig, build_icat
    from sae_cafe.models import load_model
    from sae_cafe.saes import load_sae
    from sae_cafe.world import load_world, write_world
    from sae_training.train import train_sae  # the submodule: works with a stale editable install too

    root = Path(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_world(write_world(run, n=n, seed=0, root=root))
        ad = load_model(model)
        acts = extract_activations(ad, ds.images_dir, list(LAYERS), run=run, root=root, batch_size=n,
                                   progress=False)
        w = ds.world
        saes = {}
        for layer in LAYERS:
            r = train_sae(acts[layer], architecture="topk", k=4, d_sae=d_sae, steps=15, batch_size=128,
                          n_checkpoints=0, normalize="none", progress=False)
            saes[layer] = load_sae(r["sae_dir"], ad, layer)
            build_cafe(ad, saes[layer], layer, ds.images_dir, run=run, root=root, k=k, n_sample=4, batch_size=n,
                       progress=False, attributes={"shape": w.shape_map, "colour": w.colour_map},
                       upstream={"sae": r["sae_dir"]}, extra_manifest={"sae_path": str(r["sae_dir"])})
        cfg = ICATConfig(max_images_per_class=2, pgd_steps=2, graph=GraphConfig(max_nodes_per_layer=4, top_k=3,
                                                                                positive_only=False))
        build_icat(ad, saes, list(w.images), w.labels, run=run, root=root, steps=2, config=cfg,
                   classes=[int(w.labels[0])])
        m = 4
        res = run_saliency_benchmark(ad, ad.preprocess(list(w.images[:m])), w.instance[:m] == 1,
                                     torch.as_tensor(w.labels[:m]), ["srd", "saliency"],
                                     BenchmarkConfig(n_fidelity=1, n_subsets=8, n_noise=2, steps=16), progress=False)
        write_saliency_benchmark(res, stage_path(run, "saliency", ad.name, root=root))
    return root / run


if __name__ == "__main__":
    print(build_sample_run(sys.argv[1] if len(sys.argv) > 1 else "indexes"))
