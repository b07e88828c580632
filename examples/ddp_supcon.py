"""DistributedDataParallel + global contrast: every rank's anchors against the whole batch.

    python examples/ddp_supcon.py --world-size 2          # CPU, gloo, spawned processes

Each rank encodes its own (uneven) share of the batch; ``gather_distributed=True`` contrasts
its anchors against the embeddings of every rank. Rank r's loss is W·(1/N_global)·Σ over its
anchors, so DDP's gradient averaging gives exactly the single-process gradient of the whole
batch: the script checks that against one process computing the loss on the concatenated
batch, and prints the largest difference.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import flashcon


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def make_batch(sizes: list[int]):
    g = torch.Generator().manual_seed(1)
    n = sum(sizes)
    x = torch.randn(n, 2, 16, generator=g)  # two views per sample
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    b, v, _ = x.shape
    return nn.functional.normalize(model(x.reshape(b * v, -1)), dim=-1).view(b, v, -1)


def worker(rank: int, world: int, init_file: str, sizes: list[int], out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = nn.parallel.DistributedDataParallel(make_model())
    crit = flashcon.SupConLoss(temperature=0.1, gather_distributed=True)
    x, y = make_batch(sizes)
    start = sum(sizes[:rank])
    xs, ys = x[start : start + sizes[rank]], y[start : start + sizes[rank]]
    loss = crit(embed(model, xs), ys)
    loss.backward()  # DDP averages the parameter gradients over the ranks
    if rank == 0:
        grads = [p.grad.detach().clone() for p in model.parameters()]
        torch.save(grads, out_file)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--world-size", type=int, default=2)
    args = ap.parse_args()
    sizes = [5 + 3 * r for r in range(args.world_size)]  # uneven local batches
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "grads.pt")
        mp.spawn(
            worker,
            args=(args.world_size, os.path.join(tmp, "init"), sizes, out),
            nprocs=args.world_size,
            join=True,
        )
        ddp_grads = torch.load(out)
    model = make_model()
    x, y = make_batch(sizes)
    flashcon.SupConLoss(temperature=0.1)(embed(model, x), y).backward()
    diff = max((a - p.grad).abs().max().item() for a, p in zip(ddp_grads, model.parameters()))
    print(f"world size {args.world_size}, local batches {sizes}")
    print(f"max |DDP gradient − single-process gradient| = {diff:.3e}")
    if diff > 1e-5:
        raise SystemExit("gradients differ")


if __name__ == "__main__":
    main()
