"""The hf_dataset source: a Hugging Face data set the test builds and saves, mapped onto modalities."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest

from _toy_adapter import register_toys, toy_recipe
from coembed.dataset import load_dataset
from coembed.dataset import recipe_source as build_source
from coembed.sources import BadRecord, Record
from coembed.sources.hf_dataset import DatasetCell
from coembed.media import load_audio, load_image
from coembed.errors import RecipeError
from coembed.store import content_identity

LABELS = ["dog", "piano", "rain"]


def _png(mode: str, colour=(200, 40, 40), size=(24, 16)) -> bytes:
    from PIL import Image

    image = Image.new("RGB", size, colour).convert(mode) if mode != "I;16" else Image.fromarray(
        np.linspace(0, 60000, size[0] * size[1]).reshape(size[1], size[0]).astype(np.uint16))
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if mode == "CMYK" else "PNG")
    return buf.getvalue()


def _wav(rate: int, channels: int, seconds: float = 1.0, freq: float = 440.0) -> bytes:
    import soundfile as sf

    t = np.arange(int(rate * seconds)) / rate
    wave = np.repeat((0.4 * np.sin(2 * np.pi * freq * t))[:, None], channels, axis=1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _build(tmp_path):
    """Rows of every image mode and audio layout, a corrupt image, a missing sound, a file-path sound."""
    import datasets

    from _media import write_wav

    external = write_wav(tmp_path / "external.wav", rate=22050)
    modes = ["RGB", "L", "RGBA", "P", "CMYK", "I;16"]
    layouts = [(16000, 1), (44100, 2), (8000, 1), (48000, 6), (22050, 2), (32000, 1)]
    rows = {"uid": [], "video_id": [], "label": [], "picture": [], "sound": [], "caption": []}
    for i, (mode, (rate, channels)) in enumerate(zip(modes, layouts)):
        rows["uid"].append(f"clip{i}")
        rows["video_id"].append(f"video{i // 2}")       # two clips per video
        rows["label"].append(i % 3)
        rows["picture"].append({"bytes": _png(mode, colour=(40 * i, 100, 200 - 30 * i)), "path": None})
        rows["sound"].append({"bytes": _wav(rate, channels, freq=300 + 100 * i), "path": None})
        rows["caption"].append(f"a {LABELS[i % 3]}")
    extra = [("broken", {"bytes": b"\x89PNG not really", "path": None}, {"bytes": _wav(16000, 1), "path": None}),
             ("nosound", {"bytes": _png("RGB"), "path": None}, None),
             ("external", {"bytes": _png("RGB", colour=(1, 2, 3)), "path": None},
              {"bytes": None, "path": str(external)})]
    for uid, picture, sound in extra:
        rows["uid"].append(uid)
        rows["video_id"].append(uid)
        rows["label"].append(0)
        rows["picture"].append(picture)
        rows["sound"].append(sound)
        rows["caption"].append("a dog")
    ds = datasets.Dataset.from_dict(rows).cast(datasets.Features({
        "uid": datasets.Value("string"), "video_id": datasets.Value("string"),
        "label": datasets.ClassLabel(names=LABELS), "picture": datasets.Image(), "sound": datasets.Audio(),
        "caption": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    return ds


@pytest.fixture
def toys(tmp_path, monkeypatch):
    register_toys(tmp_path, monkeypatch)


def _recipe(tmp_path, **data):
    return toy_recipe(tmp_path, {"source": "hf_dataset", "path": "ds", "columns": {"image": "picture",
                                                                                   "audio": "sound"},
                                 "id_column": "uid", "group_column": "video_id", "label_column": "label", **data})


def test_saved_data_set_becomes_records_with_references_to_its_cells(tmp_path, toys):
    _build(tmp_path)
    out = list(build_source(_recipe(tmp_path)))
    records = [r for r in out if isinstance(r, Record)]
    assert [r.id for r in records] == [f"clip{i}" for i in range(6)] + ["broken", "nosound", "external"]
    assert not [r for r in out if isinstance(r, BadRecord)]
    first = records[0]
    assert (first.group, first.label) == ("video0", "dog") and records[1].group == "video0"
    assert records[5].label == "rain"  # ClassLabel -> its name
    assert isinstance(first.items["image"], DatasetCell) and isinstance(first.items["audio"], DatasetCell)
    assert "audio" not in records[7].items  # a missing cell: no item of that modality

    # cells decode through coembed.media: every mode to RGB, every layout to mono at the asked rate
    for r in records[:6]:
        image = load_image(r.items["image"])
        assert image.mode == "RGB" and image.size == (24, 16)
        wave = load_audio(r.items["audio"], 16000)
        assert wave.sample_rate == 16000 and wave.samples.ndim == 1 and abs(wave.duration - 1.0) < 0.01
    assert abs(load_audio(records[8].items["audio"], 16000).duration - 1.0) < 0.01  # a path-only cell

    # records are cheap to pickle to workers (the table is memory-mapped, not copied) and keys are stable
    table_bytes = sum(f.stat().st_size for f in (tmp_path / "ds").glob("*.arrow"))
    assert len(pickle.dumps(records)) < table_bytes / 5
    again = [r for r in build_source(_recipe(tmp_path)) if isinstance(r, Record)]
    assert [content_identity(r.items["image"]) for r in again] == [content_identity(r.items["image"]) for r in records]
    assert len({content_identity(r.items["image"]) for r in records}) == len(records)


def test_hf_recipe_trains_reports_bad_cells_and_reuses_the_store(tmp_path, toys):
    from coembed.run import train_recipe

    _build(tmp_path)
    recipe = _recipe(tmp_path, max_bad_fraction=0.5)
    recipe.extraction.num_workers = 2  # cells travel to worker processes
    result = train_recipe(recipe, run_dir=tmp_path / "run", progress=False)
    bad = [json.loads(line) for line in (tmp_path / "run" / "bad_items.jsonl").read_text().splitlines()]
    assert [(b["id"], b["modality"]) for b in bad] == [("broken", "image")]
    assert bad[0]["reason"].startswith("not a readable image")
    pairs = result.metrics["counts"]["pairs"]["image-audio"]
    assert pairs["train"] + pairs["validation"] == 7  # 9 rows - the broken image - the row without sound
    assert result.metrics["counts"]["read"]["rows"] == 9

    again = train_recipe(_recipe(tmp_path, max_bad_fraction=0.5), run_dir=tmp_path / "run2", progress=False)
    assert all(s["encoded"] == 0 for s in again.metrics["extraction"].values())


def test_load_dataset_by_name_from_a_local_parquet_folder(tmp_path, toys, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    ds = _build(tmp_path)
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    recipe = toy_recipe(tmp_path, {"source": "hf_dataset", "name": "pq", "dataset_split": "train",
                                   "columns": {"image": "picture", "audio": "sound"}, "label_column": "label"})
    data = load_dataset(recipe)
    assert len(data.records) == 9 and not data.bad
    assert sorted(r.id for r in data.records) == sorted(str(i) for i in range(9))  # no id column: row numbers
    assert load_image(data.records[0].items["image"]).mode == "RGB"


def test_text_columns_are_read_as_strings_and_a_saved_dict_picks_its_split(tmp_path, toys):
    import datasets

    ds = _build(tmp_path)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dd"))
    recipe = toy_recipe(tmp_path, {"source": "hf_dataset", "path": "dd", "dataset_split": "test",
                                   "columns": {"image": "picture", "toy": "caption"}},
                        modalities={"toy": {"adapter": "counting"}}, pairs=[["image", "toy"]])
    records = [r for r in build_source(recipe) if isinstance(r, Record)]
    assert len(records) == 2 and isinstance(records[0].items["image"], DatasetCell)
    assert records[0].items["toy"] == "a dog"    # toy/counting takes text: the string itself
    assert "audio" not in records[0].items       # the data set has no column "audio"


def test_bad_options_fail_before_any_work(tmp_path, toys):
    _build(tmp_path)
    with pytest.raises(RecipeError, match="exactly one of path"):
        toy_recipe(tmp_path, {"source": "hf_dataset", "path": "ds", "name": "x"})
    with pytest.raises(RecipeError, match="no column 'photo'"):
        list(build_source(toy_recipe(tmp_path, {"source": "hf_dataset", "path": "ds",
                                                "columns": {"image": "photo"}})))
    with pytest.raises(RecipeError, match="has splits"):
        import datasets

        datasets.DatasetDict({"train": datasets.load_from_disk(str(tmp_path / "ds"))}).save_to_disk(
            str(tmp_path / "dd"))
        list(build_source(toy_recipe(tmp_path, {"source": "hf_dataset", "path": "dd", "dataset_split": "validation"})))
    with pytest.raises(RecipeError, match="not found"):
        list(build_source(toy_recipe(tmp_path, {"source": "hf_dataset", "path": "nowhere"})))


def test_blank_ids_groups_and_labels_follow_the_manifest_rules(tmp_path, toys):
    import datasets

    datasets.Dataset.from_dict({"uid": ["a", "", None, " a ", "b"], "grp": ["", "g", None, "x", None],
                                "lab": ["", "dog", None, "cat", "cat"]}).save_to_disk(str(tmp_path / "ds"))
    recipe = toy_recipe(tmp_path, {"source": "hf_dataset", "path": "ds", "id_column": "uid",
                                   "group_column": "grp", "label_column": "lab"})
    out = list(build_source(recipe))
    assert [(r.id, r.group, r.label) for r in out if isinstance(r, Record)] == [("a", "a", None),
                                                                                 ("b", "b", "cat")]
    assert [(r.id, r.reason) for r in out if isinstance(r, BadRecord)] == [
        ("row-1", "no value in id column 'uid'"), ("row-2", "no value in id column 'uid'"), ("a", "duplicate id")]
