"""coembed's built-in modality adapters, installed as the ``coembed_modalities`` package.

They register through the ``coembed.modalities`` entry-point group like any
third-party plugin:

* ``image/clip`` and ``text/clip`` (:mod:`coembed_modalities.clip`): open_clip CLIP towers, the anchor space;
* ``audio/vggish`` (:mod:`coembed_modalities.vggish`): VGGish via torchvggish;
* ``text/sentence-transformers`` (:mod:`coembed_modalities.sentence_transformers`).
"""
