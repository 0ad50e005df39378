"""The command line, end to end: the quickstart recipe through ``coembed train``."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from coembed.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def _train(tmp_path, *args):
    """``coembed train`` on the quickstart with its media and store under ``tmp_path``; extra CLI args after."""
    sets = ["--set", f"data.path={tmp_path / 'media'}", "--set", f"extraction.cache_dir={tmp_path / 'cache'}"]
    return CliRunner().invoke(main, ["train", str(QUICKSTART), "--no-progress", *sets, *args])


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "coembed.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("train", "modalities", "check"):
        assert command in out.stdout


def test_modalities_lists_every_adapter_with_dim_and_weights():
    result = CliRunner().invoke(main, ["modalities", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["key"]: r for r in json.loads(result.output)}
    assert rows["image/clip"]["dim"] == 512 and rows["image/clip"]["weights"]
    assert rows["text/clip"]["dim"] == 512
    assert rows["audio/vggish"]["dim"] == 128
    table = CliRunner().invoke(main, ["modalities"]).output
    assert "audio/vggish" in table and "MODALITY" in table


def test_invalid_recipe_fails_before_any_work(tmp_path):
    result = CliRunner().invoke(main, ["train", str(QUICKSTART), "--set", "train.epochz=3",
                                       "--set", f"output_dir={tmp_path}"])
    assert result.exit_code == 2
    assert "train.epochz" in result.output and "unknown key" in result.output
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_quickstart_trains_well_above_chance(tmp_path):
    run_dir = tmp_path / "run"
    result = _train(tmp_path, "--run-dir", str(run_dir), "--set", "extraction.num_workers=1")
    assert result.exit_code == 0, result.output
    assert f"run folder: {run_dir}" in result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    n_val = metrics["counts"]["pairs"]["image-audio"]["validation"]
    assert n_val >= 30
    chance = 1.0 / n_val
    r1 = metrics["validation"]["mean_r1"]  # mean of audio->image and image->audio R@1
    assert r1 >= 3 * chance, f"R@1 {r1:.3f} vs chance {chance:.3f}"
    for direction in ("audio->image", "image->audio"):
        assert metrics["validation"][f"{direction}/R@1"] > chance
        assert metrics["validation"][f"{direction}/R@5"] >= 2 * 5 * chance
    for name in ("recipe.yaml", "train.log", "bad_items.jsonl", "history.jsonl", "model/config.json",
                 "model/heads.safetensors"):
        assert (run_dir / name).is_file(), name
    assert "best epoch" in (run_dir / "train.log").read_text()

    # a second run over the same data reuses the store: no encoder is called
    again = _train(tmp_path, "--run-dir", str(tmp_path / "run2"), "--set", "train.epochs=2")
    assert again.exit_code == 0, again.output
    extraction = json.loads((tmp_path / "run2" / "metrics.json").read_text())["extraction"]
    assert all(stats["encoded"] == 0 and stats["cached"] == stats["items"] for stats in extraction.values())


def test_a_select_metric_typo_fails_before_any_work(tmp_path):
    result = CliRunner().invoke(main, ["train", str(QUICKSTART), "--set", "train.select_metric=audio->image/R1",
                                       "--set", f"output_dir={tmp_path}"])
    assert result.exit_code == 2
    assert "train.select_metric" in result.output and "audio->image/R@1" in result.output
    assert not any(tmp_path.iterdir())


def test_a_head_that_cannot_map_its_encoder_fails_before_extraction(tmp_path):
    result = _train(tmp_path, "--run-dir", str(tmp_path / "run"),
                    "--set", "modalities.audio.head.type=identity", "--set", "modalities.text.head.type=linear")
    assert result.exit_code == 2, result.output
    assert "modalities.audio.head" in result.output and "identity head" in result.output
    assert not (tmp_path / "media").exists() and not (tmp_path / "cache").exists()
