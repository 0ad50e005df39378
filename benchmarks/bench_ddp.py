"""Training step time on several processes: 2 gloo processes against one process with the same global batch.

Every run trains the same linear head (128 -> 512, the paper's audio head) with the same symmetric InfoNCE on
the same cached vectors for a few epochs; the two-process run holds half the pairs on each process, gathers
each global batch across them (``coembed.distributed``) and sums the gradients. One process runs with as many
torch threads as the two processes have together (the same cores), and with one thread (one process's share).
Prints ms per step, median of the timed epochs, and the ratios. Run:

    .venv/bin/python benchmarks/bench_ddp.py [--pairs 16384] [--batch 4096] [--epochs 3] [--threads 1]

``--threads`` is per process. On GPUs run the same loop under ``torchrun`` through ``coembed train``
(docs/scale.md); this script measures the CPU/gloo case.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from coembed.config import TrainConfig
from coembed.distributed import SINGLE, World, join, leave
from coembed.heads import IdentityHead, LinearHead
from coembed.training import PairSet, Trainer


def _pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 512, generator=g), torch.randn(n, 128, generator=g)


def step_seconds(world: World, args: argparse.Namespace) -> float:
    """Median seconds per training step over the timed epochs (after one warm-up epoch)."""
    image, audio = _pairs(args.pairs)
    held = torch.from_numpy(world.shard(args.pairs))
    pairs = [PairSet("image", "audio", image[held], audio[held], train_total=args.pairs if world.distributed else None)]
    torch.manual_seed(0)
    heads = torch.nn.ModuleDict({"image": IdentityHead(), "audio": LinearHead(128, 512)})
    config = TrainConfig(epochs=args.epochs + 1, batch_size=args.batch, device="cpu", validation_sample=None)
    history = Trainer(heads, pairs, config, world=world).fit(progress=False).history
    steps = -(-args.pairs // args.batch)
    return statistics.median(row["seconds"] for row in history[1:]) / steps


def _rank(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    world = join("cpu")
    try:
        seconds = step_seconds(world, args)
        if world.is_main:
            Path(out).write_text(json.dumps(seconds))
    finally:
        leave(world)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16_384)
    parser.add_argument("--batch", type=int, default=4096, help="the global batch (train.batch_size)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs of each (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/seconds.json"
        mp.spawn(_rank, args=(port, args, out), nprocs=2, join=True)
        two = json.loads(Path(out).read_text())
    torch.set_num_threads(2 * args.threads)
    one_same_cores = step_seconds(SINGLE, args)
    torch.set_num_threads(args.threads)
    one_thread = step_seconds(SINGLE, args)

    print(f"{args.pairs} pairs, global batch {args.batch}, linear head 128 -> 512, {args.threads} thread(s) per process")
    print(f"2 gloo processes       : {two * 1000:8.1f} ms/step (each holds and computes half the batch)")
    print(f"1 process, {2 * args.threads} thread(s)  : {one_same_cores * 1000:8.1f} ms/step (the same cores)")
    print(f"1 process, {args.threads} thread(s)  : {one_thread * 1000:8.1f} ms/step (one process's cores)")
    print(f"2 processes / 1 process on the same cores : {two / one_same_cores:6.2f}x the step time")
    print(f"2 processes / 1 process on one's cores    : {two / one_thread:6.2f}x the step time")


if __name__ == "__main__":
    main()
