"""Top-k miner: equals a brute-force sort (with ties), merges exactly, saves/loads, samples uniformly."""

import torch

from sae_cafe.cafe.topk import TopKMiner, TopKState, brute_force_topk, merge_topk


def _acts(B=23, N=6, S=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.relu(torch.randn(B, N, S, generator=g))
    a = (a * 4).round() / 4  # many exact ties
    a[:, :, 0] = 0.5  # a latent that ties everywhere
    a[:, :, 1] = 0.0  # a dead latent
    return a


def _mine(acts, ids, k, batch, n_sample=0, distinct=False):
    m = TopKMiner(acts.shape[2], k, n_sample, distinct_images=distinct)
    for i in range(0, acts.shape[0], batch):
        m.update(acts[i:i + batch], ids[i:i + batch])
    return m.state


def test_topk_equals_brute_force_with_ties():
    acts = _acts()
    ids = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(1)) * 3 + 5
    for distinct in (False, True):
        v, i, p = brute_force_topk(acts, ids, 7, distinct_images=distinct)
        for batch in (1, 4, 23):
            st = _mine(acts, ids, 7, batch, distinct=distinct)
            assert torch.equal(st.values, v)
            assert torch.equal(st.image, i)
            assert torch.equal(st.pos, p)
        if distinct:
            assert all(len(set(r[r >= 0].tolist())) == (r >= 0).sum() for r in st.image)
    assert (st.image[1] == -1).all() and st.n_fire[1] == 0
    assert int(st.n_fire[0]) == acts.shape[0] * acts.shape[1]
    assert torch.allclose(st.sum_act, acts.sum((0, 1)).double())


def test_merge_is_exact_and_state_roundtrip(tmp_path):
    acts = _acts(B=30, seed=3)
    ids = torch.arange(30)
    full = _mine(acts, ids, 5, 7, n_sample=4)
    parts = [_mine(acts[idx], ids[idx], 5, 3, n_sample=4) for idx in (ids % 3 == 0, ids % 3 == 1, ids % 3 == 2)]
    merged = merge_topk(parts)
    for name, t in full.tensors().items():
        assert torch.equal(t, merged.tensors()[name]), name
    full.save(tmp_path / "s.safetensors", {"done": 30})
    back, meta = TopKState.load(tmp_path / "s.safetensors")
    assert meta == {"done": 30}
    assert all(torch.equal(t, back.tensors()[n]) for n, t in full.tensors().items())


def test_sample_is_uniform_over_firing_pfvs():
    acts = torch.rand(400, 4, 1) + 0.01  # all fire, activation increases with nothing in particular
    st = _mine(acts, torch.arange(400), 3, 50, n_sample=200)
    s = st.s_values[0]
    assert (st.s_image[0] >= 0).all() and (s > 0).all()
    # a uniform sample of U(0.01, 1.01) has mean ≈ 0.51 (the top-k alone would be ≈ 1.0)
    assert abs(float(s.mean()) - 0.51) < 0.06


def test_gather_topk_over_a_process_group(tmp_path):
    """``gather_topk`` under torch.distributed (gloo, one rank here; torchrun runs the same code on many)."""
    import torch.distributed as dist

    from sae_cafe.cafe.topk import gather_topk

    acts = _acts(B=12, seed=5)
    st = _mine(acts, torch.arange(12), 4, 5, n_sample=3)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        got = gather_topk(st)
    finally:
        dist.destroy_process_group()
    for name, t in st.tensors().items():
        assert torch.equal(t, got.tensors()[name]), name
