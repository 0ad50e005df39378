"""Extraction on Ray against the local engine: items/s with the same encoder on the same media, in one run.

Runs :func:`coembed.extraction.extract` over media the benchmark writes
itself (5 s WAV files or PNG images from coembed's generated source), each
time into a fresh store:

- ``local``: the local engine (DataLoader workers decoding, this process encoding);
- ``ray, N actor(s)``: the Ray engine on a local Ray, decoding in tasks and encoding in N actors.

Per engine: the seconds of a run of one batch (the fixed cost of a run: actors
started, models loaded) and the items/s of a run of all the items, end to end
(that fixed cost included). Ray itself is started once, before the timings;
each Ray extraction starts its own encoder actors.
Run (a minute or two on 2 CPUs):

    .venv/bin/python benchmarks/bench_ray.py --modality audio --items 64
    .venv/bin/python benchmarks/bench_ray.py --modality image --items 256 --actors 1 2 4 --cpus 8

Random weights: speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import ray
import torch

from coembed.config import RayConfig
from coembed.extraction import ExtractionEngine, LocalEngine, extract
from coembed.ray_extraction import RayEngine
from coembed.registry import Adapter, create_adapter
from coembed.sources.generated import generate_media
from coembed.sources.manifest import read_manifest_rows

ADAPTERS = {
    "image": ("image/clip", {"model": "ViT-B-32", "pretrained": None}),
    "audio": ("audio/vggish", {"weights": None}),
}


def rates(adapter: Adapter, ids: list[str], items: list[str], stores: Path, engine: ExtractionEngine,
          batch: int) -> tuple[float, float]:
    """(seconds of a run of one batch, items/s of a run of all ``items``), each into a fresh store.

    The one-batch run shows the fixed cost of a run (actors started, models loaded), and runs first, so that
    the worker processes Ray keeps between runs are warm for the full one, as in a long run.
    """
    seconds = []
    for n, name in ((batch, "small"), (len(items), "full")):
        start = time.perf_counter()
        _, stats = extract(adapter, ids[:n], items[:n], stores / name, batch_size=batch, shard_size=1024,
                           progress=False, engine=engine)
        seconds.append(time.perf_counter() - start)
        assert stats.encoded == n, stats
    return seconds[0], len(items) / seconds[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", choices=sorted(ADAPTERS), default="audio")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="encoder batch (both engines)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the local engine")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="encoder actor counts to run")
    parser.add_argument("--encoder-cpus", type=float, default=0.5, help="CPUs each encoder actor reserves")
    parser.add_argument("--decode-batch", type=int, default=8, help="items per decoding task")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray")
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args()

    key, options = ADAPTERS[args.modality]
    adapter = create_adapter(key, device="cpu", **options)
    adapter.model  # the local engine's model, loaded outside its timing (each Ray actor loads its own)
    t = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        manifest = generate_media(tmp_path / "media", classes=4, items_per_class=max(1, args.items // 4),
                                  image_size=args.image_size, audio_seconds=5.0)
        rows = list(read_manifest_rows(manifest))
        items = [str(tmp_path / "media" / r[args.modality]) for r in rows]
        ids = [r["id"] for r in rows]
        local = rates(adapter, ids, items, tmp_path / "local", LocalEngine(args.batch, args.workers), args.batch)
        rows_out.append((f"local, {args.workers} workers", *local))
        for n in args.actors:
            config = RayConfig(encoders=n, encoder_cpus=args.encoder_cpus, decode_batch_size=args.decode_batch)
            with RayEngine(config, args.batch) as engine:
                rows_out.append((f"ray, {n} actor(s)", *rates(adapter, ids, items, tmp_path / f"ray{n}", engine,
                                                             args.batch)))
    ray.shutdown()

    print(f"{key} on cpu, {len(items)} items, batch {args.batch}, {args.cpus} CPUs, {torch.get_num_threads()} torch "
          f"threads in this process; Ray started in {ray_start:.1f}s (not counted)")
    print(f"{'engine':22s} {'one batch':>10s} {f'{len(items)} items':>14s} {'of local':>9s}")
    for name, small, rate in rows_out:
        print(f"{name:22s} {small:9.1f}s {rate:9.2f} it/s {rate / local[1]:8.2f}x")
    ray_rows = [r for r in rows_out if r[0].startswith("ray")]
    for name, _, rate in ray_rows[1:]:
        print(f"{name} against {ray_rows[0][0]}: {rate / ray_rows[0][2]:.2f}x items/s")


if __name__ == "__main__":
    main()
