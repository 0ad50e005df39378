"""Quality: which way of fitting the heads wins where, on spaces whose true correspondence is known.

The anchor space is real: MiniLM sentence embeddings of the standard library's docstring sentences
(:mod:`corpus`; a sentence's class is its module). The second "modality" is made from it by a hidden
random non-linear map into another dimension (``tanh`` of a random projection, then another random
projection, scaled to unit variance per coordinate) plus Gaussian noise of standard deviation
``--noise``, drawn afresh for every pair: with more pairs than training sentences, a sentence returns
with new noise.

Splits (fixed by ``--seed``): about 15 % of the modules are *held-out classes*, none of their sentences
trained on; of the other modules' sentences, ``--test-items`` are *held-out items*, as many are the
validation sample every method selects its settings on (epochs, penalties, dims), the rest is the
training pool. Every method is fitted by coembed's own :class:`~coembed.training.Trainer` or
:class:`~coembed.alignment.Aligner` and scored by the same :func:`~coembed.training.evaluate` as a run:
``other->text`` R@1 and R@10 among the ``--test-items`` held-out items (chance ``1/n`` and ``10/n``),
and among as many sentences of the held-out classes. Run (defaults: a few minutes on 2 cores):

    .venv/bin/python benchmarks/quality/bench_quality.py
    .venv/bin/python benchmarks/quality/bench_quality.py --pairs 1000 10000 100000 --noise 0.5 1 2 --steps 2000
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from corpus import DEFAULT_CACHE, load_corpus

from coembed.alignment import Aligner
from coembed.config import HeadConfig, TrainConfig
from coembed.heads import IdentityHead, build_head
from coembed.training import PairSet, Trainer, ValidationSet, class_ids, evaluate

#: name -> (train.method, the other modality's head, train options)
CONFIGS: dict[str, tuple[str, dict, dict]] = {
    "ridge": ("ridge", {}, {}),
    "procrustes": ("procrustes", {}, {}),
    "cca": ("cca", {}, {}),
    "asif": ("asif", {}, {}),
    "linear infonce": ("contrastive", {"type": "linear"}, {}),
    "linear sigmoid": ("contrastive", {"type": "linear"}, {"loss": "sigmoid"}),
    "mlp infonce": ("contrastive", {"type": "mlp"}, {}),
    "mlp residual": ("contrastive", {"type": "mlp", "residual": True, "num_layers": 3}, {}),
    "mlp mixup": ("contrastive", {"type": "mlp"}, {"mixup": 1.0}),
    "mlp cosine": ("contrastive", {"type": "mlp"}, {"schedule": "cosine", "warmup_fraction": 0.05}),
    "mlp fixed temp": ("contrastive", {"type": "mlp"}, {"temperature": {"learnable": False}}),
    "mlp labels": ("contrastive", {"type": "mlp"}, {"label_positives": True}),
}


class HiddenMap:
    """The second modality: ``normalise(tanh(y A) B)`` plus noise, ``A``, ``B`` random and hidden."""

    def __init__(self, anchor_dim: int, other_dim: int, seed: int, reference: torch.Tensor) -> None:
        g = torch.Generator().manual_seed(seed + 1000)
        self.a = torch.randn(anchor_dim, 2 * other_dim, generator=g) * (2.0 / math.sqrt(anchor_dim))
        self.b = torch.randn(2 * other_dim, other_dim, generator=g) / math.sqrt(2 * other_dim)
        clean = self._clean(reference)
        self.mean, self.std = clean.mean(0), clean.std(0)

    def _clean(self, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(y @ self.a) @ self.b

    def __call__(self, y: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
        x = (self._clean(y) - self.mean) / self.std
        return x + noise * torch.randn(x.shape, generator=generator)


def split(classes: list[str], test_items: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    modules = np.array(sorted(set(classes)))
    rng.shuffle(modules)
    labels = np.array(classes)
    held, count = [], 0
    for m in modules:  # about 15 % of the sentences, whole modules
        if count >= 0.15 * len(labels):
            break
        held.append(m)
        count += int((labels == m).sum())
    unseen = np.isin(labels, held)
    seen_idx = rng.permutation(np.flatnonzero(~unseen))
    unseen_idx = rng.permutation(np.flatnonzero(unseen))
    return {"test": seen_idx[:test_items], "validation": seen_idx[test_items:2 * test_items],
            "train": seen_idx[2 * test_items:], "classes": unseen_idx[:test_items]}


def fit_and_score(name: str, vectors: torch.Tensor, train_x: torch.Tensor, train_y: torch.Tensor,
                  train_labels: torch.Tensor, val: tuple[torch.Tensor, torch.Tensor],
                  tests: dict[str, ValidationSet], args: argparse.Namespace) -> dict[str, float]:
    method, head, options = CONFIGS[name]
    pair = PairSet("other", "text", train_x, train_y, val[0], val[1], train_labels=train_labels)
    torch.manual_seed(args.seed)
    heads = nn.ModuleDict({"text": IdentityHead(),
                           "other": build_head(HeadConfig(**(head or {"type": "linear"})), train_x.shape[1],
                                               vectors.shape[1])})
    batch = min(args.batch, len(train_x))
    steps_per_epoch = math.ceil(len(train_x) / batch)
    epochs = max(1, math.ceil(args.steps / steps_per_epoch))
    config = TrainConfig(method=method, epochs=epochs, batch_size=batch, lr=args.lr, device="cpu",
                         validate_every=max(1, epochs // 15), validation_sample=None, **options)
    fitter = (Trainer(heads, [pair], config, seed=args.seed) if method == "contrastive"
              else Aligner(heads, [pair], config, "text", seed=args.seed))
    t0 = time.perf_counter()
    fitter.fit(progress=False)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds}
    for split_name, test in tests.items():
        m = evaluate(fitter.heads, [test])
        out[f"{split_name} R@1"] = m["other->text/R@1"]
        out[f"{split_name} R@10"] = m["other->text/R@10"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, nargs="+", default=[1000, 10000], help="training pairs")
    parser.add_argument("--noise", type=float, nargs="+", default=[1.0, 2.0], help="noise std (signal std is 1)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of each contrastive run")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--other-dim", type=int, default=512)
    parser.add_argument("--test-items", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    corpus = load_corpus(args.cache_dir)
    parts = split(corpus.classes, args.test_items, args.seed)
    vectors = corpus.vectors
    hidden = HiddenMap(vectors.shape[1], args.other_dim, args.seed, vectors[parts["train"]])
    ids = class_ids(corpus.classes)
    print(f"{len(vectors)} sentences of {len(set(corpus.classes))} modules; training pool {len(parts['train'])}, "
          f"validation {len(parts['validation'])}, held-out items {len(parts['test'])}, held-out-class items "
          f"{len(parts['classes'])}; chance R@1 {1 / len(parts['test']):.4f}, R@10 {10 / len(parts['test']):.4f}")
    rows = []
    header = "| pairs | noise | method | items R@1 | items R@10 | classes R@1 | classes R@10 | s |"
    print(header + "\n" + "|---" * 8 + "|", flush=True)
    for noise in args.noise:
        g = torch.Generator().manual_seed(args.seed)
        val = hidden(vectors[parts["validation"]], noise, g), vectors[parts["validation"]]
        tests = {"items": ValidationSet("other", "text", hidden(vectors[parts["test"]], noise, g), vectors[parts["test"]]),
                 "classes": ValidationSet("other", "text", hidden(vectors[parts["classes"]], noise, g),
                                          vectors[parts["classes"]])}
        for n in args.pairs:
            chosen = torch.as_tensor(parts["train"])[torch.randint(len(parts["train"]), (n,), generator=g)
                                                     if n > len(parts["train"]) else
                                                     torch.randperm(len(parts["train"]), generator=g)[:n]]
            train_y = vectors[chosen]
            train_x = hidden(train_y, noise, g)  # fresh noise for every pair, repeated sentences too
            for name in args.configs:
                r = fit_and_score(name, vectors, train_x, train_y, ids[chosen], val, tests, args)
                row = {"pairs": n, "noise": noise, "method": name, **r}
                rows.append(row)
                print(f"| {n} | {noise} | {name} | {r['items R@1']:.3f} | {r['items R@10']:.3f} | "
                      f"{r['classes R@1']:.3f} | {r['classes R@10']:.3f} | {r['seconds']:.1f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
