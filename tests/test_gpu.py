"""CUDA smoke test (marker ``gpu``; skipped without CUDA): SRD, activation extraction, SAE training (shards and
streamed), the CAFE build and ICAT run on CUDA and agree with the same computation on the CPU (tiny models,
random weights, seconds).

``SAE_CAFE_GPU_TEST_DEVICE=cpu`` runs the same comparisons CPU against CPU (a dry run of this file on a
machine without a GPU; it checks the test, not the GPU). Run on a GPU machine with
``pytest -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import mini_resnet_32, random_sae, tiny_vit

DEVICE = os.environ.get("SAE_CAFE_GPU_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")]


def both(make):
    """The same adapter twice (same seed): on the CPU and on ``DEVICE``."""
    cpu, dev = make(), make()
    dev.model.to(DEVICE)
    return cpu, dev


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-3) -> bool:
    """``a`` ≈ ``b`` relative to the scale of ``a`` (TF32/cuDNN sums differ from the CPU's in the last bits)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return a.shape == b.shape and float((a - b).abs().max()) <= rtol * max(float(a.abs().max()), 1e-12)


@pytest.fixture(autouse=True)
def no_tf32():
    """Full fp32 matmuls on CUDA for the comparison (TF32 would differ from the CPU by ~1e-3 relative)."""
    if DEVICE != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("make", [mini_resnet_32, tiny_vit], ids=["cnn", "vit"])
def test_srd_saliency_and_relevance(make):
    from sae_cafe.srd import srd_relevance, srd_saliency

    cpu, dev = both(make)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 2])
    m_cpu = srd_saliency(cpu, x, t)
    m_dev = srd_saliency(dev, x.to(DEVICE), t.to(DEVICE))
    assert m_dev.device.type == torch.device(DEVICE).type and close(m_cpu, m_dev)
    layer = list(cpu.layers())[-1]
    r_cpu = srd_relevance(cpu, x, t, [layer])[layer]
    r_dev = srd_relevance(dev, x.to(DEVICE), t.to(DEVICE), [layer])[layer]
    assert close(r_cpu, r_dev)
    m64 = srd_saliency(dev, x.to(DEVICE), t.to(DEVICE), dtype=torch.float64)
    assert close(srd_saliency(cpu, x, t, dtype=torch.float64), m64, rtol=1e-9)


def test_extraction_and_sae_training(tmp_path):
    from sae_cafe.activations import ShardReader, extract_activations
    from sae_training.evaluate import evaluate_sae
    from sae_training.train import SAETrainConfig, train_sae

    cpu, dev = both(tiny_vit)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    a_cpu = extract_activations(cpu, x, ["blocks.1"], run="cpu", root=tmp_path, progress=False)["blocks.1"]
    a_dev = extract_activations(dev, x, ["blocks.1"], run="dev", root=tmp_path, progress=False)["blocks.1"]
    s_cpu, s_dev = ShardReader(a_cpu).load_shard(0), ShardReader(a_dev).load_shard(0)
    assert torch.equal(s_cpu["image"], s_dev["image"]) and close(s_cpu["acts"], s_dev["acts"])
    cfg = SAETrainConfig(architecture="batchtopk", expansion=4, k=4, steps=60, batch_size=64, holdout=0.2,
                         n_checkpoints=0)
    ev = {}
    for name, acts, device in (("cpu", a_cpu, "cpu"), ("dev", a_dev, DEVICE)):
        res = train_sae(acts, config=cfg, device=device, evaluate=False, progress=False)
        ev[name] = evaluate_sae(res["sae_dir"], acts=a_cpu, image_range=(51, 64))["explained_variance"]
    assert ev["cpu"] > 0.3 and abs(ev["cpu"] - ev["dev"]) < 0.02, ev


def test_streamed_training(tmp_path):
    from sae_lens import SAE

    from sae_training.stream import StreamConfig, StreamSAE, train_saes_streaming
    from sae_training.train import SAETrainConfig

    _, dev = both(tiny_vit)
    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    specs = [StreamSAE(n, SAETrainConfig(architecture="batchtopk", expansion=4, k=4)) for n in ("blocks.0", "blocks.1")]
    res = train_saes_streaming(dev, x, specs, StreamConfig(steps=10, batch_size=32, buffer_rows=128, device=DEVICE),
                               run="s", root=tmp_path, progress=False)
    for r in res["saes"].values():
        sae = SAE.load_from_disk(r["sae_dir"], device=DEVICE)
        assert torch.isfinite(sae.W_enc).all() and r["training"]["samples_per_sae"] == 320


def test_cafe_build(tmp_path):
    from sae_lens import TopKSAE, TopKSAEConfig

    from sae_cafe.cafe import build_cafe

    cpu, dev = both(mini_resnet_32)
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=cpu.layers()["layer3"].channels, d_sae=24, k=4)).eval()
    imgs = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    kw = dict(k=3, n_anchor=2, progress=False)
    c_cpu = build_cafe(cpu, sae, "layer3", imgs, out_dir=tmp_path / "cpu", **kw)
    sae_dev = TopKSAE(TopKSAEConfig(d_in=sae.cfg.d_in, d_sae=24, k=4)).eval()
    sae_dev.load_state_dict(sae.state_dict())
    c_dev = build_cafe(dev, sae_dev.to(DEVICE), "layer3", imgs, out_dir=tmp_path / "dev", **kw)
    e_cpu, e_dev = c_cpu.exemplars, c_dev.exemplars
    assert c_cpu.n_exemplars == c_dev.n_exemplars > 0
    assert close(e_cpu["ex_activation"], e_dev["ex_activation"])
    E = c_cpu.n_exemplars
    assert close(c_cpu.ierf(list(range(E))), c_dev.ierf(list(range(E))), rtol=5e-3)  # fp16 storage


def test_icat_attribution():
    from sae_cafe.icat import attribute

    cpu, dev = both(mini_resnet_32)
    saes = {"layer2": random_sae(32, 64, 1), "layer3": random_sae(48, 96, 2)}
    saes_dev = {n: random_sae(s.cfg.d_in, s.cfg.d_sae, seed).to(DEVICE)
                for (n, s), seed in zip(saes.items(), (1, 2), strict=True)}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    r_cpu = attribute(cpu, saes, x, "layer2", "layer3", steps=16, top_k_targets=3, return_result=True)
    r_dev = attribute(dev, saes_dev, x.to(DEVICE), "layer2", "layer3", steps=16, top_k_targets=3,
                      return_result=True)
    assert close(r_cpu.scores_BSJ, r_dev.scores_BSJ, rtol=2e-3)
    assert r_dev.completeness_error() <= 0.05
