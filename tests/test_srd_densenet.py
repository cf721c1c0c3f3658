"""SRD on torchvision DenseNet (channel concatenation, pre-activation BN → ReLU → conv, transitions, functional
last ReLU) on reduced-depth instances; the rules against an explicit float64 per-path reference."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from srd_path_reference import RefBranch, _branch_paths, cafe_and_icat, check_family, randomize
from torch import nn
from torchvision.models import DenseNet

from sae_cafe.models import get_adapter, load_model, srd_densenet
from sae_cafe.srd import apop_forward, srd_ierf, srd_saliency

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_densenet(seed: int = 0) -> nn.Module:
    """Two dense blocks (2 and 3 layers, growth 4) around one transition; biases, BN affines and statistics
    re-randomised."""
    torch.manual_seed(seed)
    return randomize(DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2, num_classes=5),
                     seed)


def images(n: int = 2, size: int = 32, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----- explicit per-path reference --------------------------------------------------------------------------------
class GroupBranch:
    """Channels [lo, hi) of the concatenation read by ``bn``: contribution at q = (BN of the concatenation with
    every other group zeroed), kept on the group's own channels."""

    def __init__(self, source: str, bn: nn.BatchNorm2d, lo: int, hi: int):
        self.source, self.bn, self.lo, self.hi = source, bn, lo, hi

    def paths(self, v: torch.Tensor) -> dict:
        C = self.bn.num_features
        full = torch.zeros(1, C, *v.shape[1:], dtype=F64)
        full[0, self.lo:self.hi] = v
        bn = self.bn
        y = F.batch_norm(full, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)[0]
        mask = torch.zeros(C, dtype=F64)
        mask[self.lo:self.hi] = 1.0
        return {(i, j): [((i, j), y[:, i, j] * mask)] for i in range(v.shape[1]) for j in range(v.shape[2])}


def densenet_recipe(model: nn.Module) -> list[tuple[str, list, object]]:
    """(node, branches, post) in forward order, read off the model's own modules."""
    f = model.features
    nodes = [("relu0", [RefBranch("input", f.conv0, f.norm0)], torch.relu),
             ("pool0", [RefBranch("relu0", pre=f.pool0)], None)]
    groups = [("pool0", f.conv0.out_channels)]

    def split(bn):
        out, lo = [], 0
        for src, c in groups:
            out.append(GroupBranch(src, bn, lo, lo + c))
            lo += c
        return out
    for name, m in f.named_children():
        if name.startswith("denseblock"):
            for ln, layer in m.items():
                p = f"{name}.{ln}"
                nodes += [(f"{p}.n1", split(layer.norm1), torch.relu),
                          (f"{p}.n2", [RefBranch(f"{p}.n1", layer.conv1, layer.norm2)], torch.relu),
                          (p, [RefBranch(f"{p}.n2", layer.conv2)], None)]
                groups.append((p, layer.conv2.out_channels))
        elif name.startswith("transition"):
            nodes += [(f"{name}.n", split(m.norm), torch.relu), (f"{name}.c", [RefBranch(f"{name}.n", m.conv)], None),
                      (name, [RefBranch(f"{name}.c", pre=m.pool)], None)]
            groups = [(name, m.conv.out_channels)]
        elif name == "norm5":
            nodes.append(("norm5", split(m), torch.relu))
    return nodes


def reference_saliency(model: nn.Module, x: torch.Tensor, target: int, ierf: tuple | None = None) -> torch.Tensor:
    """SRD saliency (H, W) of one image (contrast 'none') — or the iERF of ``ierf=(node, (row, col))`` — by
    explicit loops over target positions and contribution paths, float64."""
    model = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        logit = model(x.double()[None])[0, target]
        post, pre, records = {"input": x.double()}, {}, []
        for name, branches, act in densenet_recipe(model):
            per = []
            for br in branches:
                paths = (br.paths(post[br.source]) if isinstance(br, GroupBranch)
                         else _branch_paths(br, post[br.source])[0])
                per.append((br.source, paths))
            shape = next(iter(per[0][1].values()))[0][1].shape[0], *(max(k[d] for k in per[0][1]) + 1 for d in (0, 1))
            z = torch.zeros(shape, dtype=F64)
            for _, paths in per:
                for (i, j), ps in paths.items():
                    z[:, i, j] += sum(c for _, c in ps)
            pre[name], post[name] = z, act(z) if act is not None else z
            records.append((name, per))
        assert torch.allclose(post["norm5"], F.relu(model.features(x.double()[None]))[0], atol=1e-10)
        v = post["norm5"]
        fc = model.classifier
        r = (torch.einsum("c,chw->hw", fc.weight[target], v) + fc.bias[target]) / (v.shape[1] * v.shape[2])
        assert torch.allclose(r.sum(), logit, atol=1e-10)
        if ierf is not None:
            node, (pi, pj) = ierf
            records = records[:[n for n, _ in records].index(node) + 1]
            r = torch.zeros(pre[node].shape[1:], dtype=F64)
            r[pi, pj] = 1.0
        rel = {records[-1][0]: r}
        for name, per in reversed(records):
            r, z = rel.pop(name), pre[name]
            for source, paths in per:
                acc = rel.setdefault(source, torch.zeros(post[source].shape[1:], dtype=F64))
                for (i, j), ps in paths.items():
                    zz = z[:, i, j] @ z[:, i, j]
                    for p, c in ps:
                        if zz > 0:
                            acc[p] += (c @ z[:, i, j]) / zz * r[i, j]
        return rel["input"]


def reference_error(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        target = model(x).argmax(1)
    err = 0.0
    for n in range(x.shape[0]):
        ref = reference_saliency(model, x[n], int(target[n]))
        ours = srd_saliency(model, x[n:n + 1], target[n:n + 1], contrast="none", dtype=F64)[0]
        err = max(err, float((ours - ref).abs().max()) / max(1.0, float(ref.abs().max())))
        ref = reference_saliency(model, x[n], 0, ierf=("denseblock2.denselayer1", (1, 2)))
        ours = srd_ierf(model, x[n:n + 1], "features.denseblock2.denselayer1", (1, 2), dtype=F64)[0]
        err = max(err, float((ours - ref).abs().max()))
    return err


# ----- tests ------------------------------------------------------------------------------------------------------
def test_densenet_matches_explicit_reference():
    assert reference_error(tiny_densenet(), images(1)) < 1e-10


GROUP_BRANCHES = srd_densenet.group_branches


def _shift_to_first_group(groups, bn, name, dtype):
    """A wrong concatenation rule: every group's BN shift counted in the first group's share (Σμ still 1)."""
    branches = GROUP_BRANCHES(groups, bn, name, dtype)
    if len(branches) > 1:
        first = branches[0]
        rest = torch.cat([torch.zeros_like(first.t.flatten())] + [br.t.flatten() for br in branches[1:]])
        own = first.path_mu  # ‖z_g‖²/‖z‖² contains each group's own shift: take it out of the other groups
        for br in branches[1:]:
            br.path_mu = (lambda v, z, out, rec, br=br, f=br.path_mu:
                          f(v, z, out, rec) - ((br.t * z[:, br.lo:br.hi]).sum(1) / (z * z).sum(1)).unsqueeze(1))

        def path_mu(v, z, out, rec):
            return own(v, z, out, rec) + ((rest.view(1, -1, 1, 1) * z).sum(1) / (z * z).sum(1)).unsqueeze(1)
        first.path_mu = path_mu
    return branches


def test_densenet_reference_check_fails_on_a_broken_concat_rule(monkeypatch):
    monkeypatch.setattr(srd_densenet, "group_branches", _shift_to_first_group)
    assert reference_error(tiny_densenet(), images(1)) > 1e-4


def test_densenet_conservation_adapter_apop(tmp_path):
    model = tiny_densenet(1)
    errs = check_family(model, images(3, seed=4), "features.transition1")
    assert errs[F64][0] < 1e-12
    ad = get_adapter(model)
    assert type(ad).__name__ == "DenseNetAdapter"
    assert ad._pfv_layer_names() == ["features.relu0", "features.pool0", "features.denseblock1.denselayer1",
                                     "features.denseblock1.denselayer2", "features.transition1",
                                     "features.denseblock2.denselayer1", "features.denseblock2.denselayer2",
                                     "features.denseblock2.denselayer3"]
    x = images(2, seed=5)
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(apop_forward(model, x, x), ref, atol=1e-4, rtol=1e-4)
    cafe_and_icat(model, "features.transition1", "features.denseblock2.denselayer3", tmp_path / "cafe")


def test_densenet121_full_size_layers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = load_model("densenet121")
    info = ad.layers()
    assert len(info) == 2 + 6 + 12 + 24 + 16 + 3
    assert info["features.relu0"].stride == 2 and info["features.relu0"].rf_size == 7
    assert info["features.pool0"].grid == (56, 56) and info["features.pool0"].rf_size == 11
    first = info["features.denseblock1.denselayer1"]
    assert first.channels == 32 and first.rf_size == 19
    assert info["features.transition3"].grid == (7, 7) and info["features.transition3"].channels == 512
    assert info["features.denseblock4.denselayer16"].stride == 32
