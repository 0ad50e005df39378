"""Bad input is reported with its id and reason, counted, and skipped; every good item is kept."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from _media import non_utf8_name, truncate, write_png, write_video, write_wav
from _toy_adapter import register_toys, toy_recipe
from coembed.bad_items import reason_kind
from coembed.errors import TooManyBadItems
from coembed.media import load_audio, load_image
from coembed.run import train_recipe


@pytest.fixture
def toys(tmp_path, monkeypatch):
    register_toys(tmp_path, monkeypatch)


def _bad_items(run_dir):
    lines = (run_dir / "bad_items.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]  # every line is valid JSON, odd file names included


def _messy_video_folder(folder):
    """Four good videos, one with silent audio, and one file for every kind of bad video."""
    for i in range(4):
        write_video(folder / f"good{i}.mp4", seconds=2.0 + i)
    write_video(folder / "silent.mp4", seconds=2.0, silent=True)
    (folder / "empty.mp4").write_bytes(b"")
    truncate(write_video(folder.parent / "whole.mkv", seconds=4.0), folder / "cut.mkv")   # data ends early
    truncate(write_video(folder.parent / "whole.mp4", seconds=4.0), folder / "cut.mp4")   # index lost
    (folder / "text.mp4").write_text("this is not a video at all\n" * 20)
    write_video(folder / "mute.mp4", seconds=2.0, audio=False)
    write_video(folder / "blind.mp4", seconds=2.0, video=False)
    write_video(folder / "short.mp4", seconds=0.5)
    write_video(non_utf8_name(folder, b"caf", ".mp4"), seconds=2.0)


EXPECTED_BAD_VIDEOS = {
    "empty.mp4": ("zero-byte file", None),
    "cut.mkv": ("truncated file", None),
    "cut.mp4": ("not a readable media file", None),
    "text.mp4": ("not a readable media file", None),
    "mute.mp4": ("no audio stream", "audio"),
    "blind.mp4": ("no video stream", "image"),
    "short.mp4": ("video too short", None),
    "caf\\udcff\\udcfe.mp4": ("path name is not valid UTF-8", None),
}


def test_every_bad_video_is_reported_and_every_good_one_kept(tmp_path, toys, caplog):
    _messy_video_folder(tmp_path / "v")
    recipe = toy_recipe(tmp_path, {"source": "video_folder", "path": "v", "frames": 2, "clip_seconds": 1.0,
                                   "max_bad_fraction": 0.9})
    with caplog.at_level(logging.INFO, logger="coembed"):
        result = train_recipe(recipe, run_dir=tmp_path / "run", progress=False)
    rows = _bad_items(tmp_path / "run")
    bad = {r["id"]: (reason_kind(r["reason"]), r["modality"]) for r in rows if not r.get("flagged")}
    assert bad == EXPECTED_BAD_VIDEOS
    flagged = [r for r in rows if r.get("flagged")]
    assert {r["id"] for r in flagged} == {"silent.mp4#0", "silent.mp4#1"}
    assert all(r["modality"] == "audio" and r["reason"].startswith("silent audio") and "kept" in r["reason"]
               for r in flagged)

    counts = result.metrics["counts"]
    assert counts["records"] == 10   # (4 good + 1 silent) x 2 frames: nothing good is lost
    pairs = counts["pairs"]["image-audio"]
    assert pairs["train"] + pairs["validation"] == 10
    assert counts["bad_items"] == 8 and counts["flagged_items"] == 2
    assert counts["bad_by_reason"] == {"zero-byte file": 1, "truncated file": 1, "not a readable media file": 2,
                                       "no audio stream": 1, "no video stream": 1, "video too short": 1,
                                       "path name is not valid UTF-8": 1}
    assert counts["read"] == {"records": 10, "bad_records": 8, "videos": 13, "probed": 11, "usable_videos": 5}
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("summary"))
    for text in ("read", "pairs", "image-audio: ", "bad items   8", "truncated file", "flagged     2",
                 "silent audio", "seconds", "read ", "extract "):
        assert text in summary, text

    # silent audio dropped by the recipe: the same store, nothing encoded again
    dropped = toy_recipe(tmp_path, {"source": "video_folder", "path": "v", "frames": 2, "clip_seconds": 1.0,
                                    "max_bad_fraction": 0.9, "silent_audio": "drop"})
    again = train_recipe(dropped, run_dir=tmp_path / "run2", progress=False)
    assert all(s["encoded"] == 0 for s in again.metrics["extraction"].values())
    rows = _bad_items(tmp_path / "run2")
    silent = [r for r in rows if r["id"].startswith("silent.mp4")]
    assert len(silent) == 2 and all("flagged" not in r and "dropped" in r["reason"] for r in silent)
    pairs = again.metrics["counts"]["pairs"]["image-audio"]
    assert pairs["train"] + pairs["validation"] == 8


def test_too_many_bad_videos_fail_the_run_early_with_a_clear_message(tmp_path, toys):
    _messy_video_folder(tmp_path / "v")
    recipe = toy_recipe(tmp_path, {"source": "video_folder", "path": "v", "max_bad_fraction": 0.2})
    with pytest.raises(TooManyBadItems, match=r"modality image: 7 of 12 items are bad \(58%\), above the limit "
                       r"data.max_bad_fraction=0.2; most common reasons: not a readable media file \(2\), "):
        train_recipe(recipe, run_dir=tmp_path / "run", progress=False)
    assert len(_bad_items(tmp_path / "run")) == 8          # the reasons are written before failing
    assert not (tmp_path / "cache" / "image-toy").exists()  # and nothing was encoded


def test_manifest_bad_files_are_reported_and_good_ones_of_any_format_kept(tmp_path, toys):
    media = tmp_path / "m"
    rows = []
    good_images = {
        "rgb": write_png(media / "rgb.png"),
        "grey": write_png(media / "grey.png", mode="L"),
        "rgba": write_png(media / "rgba.png", mode="RGBA"),
        "palette": write_png(media / "palette.png", mode="P"),
        "cmyk": _cmyk_jpeg(media / "cmyk.jpg"),
        "grey16": _grey16_png(media / "grey16.png"),
    }
    good_audio = {
        "rgb": write_wav(media / "a1.wav", rate=16000),
        "grey": write_wav(media / "a2.wav", rate=44100, channels=2),
        "rgba": write_wav(media / "a3.wav", rate=8000, channels=6),
        "palette": write_wav(media / "a4.wav", rate=22050, subtype="PCM_24"),
        "cmyk": write_wav(media / "a5.wav", rate=48000, subtype="FLOAT"),
        "grey16": write_video(media / "a6.mkv", seconds=1.0, rate=32000, channels=2),  # audio of a video file
    }
    for rid in good_images:
        rows.append((rid, good_images[rid].name, good_audio[rid].name))
    ok_wav = write_wav(media / "ok.wav").name
    (media / "empty.wav").write_bytes(b"")
    (media / "notes.wav").write_text("plain text, not audio")
    truncate(write_png(media / "big.png", size=(300, 300)), media / "cut.png", 0.3)
    write_png(non_utf8_name(media, b"img", ".png"))
    write_wav(media / "quiet.wav", amplitude=0.0)
    write_png(media / "huge.png", size=(400, 400))
    rows += [
        ("missing", "nowhere.png", ok_wav),
        ("zero", "rgb.png", "empty.wav"),
        ("notmedia", "rgb.png", "notes.wav"),
        ("truncated", "cut.png", ok_wav),
        ("badname", None, ok_wav),
        ("silent", "rgb.png", "quiet.wav"),
        ("huge", "huge.png", ok_wav),
    ]
    lines = [b"id,image,audio"]
    for rid, image, audio in rows:
        image_cell = os.fsencode(media / image) if image else bytes(media / "img") + b"\xff\xfe.png"
        lines.append(b",".join([rid.encode(), image_cell, audio.encode()]))
    lines.append("café".encode("latin-1") + b",rgb.png," + ok_wav.encode())  # an id that is not UTF-8
    (media / "manifest.csv").write_bytes(b"\n".join(lines) + b"\n")

    recipe = toy_recipe(tmp_path, {"source": "manifest", "path": "m/manifest.csv", "max_image_pixels": 100_000,
                                   "max_bad_fraction": 0.9})
    result = train_recipe(recipe, run_dir=tmp_path / "run", progress=False)
    rows_out = _bad_items(tmp_path / "run")
    bad = {(r["id"], r["modality"]): reason_kind(r["reason"]) for r in rows_out if not r.get("flagged")}
    assert bad == {
        ("missing", "image"): "missing file",
        ("zero", "audio"): "zero-byte file",
        ("notmedia", "audio"): "not a readable media file",
        ("truncated", "image"): "not a readable image",
        ("badname", "image"): "path name is not valid UTF-8",
        ("huge", "image"): "image too large",
    }
    assert [(r["id"], r["modality"]) for r in rows_out if r.get("flagged")] == [("silent", "audio")]
    counts = result.metrics["counts"]
    pairs = counts["pairs"]["image-audio"]
    assert pairs["train"] + pairs["validation"] == 8   # 6 formats + the silent one (kept) + the non-UTF-8 id
    assert "caf\\udce9" in {r.id for r in load_records(recipe)}


def load_records(recipe):
    from coembed.dataset import load_dataset

    return load_dataset(recipe).records


def test_any_image_mode_becomes_rgb_and_any_audio_layout_mono_at_the_rate_asked(tmp_path):
    for path in (write_png(tmp_path / "l.png", mode="L"), write_png(tmp_path / "p.png", mode="P"),
                 write_png(tmp_path / "la.png", mode="LA"), _cmyk_jpeg(tmp_path / "c.jpg"),
                 _grey16_png(tmp_path / "g16.png"), write_png(tmp_path / "rgba.png", mode="RGBA")):
        image = load_image(path)
        assert image.mode == "RGB" and image.size == (32, 24), path
    grey16 = np.asarray(load_image(tmp_path / "g16.png"))
    assert grey16.max() > 200  # 16-bit values are scaled, not clipped to white or wrapped
    for rate, channels in ((8000, 1), (44100, 2), (48000, 6)):
        wave = load_audio(write_wav(tmp_path / f"{rate}-{channels}.wav", 0.5, rate, channels), 16000)
        assert wave.sample_rate == 16000 and wave.samples.ndim == 1 and abs(len(wave.samples) - 8000) <= 2
        assert 0.2 < np.sqrt(np.mean(wave.samples**2)) < 0.35  # a 0.4 sine: mixing kept the level
    wave = load_audio(write_video(tmp_path / "v.mp4", seconds=1.0, rate=44100, channels=2), 16000)
    assert wave.sample_rate == 16000 and abs(wave.duration - 1.0) < 0.05


def _cmyk_jpeg(path):
    from PIL import Image

    Image.new("RGB", (32, 24), (30, 160, 90)).convert("CMYK").save(path)
    return path


def _grey16_png(path):
    from PIL import Image

    ramp = (np.linspace(0, 60000, 32 * 24).reshape(24, 32)).astype(np.uint16)
    Image.fromarray(ramp).save(path)  # uint16 -> mode I;16
    return path


def test_a_cover_image_is_not_the_video_and_a_folder_is_not_a_file(tmp_path):
    from types import SimpleNamespace

    import av

    from coembed.media import stat_file, video_stream
    from coembed.registry import BadItem

    cover = SimpleNamespace(disposition=av.stream.Disposition.attached_pic)
    moving = SimpleNamespace(disposition=av.stream.Disposition.default)
    assert video_stream(SimpleNamespace(streams=SimpleNamespace(video=[cover, moving]))) is moving
    assert video_stream(SimpleNamespace(streams=SimpleNamespace(video=[cover]))) is None
    with pytest.raises(BadItem, match="not a file"):
        stat_file(tmp_path)
    with pytest.raises(BadItem, match="missing file"):
        stat_file(tmp_path / "nothing" / "here.wav")
    with pytest.raises(BadItem, match="missing file"):
        load_audio(str(write_wav(tmp_path / "a.wav")) + "/below", 16000)  # a file used as a folder


def test_a_run_whose_one_modality_is_almost_all_bad_stops(tmp_path, toys):
    # every image is good, 10 of 12 clips are empty: 10 of 24 items (42 %), but 83 % of the audio
    media = tmp_path / "m"
    write_png(media / "rgb.png")
    write_wav(media / "ok.wav")
    (media / "empty.wav").write_bytes(b"")
    lines = ["id,image,audio"] + [f"r{i},rgb.png,{'ok.wav' if i < 2 else 'empty.wav'}" for i in range(12)]
    (media / "manifest.csv").write_text("\n".join(lines) + "\n")
    recipe = toy_recipe(tmp_path, {"source": "manifest", "path": "m/manifest.csv", "max_bad_fraction": 0.5})
    with pytest.raises(TooManyBadItems, match=r"modality audio: 10 of 12 items are bad \(83%\), above the limit "
                                              r"data.max_bad_fraction=0.5; most common reasons: zero-byte file \(10\)"):
        train_recipe(recipe, run_dir=tmp_path / "run", progress=False)
    assert len(_bad_items(tmp_path / "run")) == 10
