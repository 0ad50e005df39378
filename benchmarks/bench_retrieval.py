"""Exact retrieval at scale: one direction of paired retrieval over an N x N gallery, its time and memory.

``rank_gallery`` computes exact ranks (the pessimistic tie rule included) in
blocks of ``chunk x chunk`` similarities, so its memory does not grow with the
square of the gallery. The baseline is the same similarities computed bare, in
the same blocks (``q[block] @ g.T`` per block of queries, nothing kept): the
floor for any exact method. Peak memory is the growth of the process's
resident set (CPU) or the CUDA allocator's peak (GPU) beyond the two inputs.

Run:

    .venv/bin/python benchmarks/bench_retrieval.py --n 100000
    .venv/bin/python benchmarks/bench_retrieval.py --n 100000 --device cuda --chunk 8192
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

from coembed.metrics import chunk_slices, rank_gallery, ranking_metrics


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(args.n, args.dim, generator=g), dim=-1)
    b = F.normalize(a + 0.8 * torch.randn(args.n, args.dim, generator=g) / args.dim ** 0.5, dim=-1)
    a, b = a.to(device), b.to(device)
    labels = torch.arange(args.n, device=device)
    input_bytes = 2 * args.n * args.dim * 4

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def bare() -> None:
        for sl in chunk_slices(args.n, args.chunk):
            (a[sl] @ b.T).max()

    sync()
    t = time.perf_counter()
    bare()
    sync()
    bare_s = time.perf_counter() - t

    before = _rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    t = time.perf_counter()
    ranking = rank_gallery(a, b, labels, labels, args.chunk, normalized=True)
    sync()
    rank_s = time.perf_counter() - t
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - input_bytes
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    metrics = ranking_metrics(ranking)
    print(f"{args.n:,} x {args.n:,} gallery, {args.dim}-d, chunk {args.chunk}, on {device} "
          f"({torch.get_num_threads()} threads)")
    print(f"bare similarities  {bare_s:8.1f} s")
    print(f"exact ranking      {rank_s:8.1f} s   {rank_s / bare_s:.2f}x of bare   "
          f"R@1 {metrics['R@1']:.3f}, R@10 {metrics['R@10']:.3f} (chance {metrics['chance/R@10']:.5f})")
    print(f"memory beyond the inputs ({input_bytes / 2**20:.0f} MiB): {max(peak, 0) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
