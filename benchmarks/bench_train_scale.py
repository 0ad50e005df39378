"""``coembed train`` at the paper's scale and beyond: seconds per stage, memory, and the training stage
against bare training steps of the same math, in one run.

A manifest of N synthetic records pairs two modalities served by trivial encoder plugins (512-d
"anchor", identity head; 128-d "audio", linear head: VGG-Sound's shapes), registered through a
real entry point. A first ``coembed train`` (one epoch) fills the embedding store; the measured run
is a second one, every item from the store, in a fresh process:

- seconds per stage (from its ``metrics.json``) and training pairs per second;
- ``train stage / bare steps``: the whole training stage (epochs, model selection) against a bare
  loop of the same steps (permutation, heads, symmetric InfoNCE, Adam) on tensors of the same
  shapes, timed in the same process after the run (goal: at most 1.15);
- ``peak RSS``: the process's peak resident memory less that of a bare ``import coembed`` process,
  against the bytes of the embeddings the run trains and validates on (goal: at most 1.5).

Run (the paper's size, then a million pairs with 5 % held out so the final exact retrieval stays
within minutes on a CPU):

    .venv/bin/python benchmarks/bench_train_scale.py --pairs 200000 --epochs 2
    .venv/bin/python benchmarks/bench_train_scale.py --pairs 1000000 --epochs 1 --validation 0.05
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

PLUGIN = '''
import torch
from coembed.registry import Adapter, AdapterOptions


class SyntheticOptions(AdapterOptions):
    dim: int = 128
    seed: int = 0


class SyntheticAdapter(Adapter):
    """"item-<n>" -> a vector computed from n: a fixed random projection of a few sines (no model)."""

    modality = "bench"
    name = "synthetic"
    raw_input = "text"
    Options = SyntheticOptions

    @property
    def dim(self):
        return self.options.dim

    def _load_model(self):
        g = torch.Generator().manual_seed(0)  # the same latent for every modality: pairs are related
        basis = torch.randn(16, 512, generator=g)
        project = torch.randn(512, self.options.dim, generator=torch.Generator().manual_seed(self.options.seed))
        layer = torch.nn.Linear(16, self.options.dim, bias=False)
        with torch.no_grad():
            layer.weight.copy_((basis @ project).T / 16)
        return layer

    def load(self, item):
        return int(item[5:])

    def collate(self, items):
        return torch.tensor(items, dtype=torch.float32)

    def _encode(self, batch):
        phases = torch.arange(1, 17, dtype=torch.float32) * 0.37
        latent = torch.sin(batch[:, None] * 1e-3 * phases + phases)
        return self.model(latent + 0.05 * torch.cos(batch[:, None] * phases))
'''


def _install(folder: Path) -> dict[str, str]:
    """The plugin module and a dist-info declaring its entry point; the environment that finds them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench_synthetic.py").write_text(textwrap.dedent(PLUGIN))
    info = folder / "bench_synthetic-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bench-synthetic\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[coembed.modalities]\nbench/synthetic = bench_synthetic:SyntheticAdapter\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


def _recipe(folder: Path, pairs: int, epochs: int, validation: float, batch: int) -> Path:
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "anchor", "audio"])
        writer.writerows((f"r{i}", f"item-{i}", f"item-{i}") for i in range(pairs))
    recipe = {
        "name": "scale", "anchor": "anchor", "pairs": [["anchor", "audio"]], "output_dir": str(folder / "runs"),
        "modalities": {"anchor": {"adapter": "bench/synthetic", "dim": 512, "device": "cpu",
                                  "head": {"type": "identity"}},
                       "audio": {"adapter": "bench/synthetic", "dim": 128, "seed": 1, "device": "cpu"}},
        "data": {"source": "manifest", "path": str(manifest), "group_column": None, "label_column": None,
                 "split": {"validation": validation}},
        "extraction": {"batch_size": 1024, "num_workers": 2, "cache_dir": str(folder / "store")},
        "train": {"epochs": epochs, "batch_size": batch, "lr": 1e-4, "device": "cpu"},
        "eval": {"plots": False, "report": False},
    }
    path = folder / "recipe.json"  # JSON is YAML
    path.write_text(json.dumps(recipe))
    return path


def _child(recipe: Path, run_dir: Path) -> None:
    """The measured run, then the bare loop; prints one JSON line."""
    import torch

    from coembed.losses import LearnableTemperature, info_nce
    from coembed.recipe import load_recipe
    from coembed.run import train_recipe

    parsed = load_recipe(recipe)
    result = train_recipe(parsed, run_dir=run_dir, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    metrics = result.metrics
    counts = metrics["counts"]["pairs"]["anchor-audio"]
    n_train, epochs, batch = counts["train"], parsed.train.epochs, parsed.train.batch_size

    # the bare loop of the same math on tensors of the same shapes
    anchor, audio = torch.randn(n_train, 512), torch.randn(n_train, 128)
    torch.manual_seed(0)
    head = torch.nn.Linear(128, 512)
    temperature = LearnableTemperature(0.07, True, 0.01)
    optimizer = torch.optim.Adam(list(head.parameters()) + list(temperature.parameters()), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=generator)
        for step in range(math.ceil(n_train / batch)):
            idx = perm[step * batch:(step + 1) * batch]
            loss = info_nce(anchor[idx], head(audio[idx]), temperature())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    bare = time.perf_counter() - start
    print(json.dumps({"peak_rss": peak, "seconds": metrics["seconds"], "n_train": n_train,
                      "n_val": counts["validation"], "bare_seconds": bare, "epochs": epochs,
                      "cached": {m: s["cached"] for m, s in metrics["extraction"].items()}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--validation", type=float, default=0.33)
    parser.add_argument("--child", nargs=2, metavar=("RECIPE", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(Path(args.child[0]), Path(args.child[1]))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        env = _install(folder / "plugin")
        recipe = _recipe(folder, args.pairs, args.epochs, args.validation, args.batch)
        t = time.perf_counter()
        fill = subprocess.run([sys.executable, "-m", "coembed", "train", str(recipe), "--no-progress",
                               "--set", "train.epochs=1", "--set", "data.split.validation=0",
                               "--run-dir", str(folder / "fill")],
                              env=env, capture_output=True, text=True)
        if fill.returncode:
            sys.exit(fill.stderr[-3000:])
        print(f"store filled in {time.perf_counter() - t:.0f} s (extraction and a one-epoch run without validation)")
        bare_import = subprocess.run(
            [sys.executable, "-c", "import resource, coembed; print(resource.getrusage(resource.RUSAGE_SELF)"
                                   ".ru_maxrss * 1024)"], env=env, capture_output=True, text=True, check=True)
        base = int(bare_import.stdout)
        child = subprocess.run([sys.executable, __file__, "--child", str(recipe), str(folder / "run")], env=env,
                               capture_output=True, text=True)
        if child.returncode:
            sys.exit(child.stderr[-3000:])
        out = json.loads(child.stdout.strip().splitlines()[-1])

    n_train, n_val, epochs = out["n_train"], out["n_val"], out["epochs"]
    embedding_bytes = (n_train + n_val) * (512 + 128) * 4
    seconds = out["seconds"]
    print(f"{args.pairs:,} pairs ({n_train:,} train, {n_val:,} validation), 512-d anchor + 128-d audio, "
          f"batch {args.batch}, {epochs} epoch(s), every item from the store: {out['cached']}")
    print("seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    print(f"training            {n_train * epochs / seconds['train']:,.0f} pairs/s")
    print(f"train stage / bare  {seconds['train']:.1f} s / {out['bare_seconds']:.1f} s = "
          f"{seconds['train'] / out['bare_seconds']:.3f}  (goal <= 1.15)")
    print(f"peak RSS            {out['peak_rss'] / 2**30:.2f} GiB; bare import {base / 2**30:.2f} GiB; "
          f"embeddings {embedding_bytes / 2**30:.2f} GiB")
    print(f"(peak - bare) / embeddings = {(out['peak_rss'] - base) / embedding_bytes:.3f}  (goal <= 1.5)")


if __name__ == "__main__":
    main()
