"""Training-loop speed: coembed's device-tensor loop against a per-item DataLoader baseline.

Both train the same linear head with the same loss on the same cached
embeddings for one epoch; the baseline is the common pattern of a
``TensorDataset`` + ``DataLoader`` (per-item indexing and collation in Python).
Prints epochs/second for both and the ratio. Run:

    .venv/bin/python benchmarks/bench_training.py [--pairs 50000] [--batch 4096] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from coembed.heads import IdentityHead, LinearHead
from coembed.losses import LearnableTemperature, info_nce
from coembed.recipe import TrainConfig
from coembed.training import PairSet, Trainer


def baseline_epoch(head: torch.nn.Module, temperature: LearnableTemperature, audio: torch.Tensor,
                   image: torch.Tensor, batch: int, optimizer: torch.optim.Optimizer) -> None:
    loader = DataLoader(TensorDataset(audio, image), batch_size=batch, shuffle=True)
    for a, i in loader:
        a, i = a.to(audio.device), i.to(audio.device)
        loss = info_nce(head(a), i, temperature())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(args.pairs, 512, generator=g)
    audio = torch.randn(args.pairs, 128, generator=g)

    heads = torch.nn.ModuleDict({"image": IdentityHead(), "audio": LinearHead(128, 512)})
    pairs = [PairSet("image", "audio", image, audio, image[:2], audio[:2])]
    trainer = Trainer(heads, pairs, TrainConfig(epochs=1, batch_size=args.batch, device=args.device))
    gen = torch.Generator().manual_seed(0)
    trainer._epoch(gen)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.epochs):
        trainer._epoch(gen)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ours = (time.perf_counter() - t) / args.epochs

    head = LinearHead(128, 512).to(device)
    temperature = LearnableTemperature().to(device)
    optimizer = torch.optim.Adam(list(head.parameters()) + list(temperature.parameters()), lr=1e-4)
    a_dev, i_dev = audio.to(device), image.to(device)
    baseline_epoch(head, temperature, a_dev, i_dev, args.batch, optimizer)  # warm-up
    t = time.perf_counter()
    for _ in range(args.epochs):
        baseline_epoch(head, temperature, a_dev, i_dev, args.batch, optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize()
    base = (time.perf_counter() - t) / args.epochs

    print(f"device {device}, {args.pairs} pairs, batch {args.batch}")
    print(f"coembed trainer      : {ours * 1000:8.1f} ms/epoch")
    print(f"DataLoader baseline  : {base * 1000:8.1f} ms/epoch")
    print(f"speed-up             : {base / ours:8.2f}x")


if __name__ == "__main__":
    main()
