"""The pipeline's own ceiling: extraction with a trivial encoder, and store lookups, at scale.

With an encoder that costs next to nothing, what is left is coembed's own
work per item: keying items, the DataLoader round trip, collating, writing
Arrow shards, reading them back. A GPU encodes CLIP images at thousands per
second, so this ceiling must stay well above that.

- ``extract``: items/s of a first extraction (every item encoded and stored),
  against ``bare``, the trivial encoder alone on the same batches;
- ``cached``: items/s of a second extraction over the same items (all from the store);
- ``lookup``: a fresh store opened and asked for every key (the index built once).

Run:

    .venv/bin/python benchmarks/bench_pipeline.py --items 200000 --dim 512
    .venv/bin/python benchmarks/bench_pipeline.py --items 200000 --dim 128
    .venv/bin/python benchmarks/bench_pipeline.py --items 1000000 --dim 128 --lookup-only
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from coembed.extraction import extract
from coembed.registry import Adapter, AdapterOptions
from coembed.store import EmbeddingStore, item_key


class TrivialOptions(AdapterOptions):
    dim: int = 128


class TrivialAdapter(Adapter):
    """``"item-<n>"`` -> a vector computed from n in a few microseconds per item (no model to speak of)."""

    modality = "bench"
    name = "trivial"
    raw_input = "text"
    Options = TrivialOptions
    options: TrivialOptions

    @property
    def dim(self) -> int:
        return self.options.dim

    def _load_model(self) -> torch.nn.Module:
        return torch.nn.Identity()

    def load(self, item: Any) -> int:
        return int(item[5:])

    def collate(self, items: Sequence[int]) -> torch.Tensor:
        return torch.tensor(items, dtype=torch.float32)

    def _encode(self, batch: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(1, self.dim + 1, dtype=torch.float32)
        return torch.sin(batch[:, None] * steps[None, :] * 1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=None, help="default: the recipe default")
    parser.add_argument("--lookup-only", action="store_true", help="fill the store directly, time lookups only")
    args = parser.parse_args()

    adapter = TrivialAdapter(dim=args.dim, device="cpu")
    n = args.items
    items = [f"item-{i}" for i in range(n)]
    ids = [f"r{i}" for i in range(n)]
    shard = {} if args.shard_size is None else {"shard_size": args.shard_size}
    print(f"{n} items, dim {args.dim}, batch {args.batch}, {args.workers} workers, "
          f"{torch.get_num_threads()} torch threads")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        if args.lookup_only:
            store = EmbeddingStore(root, adapter.fingerprint, adapter.dim)
            t = time.perf_counter()
            keys = [item_key(i, x) for i, x in zip(ids, items)]
            keying = time.perf_counter() - t
            size = args.shard_size or 8192
            vectors = np.zeros((size, args.dim), dtype=np.float32)
            for start in range(0, n, size):
                chunk = keys[start:start + size]
                store.write_shard(chunk, ids[start:start + size], vectors[:len(chunk)], [None] * len(chunk))
            print(f"{'keying':10s} {n / keying:12,.0f} keys/s")
        else:
            batches = [adapter.collate([adapter.load(x) for x in items[i:i + args.batch]])
                       for i in range(0, n, args.batch)]
            t = time.perf_counter()
            for b in batches:
                adapter.encode(b)
            bare = n / (time.perf_counter() - t)
            t = time.perf_counter()
            _, stats = extract(adapter, ids, items, root, batch_size=args.batch, num_workers=args.workers,
                               progress=False, **shard)
            first = n / (time.perf_counter() - t)
            t = time.perf_counter()
            extract(adapter, ids, items, root, batch_size=args.batch, num_workers=args.workers, progress=False)
            cached = n / (time.perf_counter() - t)
            print(f"{'bare':10s} {bare:12,.0f} items/s")
            print(f"{'extract':10s} {first:12,.0f} items/s   {first / bare:.3f}x of bare "
                  f"({stats.encoded} encoded, {len(EmbeddingStore(root, adapter.fingerprint, adapter.dim).shards())} shards)")
            print(f"{'cached':10s} {cached:12,.0f} items/s")
            keys = [item_key(i, x) for i, x in zip(ids, items)]
        t = time.perf_counter()
        lookup = EmbeddingStore(root, adapter.fingerprint, adapter.dim).lookup(keys)
        seconds = time.perf_counter() - t
        assert bool(lookup.ok.all())
        print(f"{'lookup':10s} {n / seconds:12,.0f} keys/s   ({seconds:.2f} s for {n:,} keys, a fresh store)")


if __name__ == "__main__":
    main()
