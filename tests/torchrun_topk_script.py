"""Run under torchrun (gloo): mine top-k over a strided share of images and merge exactly (test helper)."""

import os
import sys

import torch
import torch.distributed as dist

from sae_cafe.cafe import TopKMiner, gather_topk

out = sys.argv[1]
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
if world > 1:
    dist.init_process_group("gloo")
g = torch.Generator().manual_seed(0)
acts = torch.relu(torch.randn(40, 16, 24, generator=g)).round(decimals=1)  # (images, positions, latents): ties
mine = list(range(rank, acts.shape[0], world))
miner = TopKMiner(24, k=5, n_sample=6, distinct_images=False)
for a in range(0, len(mine), 7):
    ids = torch.tensor(mine[a:a + 7])
    miner.update(acts[ids], ids)
state = gather_topk(miner.state) if world > 1 else miner.state
if rank == 0:
    torch.save({"values": state.values, "image": state.image, "pos": state.pos}, out)
if world > 1:
    dist.destroy_process_group()
