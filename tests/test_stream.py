"""Streamed SAE training (``sae_training.stream``): the buffer against sae-lens's ``mixing_buffer``, the provider's
checkpoint state, the export (``SAE.load_from_disk``, our layout and manifest), kill-and-resume to bitwise-equal
weights (forked kills, ``tests/stream_kill_driver.py``), equal-token agreement with shard training, the CLI and
its errors. Tiny random-weight models, seconds each (the kill driver about a minute on a loaded machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_vit

from sae_cafe.errors import SaeCafeError
from sae_training.stream import StreamConfig, StreamSAE, train_saes_streaming
from sae_training.stream_data import MixingBuffer, StreamProvider
from sae_training.train import SAETrainConfig

TINY = StreamConfig(steps=12, batch_size=32, buffer_rows=256, n_checkpoints=2, image_batch_size=8)


def images(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_mixing_buffer_serves_what_sae_lens_mixing_buffer_serves():
    """Same chunks, same seed: our checkpointable buffer yields exactly sae-lens's batches (its ``randperm``
    draws from the global generator, ours from a generator seeded alike)."""
    from sae_lens.training.mixing_buffer import mixing_buffer

    chunks = [torch.randn(int(n), 5, generator=torch.Generator().manual_seed(i))
              for i, n in enumerate(torch.randint(10, 90, (40,), generator=torch.Generator().manual_seed(9)))]
    torch.manual_seed(11)
    ref = list(mixing_buffer(200, 16, iter(chunks), 0.5))
    buf, ours = MixingBuffer(5, 200, 16, 0.5, seed=11), []
    for c in chunks:
        buf.push(c)
        while buf.ready():
            ours.append(buf.pop())
    n = len(ours)
    assert n > 20 and len(ref) >= n  # sae-lens also flushes its remainder at the end of the stream
    assert all(torch.equal(a, b) for a, b in zip(ours, ref[:n], strict=True))


def test_provider_state_round_trip_continues_the_same_batches():
    ad = tiny_vit()
    mk = lambda: StreamProvider(ad, ["blocks.0", "blocks.1"], images(20), 24, 96, image_batch_size=4, seed=5)  # noqa: E731
    a = mk()
    for _ in range(7):
        next(a)
    tensors, info = a.state()
    tail_a = [next(a) for _ in range(9)]
    b = mk()
    b.load_state({k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(info)))
    tail_b = [next(b) for _ in range(9)]
    assert all(torch.equal(x[k], y[k]) for x, y in zip(tail_a, tail_b, strict=True) for k in x)
    assert a.epoch >= 1  # 20 images × 16 PFVs are read more than once: the source wraps around
    c = mk()  # without the state: a different stream
    assert not all(torch.equal(x["blocks.0"], y["blocks.0"]) for x, y in zip(tail_a, [next(c) for _ in range(9)],
                                                                            strict=True))


def test_rows_per_image_equalise_layers_of_different_grids():
    from tiny_models import tiny_resnet

    ad = tiny_resnet()
    layers = ["layer1", "layer3"]
    grids = {n: ad.layers()[n].grid for n in layers}
    p = StreamProvider(ad, layers, images(8), 16, 32, image_batch_size=4)
    assert p.rows_per_image == min(g[0] * g[1] for g in grids.values()) < max(g[0] * g[1] for g in grids.values())
    batch = next(p)
    assert {n: batch[n].shape for n in layers} == {n: (16, ad.layers()[n].channels) for n in layers}


def test_streamed_saes_load_with_sae_lens_in_the_run_layout(tmp_path):
    from sae_lens import SAE

    from sae_cafe.artifacts import read_manifest
    from sae_cafe.saes import load_sae

    ad = tiny_vit()
    specs = [StreamSAE(layer, SAETrainConfig(architecture=a, expansion=4, k=4), None if a == "batchtopk" else a)
             for layer in ("blocks.0", "blocks.1") for a in ("batchtopk", "standard")]
    res = train_saes_streaming(ad, images(40), specs, TINY, run="s", root=tmp_path, progress=False)
    assert set(res["saes"]) == {"blocks.0", "blocks.1", "blocks.0@standard", "blocks.1@standard"}
    for name, r in res["saes"].items():
        d = Path(r["sae_dir"])
        layer, _, variant = name.partition("@")
        assert d == tmp_path / ("s" if not variant else f"s-{variant}") / "saes" / "tiny_vit" / layer
        sae = SAE.load_from_disk(str(d))
        assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.metadata.hook_name) == (32, 128, layer)
        assert sae.cfg.normalize_activations == "none"  # the scaling factor is folded into the weights
        load_sae(d, ad, layer)  # our checks: layer, d_in, model
        m = read_manifest(d)
        assert m["streamed"] and m["model_record"]["name"] == "tiny_vit"
        assert m["architecture"] == (variant or "batchtopk")
        assert r["training"]["steps"] == TINY.steps and r["training"]["samples_per_sae"] == TINY.steps * 32
    assert not list((tmp_path / "s" / "saes" / "tiny_vit").glob(".*"))  # checkpoints and temporaries removed
    again = train_saes_streaming(ad, images(40), specs, TINY, run="s", root=tmp_path, progress=False)
    assert again["training"] == {}  # finished with the same settings: nothing retrained


@pytest.mark.slow  # about 40 s alone, two minutes on a loaded machine
def test_kill_and_resume_gives_bitwise_equal_weights(tmp_path):
    out = tmp_path / "kill.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("stream_kill_driver.py")), str(out),
                           str(tmp_path / "work"), "--kills", "3", "--markers", "2"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["errors"] == [] and res["fork_hazards"] == []
    trials = res["trials"]
    assert len(trials) == 5 and all(t["killed"] == "killed" and t["resume"] == "ok" for t in trials)
    assert all(t["identical"] for t in trials), [t for t in trials if not t["identical"]]
    steps = res["config"]["steps"]
    assert any(0 < s < steps for t in trials for s in t["resumed_from"])  # resumed from a mid-training checkpoint


def test_equal_tokens_streamed_vs_shards_explained_variance(tmp_path):
    from sae_cafe.activations import extract_activations
    from sae_training.evaluate import evaluate_sae
    from sae_training.train import train_sae

    ad = tiny_vit()
    train_x, held = images(400, 1), images(60, 2)
    sae_cfg = SAETrainConfig(architecture="batchtopk", expansion=4, k=6, steps=120, batch_size=64,
                             n_checkpoints=0, holdout=0.0)
    acts = extract_activations(ad, train_x, ["blocks.1"], run="sh", root=tmp_path, progress=False)["blocks.1"]
    shard = train_sae(acts, config=sae_cfg, evaluate=False, progress=False)
    stream = train_saes_streaming(ad, train_x, [StreamSAE("blocks.1", sae_cfg)],
                                  StreamConfig(steps=120, batch_size=64, n_checkpoints=0), run="st", root=tmp_path,
                                  progress=False)
    ev_shard = evaluate_sae(shard["sae_dir"], model=ad, images=held, progress=False)["explained_variance"]
    ev_stream = evaluate_sae(stream["saes"]["blocks.1"]["sae_dir"], model=ad, images=held,
                             progress=False)["explained_variance"]
    assert shard["training"]["samples"] == stream["saes"]["blocks.1"]["training"]["samples_per_sae"] == 120 * 64
    assert ev_shard > 0.5 and ev_stream > 0.5  # both SAEs learned something
    print(f"explained variance streamed {ev_stream:.4f} shards {ev_shard:.4f}")
    assert abs(ev_stream - ev_shard) < 0.02, (ev_stream, ev_shard)


def test_cli_train_sae_stream(tmp_path, capsys):
    from PIL import Image

    from sae_cafe.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        arr = (torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(arr).save(folder / f"{i}.png")
    layers = ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    rc = main(["train-sae", "--stream", "--model", "mini_vit", "--images", str(folder), "--layers", *layers,
               "--architectures", "batchtopk", "topk", "--expansion", "2", "--tokens", "256", "--batch-size", "64",
               "--run", "c", "--root", str(tmp_path / "idx")])
    assert rc == 0
    for layer in layers:
        assert (tmp_path / "idx" / "c" / "saes" / "mini_vit" / layer / "sae_weights.safetensors").exists()
        assert (tmp_path / "idx" / "c-topk" / "saes" / "mini_vit" / layer / "cfg.json").exists()
    capsys.readouterr()
    assert main(["train-sae", "--images", str(folder), "--model", "mini_vit", "--layer", layers[0]]) == 2
    assert "--images only apply to streamed training; add --stream" in capsys.readouterr().err


def test_errors_are_clear(tmp_path):
    ad = tiny_vit()
    with pytest.raises(SaeCafeError, match="share batch_size"):
        train_saes_streaming(ad, images(8), [StreamSAE("blocks.0", SAETrainConfig(batch_size=7))], TINY,
                             root=tmp_path, progress=False)
    with pytest.raises(SaeCafeError, match="own variant"):
        train_saes_streaming(ad, images(8), ["blocks.0", "blocks.0"], TINY, root=tmp_path, progress=False)
    one_pass = (x for x in images(4))  # a one-pass stream of 4 images: 64 PFVs, far fewer than needed
    with pytest.raises(SaeCafeError, match="ended after 4 images"):
        train_saes_streaming(ad, one_pass, ["blocks.0"], TINY, root=tmp_path, progress=False)
