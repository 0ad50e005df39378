import numpy as np
import pytest
import torch

from coembed.extraction import extract
from coembed.registry import create_adapter
from coembed.store import EmbeddingStore, item_key
from plugins import TOY_ADAPTER_SOURCE, install_plugin


@pytest.fixture
def toy(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "toy-plugin", {"toy/vector": "toy_adapter:ToyVectorAdapter"},
                   {"toy_adapter": TOY_ADAPTER_SOURCE})
    return create_adapter("toy/vector", device="cpu")


def _items(tmp_path, n=10):
    paths = []
    for i in range(n):
        p = tmp_path / f"v{i}.npy"
        np.save(p, np.array([i, 1.0, -i, 0.5], dtype=np.float32))
        paths.append(str(p))
    return paths


@pytest.mark.parametrize("workers", [0, 2])
def test_extraction_matches_direct_encoding_and_reports_bad_items(tmp_path, toy, workers):
    paths = _items(tmp_path)
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    np.save(tmp_path / "wrong.npy", np.zeros(3, dtype=np.float32))
    ids = [f"id{i}" for i in range(10)] + ["broken", "wrong", "missing"]
    items = paths + [str(tmp_path / "broken.npy"), str(tmp_path / "wrong.npy"), str(tmp_path / "nope.npy")]
    lookup, stats = extract(toy, ids, items, tmp_path / "store", batch_size=3, num_workers=workers,
                            shard_size=4, progress=False)
    assert lookup.ok.tolist() == [True] * 10 + [False] * 3
    direct = toy.encode(torch.stack([torch.from_numpy(np.load(p)) for p in paths])).numpy()
    np.testing.assert_allclose(lookup.vectors[:10], direct, rtol=1e-5, atol=1e-6)
    assert "not a vector file" in lookup.errors[10] and "expected 4 values" in lookup.errors[11]
    assert "not a vector file" in lookup.errors[12]
    # encoded: the items the encoder ran on; the 3 that failed to load are bad, not encoded
    assert stats.encoded == 10 and stats.cached == 0 and stats.bad == 3
    assert len(EmbeddingStore(tmp_path / "store", toy.fingerprint, toy.dim).shards()) == 4  # ceil(13 / 4)


def test_second_run_reads_the_store_and_calls_no_encoder(tmp_path, toy, monkeypatch):
    paths = _items(tmp_path)
    ids = [f"id{i}" for i in range(10)]
    first, _ = extract(toy, ids, paths, tmp_path / "store", progress=False)

    def boom(batch):
        raise AssertionError("the encoder was called")

    monkeypatch.setattr(toy, "_encode", boom)
    again, stats = extract(toy, ids, paths, tmp_path / "store", progress=False)
    assert stats.encoded == 0 and stats.cached == 10
    np.testing.assert_array_equal(first.vectors, again.vectors)


def test_changed_file_or_encoder_is_encoded_again(tmp_path, toy):
    paths = _items(tmp_path, 3)
    ids = ["a", "b", "c"]
    extract(toy, ids, paths, tmp_path / "store", progress=False)
    np.save(paths[1], np.array([9, 9, 9, 9], dtype=np.float32))
    _, stats = extract(toy, ids, paths, tmp_path / "store", progress=False)
    assert stats.encoded == 1 and stats.cached == 2
    other = create_adapter("toy/vector", seed=5)
    _, stats = extract(other, ids, paths, tmp_path / "store", progress=False)
    assert stats.encoded == 3
    assert item_key("a", paths[0]) != item_key("b", paths[0])


def test_non_finite_embeddings_are_bad_items(tmp_path, toy, monkeypatch):
    paths = _items(tmp_path, 4)
    original = toy._encode

    def nan_for_second(batch):
        out = original(batch)
        out[1] = float("nan")
        return out

    monkeypatch.setattr(toy, "_encode", nan_for_second)
    lookup, stats = extract(toy, list("abcd"), paths, tmp_path / "store", batch_size=4, progress=False)
    assert lookup.ok.tolist() == [True, False, True, True]
    assert "NaN" in lookup.errors[1] and stats.bad == 1


@pytest.mark.parametrize("short_audio", ["pad", "repeat"])
def test_padded_or_repeated_clips_are_counted_and_listed_as_flagged(tmp_path, tmp_wav, short_audio):
    import soundfile as sf

    tiny = tmp_path / "tiny.wav"
    sf.write(tiny, np.full(40, 0.2, np.float32), 8000)  # 5 ms: no usable sound
    items = [str(tmp_wav(seconds=1.2)), str(tmp_wav(seconds=0.4, seed=1)), str(tiny)]
    ids = ["long", "short", "tiny"]
    vggish = create_adapter("audio/vggish", weights="none", device="cpu", short_audio=short_audio)
    lookup, stats = extract(vggish, ids, items, tmp_path / "store", progress=False)
    assert lookup.ok.tolist() == [True, True, False]
    assert stats.flagged == 1 and stats.flagged_reasons == {"short audio": 1}
    assert stats.bad == 1 and stats.bad_reasons == {"audio too short to use": 1}
    (row,) = lookup.flagged_rows(ids, "audio")
    how = "padded with silence" if short_audio == "pad" else "repeated"
    assert row == {"id": "short", "modality": "audio", "flagged": True,
                   "reason": f"short audio: 0.400 s, {how} to the encoder's 0.975 s"}
    # read back from the store, the flag is the same
    again, stats = extract(vggish, ids, items, tmp_path / "store", progress=False)
    assert stats.encoded == 0 and again.flags == lookup.flags

    refusing = create_adapter("audio/vggish", weights="none", device="cpu", short_audio="refuse")
    lookup, stats = extract(refusing, ids, items, tmp_path / "store", progress=False)
    assert lookup.ok.tolist() == [True, False, False] and stats.flagged == 0
    assert stats.bad_reasons == {"audio too short for VGGish": 1, "audio too short to use": 1}
