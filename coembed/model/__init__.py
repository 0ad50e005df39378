"""The trained model: a :class:`CoEmbedder`, its folder format, its Hub transfer and its model card.

============  ===================================================================
``folder``    the folder format: ``config.json`` and ``heads.safetensors``, strict reading
``hub``       finding, downloading and uploading model folders (knows no model class)
``card``      the model card (``README.md``) from the config and the training record
``embedder``  :class:`CoEmbedder`: embed, similarity, save/load/push
============  ===================================================================
"""

from coembed.errors import ModelLoadError
from coembed.model.embedder import CoEmbedder, Item, Items, UsableEmbeddings
from coembed.model.folder import FORMAT_VERSION, NAMED_MODALITIES, ModalitySpec, ModelConfig, read_config

__all__ = ["FORMAT_VERSION", "NAMED_MODALITIES", "CoEmbedder", "Item", "Items",
           "ModalitySpec", "ModelConfig", "ModelLoadError", "UsableEmbeddings", "read_config"]
