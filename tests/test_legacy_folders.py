"""Folders written by coembed 0.1.0 load and work with today's code.

``tests/data/legacy-0.1.0/`` was written by coembed 0.1.0 and is never rewritten:

* ``model/``: a model folder over the toy plugin adapter (identity and MLP heads), random-init VGGish
  (linear head) and random-init CLIP text (bias-free linear head); ``model-expected.json`` holds the
  vectors 0.1.0 embedded with it and the encoder fingerprints it recorded;
* ``run/``: a run folder of a short toy image-audio run (recipe, metrics, history, model, figure sample).

A fingerprint that changes with a refactor would silently re-encode every cached item and refuse
every saved model, so the fingerprints of today's adapters are checked against the recorded ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from coembed import CoEmbedder
from coembed.cli import main
from coembed.store import EmbeddingStore, item_key
from _toy_adapter import register_toys
from plugins import TOY_ADAPTER_SOURCE, VECTORS, install_plugin

LEGACY = Path(__file__).parent / "data" / "legacy-0.1.0"


@pytest.fixture
def legacy_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CoEmbedder:
    install_plugin(tmp_path, monkeypatch, "toy-plugin", {"toy/vector": "toy_adapter:ToyVectorAdapter"},
                   {"toy_adapter": TOY_ADAPTER_SOURCE})
    return CoEmbedder.from_pretrained(LEGACY / "model", device="cpu")


def test_a_model_folder_of_0_1_0_loads_and_embeds_as_it_did(legacy_model: CoEmbedder) -> None:
    expected = json.loads((LEGACY / "model-expected.json").read_text())
    assert legacy_model.modalities == ["anchor", "other", "audio", "text"]
    assert legacy_model.metadata["recipe"] == "legacy"
    for modality in ("anchor", "other"):
        got = legacy_model.embed(**{modality: VECTORS}, as_numpy=True)
        np.testing.assert_allclose(got, np.array(expected[modality], dtype=np.float32), rtol=1e-5, atol=1e-6)


def test_todays_adapters_have_the_fingerprints_0_1_0_recorded(legacy_model: CoEmbedder) -> None:
    expected = json.loads((LEGACY / "model-expected.json").read_text())["fingerprints"]
    for modality, fingerprint in expected.items():
        assert legacy_model.specs[modality].fingerprint == fingerprint
        # creating the adapter checks its fingerprint against the saved one (ModelLoadError otherwise)
        assert legacy_model.adapter(modality).fingerprint == fingerprint


def test_a_run_folder_of_0_1_0_loads_reports_and_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register_toys(tmp_path, monkeypatch)
    run = shutil.copytree(LEGACY / "run", tmp_path / "run")
    model = CoEmbedder.from_pretrained(run, device="cpu")
    assert model.anchor == "image" and model.modalities == ["image", "audio"]

    result = CliRunner().invoke(main, ["report", str(run)])
    assert result.exit_code == 0, result.output
    report = (run / "report.md").read_text()
    assert "# Run `legacy-run`" in report and "image->audio" in report

    result = CliRunner().invoke(main, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "training-curve.png").is_file() and (run / "umap-encoder-audio.png").is_file()


def test_an_embedding_store_of_0_1_0_is_read_as_it_is(tmp_path: Path) -> None:
    """``store/toy-legacy`` holds two shards written by 0.1.0 with ``datasets`` (the first of two record
    batches): 1500 items, one with an error, some with measurements, and two keys written again later
    (the older shard wins), plus one key of the second shard alone."""
    root = shutil.copytree(LEGACY / "store", tmp_path / "store")
    store = EmbeddingStore(root, "toy-legacy", 4)
    keys = [item_key(f"r{i}", f"item-{i}") for i in range(1500)]
    assert len(store) == 1501 and store.keys() == set(keys) | {"extra"}
    lookup = store.lookup(keys + ["extra", "absent"])
    n = np.arange(1500, dtype=np.float32)
    expected = np.stack([n, 2 * n, np.sin(n), np.ones(1500)], axis=1)
    expected[7] = 0.0
    np.testing.assert_allclose(lookup.vectors[:1500], expected, rtol=1e-6)
    assert lookup.vectors[1500].tolist() == [9.0] * 4 and lookup.missing == [1501]
    assert lookup.errors == {7: "not a toy item: 'x'"} and not lookup.ok[7]
    assert lookup.notes == {0: {"audio_db": -10.0}, 500: {"audio_db": -510.0}, 1000: {"audio_db": -1010.0}}
    store.write_shard(["new"], ["rn"], np.full((1, 4), 5.0), [None])  # a new shard beside the old ones
    again = EmbeddingStore(root, "toy-legacy", 4)
    assert len(again) == 1502 and again.lookup(["new"]).vectors.tolist() == [[5.0] * 4]
