"""The video_folder source: VGG-Sound videos -> frames paired with the audio around them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _media import (FPS, clip_name, frame_level, tone_hz, truncate, write_video, write_vggsound_csv)
from _toy_adapter import register_toys, toy_recipe
from coembed.dataset import load_dataset, split_by_group
from coembed.dataset import recipe_source as build_source
from coembed.media import AudioSegment, VideoFrame, load_audio, load_image, probe_video
from coembed.sources import BadRecord, Record
from coembed.sources.video_folder import audio_window, frame_times


def _records(recipe):
    out = list(build_source(recipe))
    return [r for r in out if isinstance(r, Record)], [r for r in out if isinstance(r, BadRecord)]


@pytest.fixture
def toys(tmp_path, monkeypatch):
    register_toys(tmp_path, monkeypatch)


def test_probe_finds_streams_and_their_real_extent(tmp_path):
    mp4 = probe_video(str(write_video(tmp_path / "a.mp4", seconds=3.0)))
    assert mp4.video == pytest.approx((0.0, 3.0), abs=0.05) and mp4.audio == pytest.approx((0.0, 3.0), abs=0.1)
    mkv = probe_video(str(write_video(tmp_path / "a.mkv", seconds=2.0, rate=44100, channels=2)))
    assert mkv.video == pytest.approx((0.0, 2.0), abs=0.05) and mkv.audio == pytest.approx((0.0, 2.0), abs=0.1)
    assert probe_video(str(write_video(tmp_path / "v.mp4", audio=False))).audio is None
    assert probe_video(str(write_video(tmp_path / "s.mp4", video=False))).video is None


def test_frame_times_and_audio_windows():
    assert frame_times(0.0, 10.0, "middle") == [5.0]
    assert frame_times(0.0, 10.0, 4) == [1.25, 3.75, 6.25, 8.75]
    assert audio_window(5.0, 0.0, 10.0, 5.0) == (2.5, 5.0)     # centred
    assert audio_window(1.0, 0.0, 10.0, 5.0) == (0.0, 5.0)     # shifted right to stay inside
    assert audio_window(9.5, 0.0, 10.0, 5.0) == (5.0, 5.0)     # shifted left
    assert audio_window(1.5, 0.0, 3.0, 5.0) == (0.0, 3.0)      # the whole of a short video


def test_vggsound_layout_gives_frames_paired_with_audio_grouped_by_video(tmp_path, toys):
    folder = tmp_path / "video"
    write_video(folder / clip_name("--4gqARaEJE", 0), seconds=4.0)
    write_video(folder / "sub" / clip_name("-0BKyt8iZ1I", 30), seconds=2.0)   # subfolders are searched
    write_video(folder / "plainname_7.mkv", seconds=2.0)                    # <id>_<start> also matches
    write_video(folder / clip_name("not_in_csv", 0), seconds=2.0)            # ignored: no CSV row
    write_vggsound_csv(tmp_path / "vggsound.csv", [
        ("--4gqARaEJE", 0, "dog barking, howling", "train"),   # a label with a comma, quoted by the CSV writer
        ("-0BKyt8iZ1I", 30, "playing piano", "test"),
        ("plainname", 7, "rain", "train"),
    ])
    recipe = toy_recipe(tmp_path, {"source": "video_folder", "path": "video", "csv": "vggsound.csv", "frames": 3,
                                   "clip_seconds": 2.0})
    records, bad = _records(recipe)
    assert bad == []
    by_video = {}
    for r in records:
        by_video.setdefault(r.group, []).append(r)
    assert sorted(by_video) == ["--4gqARaEJE_000000", "-0BKyt8iZ1I_000030", "plainname_000007"]
    first = by_video["--4gqARaEJE_000000"]
    assert [r.id for r in first] == [f"--4gqARaEJE_000000#{k}" for k in range(3)]
    assert {r.label for r in first} == {"dog barking, howling"}
    frames = [r.items["image"] for r in first]
    audios = [r.items["audio"] for r in first]
    assert all(isinstance(f, VideoFrame) for f in frames) and all(isinstance(a, AudioSegment) for a in audios)
    assert [f.time for f in frames] == pytest.approx([4 / 6, 2.0, 4 - 4 / 6], abs=0.01)
    assert [x for a in audios for x in (a.start, a.duration)] == pytest.approx([0, 2, 1, 2, 2, 2], abs=0.01)

    # the split never puts one video on both sides
    train, val = split_by_group(records, 0.34, seed=0)
    assert {r.group for r in train}.isdisjoint({r.group for r in val})

    # CSV split filter
    only_train = toy_recipe(tmp_path, {"source": "video_folder", "path": "video", "csv": "vggsound.csv",
                                       "csv_splits": ["train"]})
    records, _ = _records(only_train)
    assert sorted(r.id for r in records) == ["--4gqARaEJE_000000#0", "plainname_000007#0"]


def test_pairs_decode_to_the_frame_and_the_audio_around_it(tmp_path, toys):
    """A frame's pixels and its audio's tones match the time the pair was cut at."""
    write_video(tmp_path / "v" / "clip.mp4", seconds=6.0)
    recipe = toy_recipe(tmp_path, {"source": "video_folder", "path": "v", "frames": 3, "clip_seconds": 1.0})
    records, bad = _records(recipe)
    assert bad == [] and len(records) == 3
    for r in records:
        t = r.items["image"].time
        pixel = np.asarray(load_image(r.items["image"]))[32, 32, 0]
        expected = frame_level(int(round(t * FPS)))
        assert abs(int(pixel) - expected) <= 8, (t, pixel, expected)
        wave = load_audio(r.items["audio"], 16000)
        assert abs(wave.duration - 1.0) < 0.03
        half = wave.samples[: len(wave.samples) // 2]    # the first half lies within second int(t - 0.5)
        spectrum = np.abs(np.fft.rfft(half))
        peak = np.fft.rfftfreq(len(half), 1 / 16000)[int(np.argmax(spectrum))]
        assert abs(peak - tone_hz(int(t - 0.5))) < 30, (t, peak)


def test_folder_without_csv_takes_every_video(tmp_path, toys):
    write_video(tmp_path / "v" / "a.mp4", seconds=2.0)
    write_video(tmp_path / "v" / "b" / "c.mkv", seconds=2.0)
    (tmp_path / "v" / "notes.txt").write_text("not a video")
    (tmp_path / "v" / "._a.mp4").write_bytes(b"\0\0")  # macOS resource fork: hidden, skipped
    recipe = toy_recipe(tmp_path, {"source": "video_folder", "path": "v"})
    records, bad = _records(recipe)
    assert bad == []
    assert sorted(r.id for r in records) == ["a.mp4#0", "b/c.mkv#0"]
    assert all(r.label is None for r in records)


def test_probe_results_are_cached_and_redone_when_a_file_changes(tmp_path, toys, monkeypatch):
    folder = tmp_path / "v"
    for name in ("a", "b", "c"):
        write_video(folder / f"{name}.mp4", seconds=2.0)
    truncate(write_video(tmp_path / "full.mkv", seconds=4.0), folder / "d.mkv")
    recipe = toy_recipe(tmp_path, {"source": "video_folder", "path": "v", "probe_workers": 2})
    first = load_dataset(recipe)
    assert first.counts["probed"] == 4 and [b.reason.split(":")[0] for b in first.bad] == ["truncated file"]
    cache_files = list((tmp_path / "cache" / ".probes").glob("*.jsonl"))
    assert len(cache_files) == 1 and len(cache_files[0].read_text().splitlines()) == 4

    calls = []
    import coembed.sources.video_folder as video

    real = video.probe_video
    monkeypatch.setattr(video, "probe_video", lambda path: calls.append(path) or real(path))
    again = load_dataset(recipe)
    assert calls == [] and again.counts["probed"] == 0
    assert [r.id for r in again.records] == [r.id for r in first.records]
    assert [b.reason for b in again.bad] == [b.reason for b in first.bad]

    write_video(folder / "b.mp4", seconds=3.0)  # changed: probed again
    with (cache_files[0]).open("a") as fh:
        fh.write('{"v": 1, "path": "a.mp4", "si')  # a line cut by a kill is skipped
    third = load_dataset(recipe)
    assert [p.rsplit("/", 1)[-1] for p in calls] == ["b.mp4"] and third.counts["probed"] == 1


def test_probing_shows_a_progress_bar_with_rate_and_eta(tmp_path, toys, capsys):
    for i in range(3):
        write_video(tmp_path / "v" / f"{i}.mp4", seconds=1.5)
    load_dataset(toy_recipe(tmp_path, {"source": "video_folder", "path": "v"}), progress=True)
    err = capsys.readouterr().err
    assert "probe videos" in err and "3/3" in err and "video/s" in err and "<00:00" in err


def test_video_recipe_trains_end_to_end_with_toy_adapters(tmp_path, toys):
    from coembed.run import train_recipe

    rows = []
    for i in range(6):
        write_video(tmp_path / "v" / clip_name(f"yt{i}", i), seconds=2.0 + i % 3)
        rows.append((f"yt{i}", i, ["cat", "dog"][i % 2], "train"))
    write_vggsound_csv(tmp_path / "vgg.csv", rows)
    recipe = toy_recipe(tmp_path, {"source": "video_folder", "path": "v", "csv": "vgg.csv", "frames": 2,
                                   "clip_seconds": 1.0})
    result = train_recipe(recipe, run_dir=tmp_path / "run", progress=False)
    counts = result.metrics["counts"]
    assert counts["read"]["videos"] == 6 and counts["read"]["usable_videos"] == 6
    assert counts["records"] == 12 and counts["bad_items"] == 0
    pairs = counts["pairs"]["image-audio"]
    assert pairs["train"] + pairs["validation"] == 12
    assert (tmp_path / "run" / "bad_items.jsonl").read_text() == ""
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["counts"]["read"]["probed"] == 6


@pytest.mark.slow
def test_paper_recipe_shape_with_the_real_adapters(tmp_path):
    """CLIP (random init) and VGGish (no weights) over generated VGG-Sound-style videos."""
    from coembed.recipe import recipe_from_dict
    from coembed.run import train_recipe

    rows = []
    for i in range(4):
        write_video(tmp_path / "video" / clip_name(f"vid{i}", 10), seconds=2.5)
        rows.append((f"vid{i}", 10, ["dog", "piano"][i % 2], "train"))
    write_vggsound_csv(tmp_path / "vggsound.csv", rows)
    recipe = recipe_from_dict({
        "name": "paper-shape", "anchor": "image", "pairs": [["image", "audio"]],
        "modalities": {"image": {"adapter": "clip", "model": "ViT-B-32", "pretrained": "none", "device": "cpu",
                                 "head": {"type": "identity"}},
                       "audio": {"adapter": "vggish", "weights": "none", "device": "cpu",
                                 "head": {"type": "linear"}}},
        "data": {"source": "video_folder", "path": "video", "csv": "vggsound.csv", "frames": 2,
                 "split": {"validation": 0.5}},
        "extraction": {"batch_size": 4, "num_workers": 0, "cache_dir": "cache"},
        "train": {"epochs": 2, "batch_size": 4, "device": "cpu"},
        "eval": {"plots": False, "report": False},
        "output_dir": "runs",
    }, base_dir=tmp_path)
    result = train_recipe(recipe, run_dir=tmp_path / "run", progress=False)
    counts = result.metrics["counts"]
    assert counts["records"] == 8 and counts["bad_items"] == 0
    assert result.metrics["extraction"]["image"]["encoded"] == 8
    assert result.metrics["extraction"]["audio"]["encoded"] == 8
    # the paper's 5 s of audio around a frame: clipped to the 2.5 s video, never outside it
    vecs = result.model.embed(audio=[str(tmp_path / "video" / clip_name("vid0", 10))])
    assert vecs.shape[-1] == 512


def test_csv_rows_without_a_clip_are_bad_or_counted_when_skipped(tmp_path, toys):
    folder = tmp_path / "video"
    write_video(folder / clip_name("here", 0), seconds=2.0)
    write_vggsound_csv(tmp_path / "vggsound.csv", [("here", 0, "rain", "train"), ("gone", 10, "rain", "train"),
                                                   ("gone2", 20, "dog", "train")])
    data = {"source": "video_folder", "path": "video", "csv": "vggsound.csv"}
    records, bad = _records(toy_recipe(tmp_path, data))
    assert [r.id for r in records] == ["here_000000#0"]
    assert sorted(b.id for b in bad) == ["gone2_000020", "gone_000010"]
    assert all(b.reason.startswith("missing file") for b in bad)

    source = build_source(toy_recipe(tmp_path, {**data, "missing_clips": "skip"}))
    items = list(source)
    assert [r.id for r in items if isinstance(r, Record)] == ["here_000000#0"]
    assert not [r for r in items if isinstance(r, BadRecord)]
    assert source.counts["csv_rows_not_downloaded"] == 2  # skipped, never silently: counted in the summary
