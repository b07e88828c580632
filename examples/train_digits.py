"""Train a small encoder on scikit-learn's 8×8 digits with every flashcon loss (CPU, minutes).

    python examples/train_digits.py                      # every loss, default settings
    python examples/train_digits.py --losses supcon esupcon --epochs 40 --backend torch

Each run trains an MLP encoder + projection head on two augmented views per image, then
reports the linear-probe test accuracy of the encoder's features (a logistic regression on
the frozen 128-d features), ESupCon's own prototype-classifier accuracy, time per epoch and the
backend that ran. Cross-entropy training of the same encoder is the baseline. The data ship
with scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

import flashcon

LOSSES = ("ce", "supcon", "sincere", "genscl", "tcl", "ntxent", "esupcon")
N_CLASSES = 10


def load_data(seed: int = 0):
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = train_test_split(
        np.arange(len(y)), test_size=0.25, stratify=d.target, random_state=seed
    )
    return x[tr], y[tr], x[te], y[te]


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random view: shift by up to one pixel, drop 10% of pixels, add a little noise."""
    img = x.view(-1, 8, 8)
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    img = torch.roll(img, shifts=(dy, dx), dims=(1, 2))
    keep = (torch.rand(img.shape, generator=g) > 0.1).float()
    img = img * keep + 0.05 * torch.randn(img.shape, generator=g)
    return img.reshape(-1, 64)


class Net(nn.Module):
    def __init__(self, proj_dim: int = 64) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
        self.head = nn.Linear(128, proj_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.encoder(x)), dim=-1)


def mixup_labels(y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """GenSCL's mixup for one view-batch: one λ ~ Beta(1, 1) and one permutation π.

    Returns (π, soft labels λ·onehot(y) + (1−λ)·onehot(y_π) of shape [B, K], λ)."""
    lam = float(torch.distributions.Beta(1.0, 1.0).sample())
    perm = torch.randperm(len(y), generator=g)
    onehot = F.one_hot(y, N_CLASSES).float()
    return perm, lam * onehot + (1 - lam) * onehot[perm], lam


def train(
    loss: str,
    *,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 2e-3,
    backend: str = "auto",
    seed: int = 0,
    data=None,
    log_every_step: bool = False,
) -> dict:
    """Train one loss; returns accuracies, time per epoch, backend and the per-step losses."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    xtr, ytr, xte, yte = data if data is not None else load_data()
    net = Net()
    head_ce = nn.Linear(128, N_CLASSES)
    groups = [{"params": list(net.parameters()) + list(head_ce.parameters())}]
    crit_es = None
    if loss == "esupcon":
        crit_es = flashcon.ESupConLoss(N_CLASSES, 64, temperature=0.1, backend=backend)
        # The prototypes are normalised inside the loss: a larger step turns them faster
        # towards their classes (at lr 2e-3 they rotate by only ~0.002 rad a step).
        groups.append({"params": list(crit_es.parameters()), "lr": 20 * lr})
    opt = torch.optim.Adam(groups, lr=lr)
    steps = []
    t0 = time.perf_counter()
    n = len(ytr)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for s in range(0, n - batch_size // 2, batch_size):
            idx = order[s : s + batch_size]
            xb, yb = xtr[idx], ytr[idx]
            v1, v2 = augment(xb, g), augment(xb, g)
            if loss == "ce":
                out = F.cross_entropy(head_ce(net.features(v1)), yb)
            elif loss == "genscl":
                # Mix each view independently (GenSCL mixes view-batches); soft labels per view.
                p1, s1, l1 = mixup_labels(yb, g)
                p2, s2, l2 = mixup_labels(yb, g)
                v1 = l1 * v1 + (1 - l1) * v1[p1]
                v2 = l2 * v2 + (1 - l2) * v2[p2]
                z = torch.stack([net(v1), net(v2)], dim=1)
                out = flashcon.genscl_loss(
                    z,
                    torch.stack([s1, s2], dim=1),
                    temperature=0.1,
                    base_temperature=0.1,
                    backend=backend,
                )
            else:
                z = torch.stack([net(v1), net(v2)], dim=1)
                if loss == "supcon":
                    out = flashcon.supcon_loss(
                        z, yb, temperature=0.1, base_temperature=0.1, backend=backend
                    )
                elif loss == "sincere":
                    out = flashcon.sincere_loss(z, yb, temperature=0.1, backend=backend)
                elif loss == "tcl":
                    out = flashcon.tcl_loss(z, yb, temperature=0.1, backend=backend)
                elif loss == "ntxent":
                    out = flashcon.ntxent_loss(z, temperature=0.5, backend=backend)
                elif loss == "esupcon":
                    out = crit_es(z, yb)
                else:
                    raise ValueError(f"unknown loss {loss!r}; choose from {LOSSES}")
            opt.zero_grad(set_to_none=True)
            out.backward()
            opt.step()
            steps.append(out.detach().item())
    per_epoch = (time.perf_counter() - t0) / max(epochs, 1)

    net.eval()
    with torch.no_grad():
        ftr, fte = net.features(xtr).numpy(), net.features(xte).numpy()
        scale = StandardScaler().fit(ftr)
        probe = LogisticRegression(max_iter=1000).fit(scale.transform(ftr), ytr.numpy())
        probe_acc = float(probe.score(scale.transform(fte), yte.numpy()))
        proto_acc = math.nan
        if crit_es is not None:
            proto_acc = float((crit_es.predict(net(xte)) == yte).float().mean())
    ran = "torch (cross-entropy)" if loss == "ce" else flashcon.resolve_backend(backend, xtr.device)
    return {
        "loss": loss,
        "probe_acc": probe_acc,
        "proto_acc": proto_acc,
        "sec_per_epoch": per_epoch,
        "backend": ran,
        "steps": steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--backend", default="auto", choices=flashcon.engine.BACKENDS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data = load_data(args.seed)
    rows = []
    for i, loss in enumerate(args.losses, 1):
        print(f"[{i}/{len(args.losses)}] training {loss} for {args.epochs} epochs ...", flush=True)
        r = train(
            loss,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            backend=args.backend,
            seed=args.seed,
            data=data,
        )
        rows.append(r)
        print(
            f"    probe accuracy {r['probe_acc']:.3f}, final loss {r['steps'][-1]:.4f}", flush=True
        )
    print()
    print("| loss | linear-probe test acc. | prototype-classifier acc. | s / epoch | backend |")
    print("|---|---|---|---|---|")
    for r in rows:
        proto = "—" if math.isnan(r["proto_acc"]) else f"{r['proto_acc']:.3f}"
        print(
            f"| {r['loss']} | {r['probe_acc']:.3f} | {proto} | {r['sec_per_epoch']:.3f} | "
            f"{r['backend']} |"
        )


if __name__ == "__main__":
    main()
