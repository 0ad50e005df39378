import json

import pytest

from coembed.bad_items import bad_row, check_bad_fraction, check_pair_fraction, flagged_row
from coembed.errors import TooManyBadItems
from coembed.dataset import split_by_group
from coembed.sources import BadRecord, Record
from coembed.sources.generated import generate_media
from coembed.sources.manifest import ManifestOptions, read_manifest_rows, records_from_rows

KINDS = {"image": "file", "audio": "file", "text": "text"}
COLUMNS = {"image": "image", "audio": "audio", "text": "text"}


def _records(rows, root):
    return list(records_from_rows(rows, ManifestOptions(path="m.csv"), COLUMNS, KINDS, root))


def test_manifest_csv_and_jsonl_give_the_same_records(tmp_path):
    (tmp_path / "m.csv").write_text("id,group,label,image,audio,text\n"
                                    "a,v1,dog,a.png,a.wav,a dog\n"
                                    "b,v1,cat,/abs/b.png,,a cat\n")
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"id": "a", "group": "v1", "label": "dog", "image": "a.png", "audio": "a.wav", "text": "a dog"})
        + "\n\n" + json.dumps({"id": "b", "group": "v1", "label": "cat", "image": "/abs/b.png", "text": "a cat"}) + "\n")
    csv_records = _records(read_manifest_rows(tmp_path / "m.csv"), tmp_path)
    jsonl_records = _records(read_manifest_rows(tmp_path / "m.jsonl"), tmp_path)
    assert csv_records == jsonl_records
    a, b = csv_records
    assert a.items == {"image": str(tmp_path / "a.png"), "audio": str(tmp_path / "a.wav"), "text": "a dog"}
    assert b.items == {"image": "/abs/b.png", "text": "a cat"}  # no audio: joins no audio pair
    assert (a.group, a.label) == ("v1", "dog")


def test_manifest_bad_rows_are_reported_not_fatal(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "x"}\n{not json\n[1, 2]\n{"id": "a", "text": "y"}\n'
                                      '{"text": "no id"}\n')
    out = _records(read_manifest_rows(tmp_path / "m.jsonl"), tmp_path)
    good = [r for r in out if isinstance(r, Record)]
    bad = [r for r in out if isinstance(r, BadRecord)]
    assert [r.id for r in good] == ["a"] and good[0].group == "a"  # no group column: own group
    assert [b.reason.split(":")[-1].strip() for b in bad][:1] == ["invalid JSON (Expecting property name enclosed in double quotes)"]
    assert {b.reason for b in bad[1:]} == {"line 3: not an object", "duplicate id", "no value in id column 'id'"}


def test_split_is_by_group_deterministic_and_sized():
    records = [Record(f"r{i}", f"video{i // 3}", {}) for i in range(300)]  # 100 groups of 3
    train, val = split_by_group(records, 0.33, seed=7)
    assert len({r.group for r in val}) == 33 and len(train) + len(val) == 300
    assert not ({r.group for r in train} & {r.group for r in val})
    again = split_by_group(records, 0.33, seed=7)
    assert [r.id for r in again[1]] == [r.id for r in val]
    other = split_by_group(records, 0.33, seed=8)
    assert [r.id for r in other[1]] != [r.id for r in val]
    # adding data does not move existing groups across the split
    more = records + [Record("new", "video-new", {})]
    _, val_more = split_by_group(more, 0.33, seed=7)
    assert len({r.group for r in val_more} & {r.group for r in val}) >= 32


def test_split_keeps_both_sides_non_empty():
    records = [Record(str(i), str(i), {}) for i in range(2)]
    train, val = split_by_group(records, 0.01, seed=0)
    assert len(train) == 1 and len(val) == 1
    train, val = split_by_group(records, 0.0, seed=0)
    assert len(train) == 2 and not val


def test_generated_media_are_real_files(tmp_path):
    import soundfile as sf
    from PIL import Image

    manifest = generate_media(tmp_path, classes=2, items_per_class=3, image_size=32, audio_seconds=1.0)
    rows = list(read_manifest_rows(manifest))
    assert len(rows) == 6 and {r["label"] for r in rows} == {"circle", "square"}
    with Image.open(tmp_path / rows[0]["image"]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    samples, rate = sf.read(tmp_path / rows[0]["audio"])
    assert rate == 16000 and len(samples) == 16000 and abs(samples).max() > 0.05
    again = generate_media(tmp_path / "again", classes=2, items_per_class=3, image_size=32, audio_seconds=1.0)
    assert (tmp_path / "again" / rows[0]["audio"]).read_bytes() == (tmp_path / rows[0]["audio"]).read_bytes()
    assert again.name == "manifest.csv"


def test_bad_fraction_is_checked_per_modality():
    short = [bad_row(f"clip{i}.wav", "audio", "audio too short for VGGish (0.42 s)") for i in range(2960)]
    broken = [bad_row(f"clip{i}.wav", "audio", "not a readable media file") for i in range(2960, 2975)]
    # 2,975 of 3,000 clips refused beside 3,000 good captions: 49.6 % of all items, 99 % of the audio
    with pytest.raises(TooManyBadItems, match=r"modality audio: 2,975 of 3,000 items are bad \(99%\), above the limit "
                                              r"data.max_bad_fraction=0.5; most common reasons: audio too short "
                                              r"for VGGish \(2,960\), not a readable media file \(15\)"):
        check_bad_fraction(short + broken, {"audio": 25, "text": 3000}, 0.5)
    check_bad_fraction(short[:5], {"audio": 5, "text": 10}, 0.5)               # exactly at the limit: fine
    with pytest.raises(TooManyBadItems, match="modality audio: 6 of 11"):
        check_bad_fraction(short[:6], {"audio": 5, "text": 10}, 0.5)
    check_bad_fraction([], {"audio": 0}, 0.0)
    # an input that became no record counts against every modality; flagged items are kept, not bad
    lost = [bad_row("row7", None, "zero-byte file")]
    with pytest.raises(TooManyBadItems, match="modality text: 1 of 2 items"):
        check_bad_fraction(lost, {"text": 1}, 0.4)
    check_bad_fraction([flagged_row("a.wav", "audio", "silent audio (kept)")] * 9, {"audio": 10}, 0.1)


def test_bad_fraction_is_checked_per_pair_type():
    # 40 % of the audio and 40 % of the images bad, on different records: each modality passes, 80 % of pairs lost
    rows = [bad_row(f"r{i}", "audio", "audio too short") for i in range(4)]
    rows += [bad_row(f"r{i}", "image", "truncated file") for i in range(4, 8)]
    check_bad_fraction(rows, {"audio": 6, "image": 6}, 0.5)
    with pytest.raises(TooManyBadItems, match=r"pair type image-audio: 8 of 10 candidate pairs were lost to bad items "
                                              r"\(80%\), above the limit data.max_bad_fraction=0.5; most common "
                                              r"reasons: audio too short \(4\), truncated file \(4\)"):
        check_pair_fraction(rows, ("image", "audio"), n_candidates=10, n_pairs=2, limit=0.5)
    check_pair_fraction(rows, ("image", "audio"), n_candidates=10, n_pairs=5, limit=0.5)


def test_a_numeric_id_or_group_is_text_and_a_blank_label_is_none(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": 0, "group": 0, "label": "", "text": "x"}) + "\n"
                                      + json.dumps({"id": " 1 ", "group": "", "label": 0, "text": "y"}) + "\n")
    out = _records(read_manifest_rows(tmp_path / "m.jsonl"), tmp_path)
    assert [(r.id, r.group, r.label) for r in out] == [("0", "0", None), ("1", "1", "0")]  # id 0 is no missing id


def test_a_damaged_stamp_of_generated_media_makes_them_again(tmp_path, monkeypatch):
    from _toy_adapter import register_toys, toy_recipe
    from coembed.dataset import recipe_source as build_source

    register_toys(tmp_path, monkeypatch)
    recipe = toy_recipe(tmp_path, {"source": "generated", "path": "gen", "classes": 2, "items_per_class": 1,
                                   "image_size": 16, "audio_seconds": 1.0})
    first = list(build_source(recipe))
    (tmp_path / "gen" / "generated.json").write_text('{"clas')  # a run killed while writing it
    assert list(build_source(recipe)) == first
    assert json.loads((tmp_path / "gen" / "generated.json").read_text())["classes"] == 2


def test_esc50_rows_that_are_short_or_repeated_are_bad_records(tmp_path, monkeypatch):
    from _media import write_wav
    from _toy_adapter import register_toys, toy_recipe
    from coembed.dataset import recipe_source as build_source

    register_toys(tmp_path, monkeypatch)
    write_wav(tmp_path / "esc" / "audio" / "1-1-A-0.wav")
    (tmp_path / "esc" / "meta").mkdir()
    (tmp_path / "esc" / "meta" / "esc50.csv").write_text(
        "filename,fold,target,category,esc10,src_file,take\n"
        "1-1-A-0.wav,1,0,dog,True,1,A\n"
        "1-2-A-0.wav\n"                       # cut short: no fold, no category
        "1-1-A-0.wav,1,0,dog,True,1,A\n")     # the same clip again
    out = list(build_source(toy_recipe(tmp_path, {"source": "esc50", "path": "esc"})))
    assert [(r.id, r.group, r.label) for r in out if isinstance(r, Record)] == [("1-1-A-0", "1", "dog")]
    assert [(r.id, r.reason) for r in out if isinstance(r, BadRecord)] == [
        ("1-2-A-0", "esc50.csv line 3: fold None is not a number"), ("1-1-A-0", "duplicate id")]


PLUGIN_SOURCE = '''
from pydantic import Field
from coembed.sources import BadRecord, Record, Source, SourceOptions, make_record, unique_ids


class CountOptions(SourceOptions):
    n: int = Field(default=4, ge=1)


class CountSource(Source):
    """Records n0, n1, ... with a numbered text item each; n2 twice (a duplicate id)."""

    name = "counting"
    Options = CountOptions

    def __iter__(self):
        rows = [make_record(f"n{i}", {"toy": f"item-{i}"}, group=f"g{i % 2}") for i in range(self.options.n)]
        yield from unique_ids(rows + [make_record("n2", {"toy": "item-2"})])
        yield BadRecord("row-x", "unreadable row")
'''


def test_a_plugin_source_registers_like_the_built_in_ones(tmp_path, monkeypatch):
    """Sources are found through the `coembed.sources` entry points, coembed's own and a plugin's alike."""
    from coembed.dataset import load_dataset
    from coembed.errors import RecipeError
    from coembed.recipe import recipe_from_dict
    from coembed.sources import SOURCES
    from _toy_adapter import register_toys
    from plugins import install_plugin

    register_toys(tmp_path, monkeypatch)
    assert {"manifest", "generated", "video_folder", "hf_dataset", "esc50"} <= set(SOURCES.available())
    assert all(p.distribution == "coembed" for p in SOURCES.available().values())
    install_plugin(tmp_path, monkeypatch, "count-plugin", {"counting": "count_source:CountSource"},
                   {"count_source": PLUGIN_SOURCE}, group="coembed.sources")
    raw = {"anchor": "toy", "pairs": [["toy", "other"]], "data": {"source": "counting", "n": 6},
           "modalities": {"toy": {"adapter": "toy/counting", "head": {"type": "identity"}},
                          "other": {"adapter": "toy/counting", "head": {"type": "linear"}}}}
    data = load_dataset(recipe_from_dict(raw, base_dir=tmp_path))
    assert sorted(r.id for r in data.records) == [f"n{i}" for i in range(6)]
    assert [(b.id, b.reason) for b in data.bad] == [("n2", "duplicate id"), ("row-x", "unreadable row")]
    with pytest.raises(RecipeError, match=r"data.n: Input should be greater than or equal to 1 \(source 'counting'"):
        recipe_from_dict({**raw, "data": {"source": "counting", "n": 0}}, base_dir=tmp_path)

    install_plugin(tmp_path, monkeypatch, "broken-plugin", {"broken": "broken_source:Nope"},
                   {"broken_source": "raise ImportError('missing dependency xyz')\n"}, group="coembed.sources")
    with pytest.raises(RecipeError, match="data.source: source 'broken' from distribution 'broken-plugin' failed "
                                          "to import: ImportError: missing dependency xyz"):
        recipe_from_dict({**raw, "data": {"source": "broken"}}, base_dir=tmp_path)
