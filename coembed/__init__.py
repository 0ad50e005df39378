"""coembed: co-embed modalities with frozen encoders and small projection heads.

The public surface::

    from coembed import CoEmbedder            # a trained model: embed, similarity, save/load/push
    from coembed import ModelLoadError        # why a model folder or Hub repo was refused
    from coembed import load_recipe, train_recipe
    from coembed import Adapter, AdapterOptions, BadItem, available_adapters, create_adapter
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("coembed")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

from coembed.model import CoEmbedder, ModelLoadError
from coembed.recipe import Recipe, RecipeError, load_recipe
from coembed.registry import (
    Adapter,
    AdapterError,
    AdapterOptions,
    BadItem,
    WeightsUnavailable,
    available_adapters,
    create_adapter,
)


def train_recipe(*args, **kwargs):  # noqa: D103 - documented in coembed.run
    from coembed.run import train_recipe as _train

    return _train(*args, **kwargs)


train_recipe.__doc__ = "Run a recipe end to end; see :func:`coembed.run.train_recipe`."

__all__ = [
    "Adapter",
    "AdapterError",
    "AdapterOptions",
    "BadItem",
    "CoEmbedder",
    "ModelLoadError",
    "Recipe",
    "RecipeError",
    "WeightsUnavailable",
    "__version__",
    "available_adapters",
    "create_adapter",
    "load_recipe",
    "train_recipe",
]
