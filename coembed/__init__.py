"""coembed: co-embed modalities with frozen encoders and small projection heads.

The public surface::

    from coembed import CoEmbedder            # a trained model: embed, similarity, save/load/push
    from coembed import ModelLoadError        # why a model folder or Hub repo was refused
    from coembed import load_recipe, train_recipe
    from coembed import Adapter, AdapterOptions, BadItem, available_adapters, create_adapter

Every exception coembed raises is a :class:`CoembedError` (:mod:`coembed.errors`).
The modules form layers, each importing only those below it; ``docs/design.md``
shows them.
"""

from __future__ import annotations

from coembed.config import Recipe
from coembed.errors import (AdapterError, BadItem, CoembedError, ModelLoadError, RecipeError,
                            WeightsUnavailable)
from coembed.model import CoEmbedder, UsableEmbeddings
from coembed.recipe import load_recipe
from coembed.registry import Adapter, AdapterOptions, available_adapters, create_adapter
from coembed.run import train_recipe
from coembed.version import __version__

__all__ = [
    "Adapter",
    "AdapterError",
    "AdapterOptions",
    "BadItem",
    "CoEmbedder",
    "CoembedError",
    "ModelLoadError",
    "Recipe",
    "RecipeError",
    "UsableEmbeddings",
    "WeightsUnavailable",
    "__version__",
    "available_adapters",
    "create_adapter",
    "load_recipe",
    "train_recipe",
]
