"""Extraction speed: coembed's pipeline against the bare encoder forward pass.

For one adapter, on media that the benchmark writes itself (PNG images or WAV
files from coembed's generated source):

- ``bare forward``: items decoded beforehand, then only ``adapter.encode`` on
  ready batches: the floor for any pipeline with this model;
- ``serial``: ``extract`` with ``num_workers=0`` (decode and encode take turns);
- ``workers``: ``extract`` with DataLoader workers decoding while the model runs;
- ``cached``: a second ``extract`` over the same items (the store answers).

Prints items/second and ratios to the bare forward pass. Run:

    .venv/bin/python benchmarks/bench_extraction.py --modality image --items 96 --workers 2
    .venv/bin/python benchmarks/bench_extraction.py --modality audio --items 96 --workers 2

Random weights (``pretrained: none`` / ``weights: none``): speed does not
depend on the weights' values.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from coembed.sources.generated import generate_media
from coembed.sources.manifest import read_manifest_rows
from coembed.extraction import extract
from coembed.registry import create_adapter

ADAPTERS = {
    "image": ("image/clip", {"model": "ViT-B-32", "pretrained": None}),
    "audio": ("audio/vggish", {"weights": None}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", choices=sorted(ADAPTERS), default="image")
    parser.add_argument("--items", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args()

    key, options = ADAPTERS[args.modality]
    adapter = create_adapter(key, device=args.device, **options)
    adapter.model  # load once, outside the timings
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        per_class = max(1, args.items // 4)
        manifest = generate_media(tmp_path / "media", classes=4, items_per_class=per_class,
                                  image_size=args.image_size, audio_seconds=5.0)
        rows = list(read_manifest_rows(manifest))
        items = [str(tmp_path / "media" / r[args.modality]) for r in rows]
        ids = [r["id"] for r in rows]
        n = len(items)

        loaded = [adapter.load(x) for x in items]
        batches = [adapter.collate(loaded[i:i + args.batch]) for i in range(0, n, args.batch)]
        adapter.encode(batches[0])  # warm-up
        t = time.perf_counter()
        for b in batches:
            adapter.encode(b)
        if adapter.device.type == "cuda":
            torch.cuda.synchronize()
        bare = n / (time.perf_counter() - t)

        def timed(workers: int, store: str) -> float:
            start = time.perf_counter()
            extract(adapter, ids, items, tmp_path / store, batch_size=args.batch, num_workers=workers,
                    shard_size=1024, progress=False)
            return n / (time.perf_counter() - start)

        serial = timed(0, "store-serial")
        workers = timed(args.workers, "store-workers")
        cached = timed(args.workers, "store-workers")

    print(f"{key} on {adapter.device}, {n} items, batch {args.batch}, {torch.get_num_threads()} torch threads")
    print(f"{'bare forward':24s} {bare:9.1f} items/s   1.00x")
    print(f"{'extract, 0 workers':24s} {serial:9.1f} items/s   {serial / bare:.2f}x of bare")
    print(f"{f'extract, {args.workers} workers':24s} {workers:9.1f} items/s   {workers / bare:.2f}x of bare, "
          f"{workers / serial:.2f}x of serial")
    print(f"{'extract, cached':24s} {cached:9.1f} items/s   {cached / bare:.1f}x of bare")


if __name__ == "__main__":
    main()
