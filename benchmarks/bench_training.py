"""Training-loop speed: coembed's device-tensor loop against a per-item DataLoader baseline and the roofline.

Both loops train the same linear head (128 -> 512) with the same loss on the
same cached embeddings for one epoch; the baseline is the common pattern of a
``TensorDataset`` + ``DataLoader`` (per-item indexing and collation in Python).
The roofline is a bare ``torch.matmul`` of the step's dominant shape
(``[batch, 512] @ [512, batch]``, the similarity matrix) on the same device: the
trainer's achieved FLOP/s (counted from the step's matrix products: the head
forward and its weight gradient, the similarity matrix and its gradient towards
the trained side) against the matmul's. Prints both and the ratios. Run:

    .venv/bin/python benchmarks/bench_training.py [--pairs 50000] [--batch 4096] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from coembed.heads import IdentityHead, LinearHead
from coembed.losses import LearnableTemperature, info_nce
from coembed.config import TrainConfig
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
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs of each (median reported)")
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

    head = LinearHead(128, 512).to(device)
    temperature = LearnableTemperature().to(device)
    optimizer = torch.optim.Adam(list(head.parameters()) + list(temperature.parameters()), lr=1e-4)
    a_dev, i_dev = audio.to(device), image.to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(step) -> float:
        sync()
        start = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - start

    def ours_epoch() -> None:
        trainer._epoch(gen)

    def base_epoch() -> None:
        baseline_epoch(head, temperature, a_dev, i_dev, args.batch, optimizer)

    ours_epoch(), base_epoch()  # warm-up
    ours_times, base_times = [], []
    for _ in range(args.epochs):  # interleaved, so drift in machine load hits both alike
        ours_times.append(timed(ours_epoch))
        base_times.append(timed(base_epoch))
    ours, base = statistics.median(ours_times), statistics.median(base_times)

    # the roofline: the step's dominant product, bare
    b, d_in, d_out = min(args.batch, args.pairs), 128, 512
    x, y = torch.randn(b, d_out, device=device), torch.randn(d_out, b, device=device)
    torch.matmul(x, y)
    matmul_times = [timed(lambda: torch.matmul(x, y)) for _ in range(max(5, args.epochs))]
    matmul_flops = 2 * b * b * d_out / statistics.median(matmul_times)
    steps = -(-args.pairs // b)
    step_flops = 4 * b * d_in * d_out + 4 * b * b * d_out  # head fwd + weight grad; logits + their grad
    trainer_flops = steps * step_flops / ours

    print(f"device {device}, {args.pairs} pairs, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"coembed trainer      : {ours * 1000:8.1f} ms/epoch (median of {args.epochs})")
    print(f"DataLoader baseline  : {base * 1000:8.1f} ms/epoch")
    print(f"speed-up             : {base / ours:8.2f}x")
    print(f"trainer FLOP/s       : {trainer_flops / 1e9:8.1f} GFLOP/s")
    print(f"bare matmul FLOP/s   : {matmul_flops / 1e9:8.1f} GFLOP/s ([{b}, {d_out}] @ [{d_out}, {b}])")
    print(f"of the roofline      : {trainer_flops / matmul_flops:8.2f}")


if __name__ == "__main__":
    main()
