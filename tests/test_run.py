"""``coembed train``'s stages around training: what is saved first, what a failing optional step costs,
the run folder's JSON files, and the report of a run whose data is a Hugging Face data set."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

import coembed.run
from coembed import CoEmbedder
from coembed.record import dumps, read_jsonl, write_json
from coembed.report import render_report
from coembed.run import train_recipe
from _toy_adapter import register_toys, toy_recipe


@pytest.fixture
def toys(tmp_path, monkeypatch):
    register_toys(tmp_path, monkeypatch)


def _generated(tmp_path: Path, **overrides) -> dict:
    return {"source": "generated", "path": str(tmp_path / "media"), "classes": 2, "items_per_class": 6,
            "image_size": 32, "audio_seconds": 1.0, **overrides}


def _strict(text: str):
    """JSON as any strict reader sees it: NaN or Infinity is an error, not a number."""
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_the_model_and_metrics_are_saved_before_figures_and_report_can_fail(tmp_path, toys, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no display today")

    monkeypatch.setattr(coembed.run, "draw_run_figures", broken)
    monkeypatch.setattr(coembed.run, "write_report", broken)
    recipe = toy_recipe(tmp_path, _generated(tmp_path), eval={"plots": True, "report": True})
    with caplog.at_level(logging.ERROR, logger="coembed"):
        result = train_recipe(recipe, run_dir=tmp_path / "run", progress=False)
    run = result.run_dir
    assert _strict((run / "metrics.json").read_text())["best_epoch"] >= 1
    model = CoEmbedder.from_pretrained(run, device="cpu")
    assert model.modalities == ["image", "audio"]
    assert "## Metrics" in (run / "model" / "README.md").read_text()  # the card has the metrics already
    assert not (run / "report.md").exists()
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "drawing the figures failed" in messages and f"coembed plot {run}" in messages
    assert "writing the report failed" in messages and f"coembed report {run}" in messages


def test_a_run_without_validation_metrics_writes_strict_json(tmp_path, toys):
    """No validation pairs: every validation metric is NaN, written as null, never as NaN."""
    recipe = toy_recipe(tmp_path, {**_generated(tmp_path), "split": {"validation": 0.0}})
    run = train_recipe(recipe, run_dir=tmp_path / "run", progress=False).run_dir
    metrics = _strict((run / "metrics.json").read_text())
    assert metrics["validation"]["mean_r1"] is None
    rows = [_strict(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["mean_r1"] is None for row in rows)
    assert read_jsonl(run / "history.jsonl") == rows


def test_strict_json_replaces_every_non_finite_number(tmp_path):
    value = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": "NaN", "e": 2}
    assert _strict(dumps(value)) == {"a": None, "b": [1.0, None, {"c": None}], "d": "NaN", "e": 2}
    assert _strict(write_json(tmp_path / "x.json", value).read_text()) == _strict(dumps(value))


def test_the_report_names_where_a_hugging_face_data_set_came_from(tmp_path):
    recipe = {"name": "hub-run", "anchor": "image", "pairs": [["image", "audio"]],
              "modalities": {"image": {"adapter": "toy", "head": {"type": "identity"}}, "audio": {"adapter": "toy"}},
              "data": {"source": "hf_dataset", "name": "org/pairs", "dataset_split": "train"}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "metrics.json").write_text(json.dumps({"counts": {"records": 4}}))
    report = render_report(tmp_path)
    assert "Source: `hf_dataset` (org/pairs, train)." in report
