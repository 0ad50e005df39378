"""Where things lie: the files of a run folder and a model folder, the embedding store's root,
and whether a name is a local path or a Hugging Face Hub id.

Every file name of those folders is spelled here and nowhere else::

    <run>/                           written by ``coembed train``
        recipe.yaml                  RECIPE
        train.log                    TRAIN_LOG
        bad_items.jsonl              BAD_ITEMS
        history.jsonl                HISTORY
        metrics.json                 METRICS
        report.md                    REPORT
        training-curve.png           TRAINING_CURVE
        umap-*.png                   FIGURE_GLOB
        zeroshot-<name>.json         zero_shot_file(name), zero_shot_figure(name)
        retrieval-<name>.json        retrieval_file(name)
        embeddings/figure_sample.safetensors      FIGURE_SAMPLE
        model/                       MODEL_DIR: a model folder

    <run>/                           written by ``coembed embed`` (the extraction stage alone)
        recipe.yaml                  RECIPE
        embed.log                    EMBED_LOG
        bad_items.jsonl              BAD_ITEMS
        extraction.json              EXTRACTION_SUMMARY

    <model>/
        config.json                  MODEL_CONFIG
        heads.safetensors            MODEL_WEIGHTS
        README.md                    MODEL_CARD
        recipe.yaml, metrics.json, umap-*.png     the training record, when saved with one
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from coembed.errors import ModelLoadError

# -- a run folder ----------------------------------------------------------------------
RECIPE = "recipe.yaml"
TRAIN_LOG = "train.log"
BAD_ITEMS = "bad_items.jsonl"
HISTORY = "history.jsonl"
METRICS = "metrics.json"
REPORT = "report.md"
TRAINING_CURVE = "training-curve.png"
#: The UMAP figures of a run; they go with the model (folder, card, Hub).
FIGURE_GLOB = "umap*.png"
FIGURE_SAMPLE = "embeddings/figure_sample.safetensors"
MODEL_DIR = "model"
EMBED_LOG = "embed.log"
EXTRACTION_SUMMARY = "extraction.json"

# -- a model folder --------------------------------------------------------------------
MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "heads.safetensors"
MODEL_CARD = "README.md"
#: The files of the training record a model folder keeps (besides the figures).
RECORD_FILES = (RECIPE, METRICS)

#: Root of the embedding store when a recipe names none (``extraction.cache_dir``).
DEFAULT_CACHE_DIR = Path(os.environ.get("COEMBED_CACHE", "~/.cache/coembed")).expanduser() / "embeddings"


def zero_shot_file(name: str) -> str:
    return f"zeroshot-{name}.json"


def zero_shot_figure(name: str) -> str:
    return f"zeroshot-{name}-confusion.png"


def retrieval_file(name: str) -> str:
    return f"retrieval-{name}.json"


#: ``zero_shot_file`` and ``retrieval_file`` of every name, for globbing a run folder.
ZERO_SHOT_GLOB = zero_shot_file("*")
RETRIEVAL_GLOB = retrieval_file("*")


def is_uri(location: str) -> bool:
    """Whether a store root is a URI (``file://...``, ``s3://...``) rather than a local folder."""
    return "://" in location


def store_root(cache_dir: str | None, base_dir: str | Path = ".") -> Path | str:
    """The embedding store root: ``cache_dir`` (a folder relative to ``base_dir``, or a URI such as
    ``file:///data/store`` or ``s3://bucket/store``, kept as it is), or :data:`DEFAULT_CACHE_DIR`."""
    if not cache_dir:
        return DEFAULT_CACHE_DIR
    if is_uri(cache_dir):
        return cache_dir
    path = Path(cache_dir).expanduser()
    return path if path.is_absolute() else Path(base_dir) / path


def source_cache_dir(cache_dir: str | None, base_dir: str | Path = ".") -> Path | None:
    """Where data sources keep their small caches (video probes): the store root when it is a local folder,
    else ``None`` (no such cache beside a store behind a URI)."""
    root = store_root(cache_dir, base_dir)
    return root if isinstance(root, Path) else None


# -- finding folders -------------------------------------------------------------------


def model_folders(path: Path) -> tuple[Path, Path]:
    """``(model folder, record folder)`` for a model folder or a run folder.

    The record folder holds the training record used for the model card: the
    run folder for a run (or a run's ``model/``), else the model folder itself.
    """
    if (path / MODEL_CONFIG).is_file():
        return path, run_folder(path) or path
    if (path / MODEL_DIR / MODEL_CONFIG).is_file():
        return path / MODEL_DIR, path
    raise ModelLoadError(f"{path} holds neither a coembed model ({MODEL_CONFIG}) nor a run's "
                         f"{MODEL_DIR}/{MODEL_CONFIG}")


def run_folder(path: str | os.PathLike[str]) -> Path | None:
    """The run folder ``path`` names (a run, or a run's ``model/``); ``None`` for anything else."""
    p = Path(path)
    if (p / MODEL_DIR / MODEL_CONFIG).is_file():
        return p
    if p.name == MODEL_DIR and (p / MODEL_CONFIG).is_file() and (p.parent / RECIPE).is_file():
        return p.parent
    return None


# -- names: a local path, or a Hub id --------------------------------------------------


def is_repo_id(text: str) -> bool:
    """Whether ``text`` has the form of a Hugging Face Hub repo id (``name`` or ``owner/name``)."""
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


#: File name endings of weights files: a value ending so names a file, whatever else it could be.
WEIGHTS_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz", ".onnx", ".h5")


def looks_like_path(text: str) -> bool:
    """Whether ``text`` is written as a path: absolute, starting with ``~``, ``./`` or ``../`` (or ``.``),
    or naming a weights file (:data:`WEIGHTS_SUFFIXES`)."""
    return os.path.isabs(text) or text.startswith(("~", ".")) or text.lower().endswith(WEIGHTS_SUFFIXES)


def weights_path(value: object, *, is_name: Callable[[str], bool] = lambda value: False,
                 hub_ids: bool = True) -> Path | None:
    """The local file or folder that a weights option's ``value`` names, or ``None`` when it names
    the weights some other way (random init, a library's tag, a Hub id).

    Decided from the value alone, never from what exists on this machine, so a
    recipe or a saved model means the same everywhere:

    * ``None``, ``""`` and what ``is_name`` accepts (an adapter's own vocabulary,
      such as open_clip's pretrained tags or VGGish's ``release``) are names;
    * a value written as a path (:func:`looks_like_path`) is a path;
    * else, with ``hub_ids``, a value of the form of a Hub repo id is a Hub id
      (``models/minilm`` is the Hub repo of that name: write ``./models/minilm``
      for a local folder), and anything else is a path; without ``hub_ids``
      (a library that takes no Hub ids) it is a path.
    """
    if not isinstance(value, str) or not value or is_name(value):
        return None
    if looks_like_path(value) or not hub_ids or not is_repo_id(value):
        return Path(value).expanduser().resolve()
    return None
