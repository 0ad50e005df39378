"""The Hugging Face Hub, offline: loading a repo id, uploading a model folder, the model card.

Only the network calls are replaced: ``coembed.model.hub.snapshot_download`` for
downloads, ``HfApi.create_repo`` / ``HfApi.upload_folder`` for uploads. Every
Hugging Face cache points into the test's temporary folder.
"""

from __future__ import annotations

import importlib
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from huggingface_hub import HfApi, ModelCard, RepoUrl
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, Response, RevisionNotFoundError
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

import coembed.model.hub
from coembed import CoEmbedder, ModelLoadError
from coembed.cli import main
from coembed.model.hub import DOWNLOAD_PATTERNS
from plugins import VECTORS

RECIPE = """\
name: toy
anchor: anchor
modalities:
  anchor: {adapter: toy/vector, dim: 8}
  other: {adapter: toy/vector, dim: 4, seed: 1, head: {type: mlp, hidden_dim: 6}}
pairs: [[anchor, other]]
data: {source: generated, path: data/toy}
eval:
  zero_shot:
    - {name: sounds, modality: other, data: {source: hf_dataset, name: org/labelled-sounds, dataset_split: test}}
    - {name: broken, modality: other, data: {source: manifest, path: missing.csv}}
"""
METRICS = {
    "best_epoch": 3,
    "select_metric": "mean_r1",
    "validation": {"other->anchor/R@1": 0.5, "anchor->other/R@1": 0.25, "mean_r1": 0.375},
    "retrieval": {"other->anchor/R@1": 0.5, "other->anchor/R@5": 0.875, "other->anchor/mrr": float("nan"),
                  "other->anchor/chance/R@1": 0.0625, "other->anchor/class/R@1": 0.75, "anchor->other/R@1": 0.25},
    "zero_shot": {"sounds": {"top1": 0.6, "top5": 0.9, "chance/top1": 0.1, "items": 40.0},
                  "broken": {"error": "missing.csv not found"}},
}
MODEL_FILES = {"README.md", "config.json", "heads.safetensors", "metrics.json", "recipe.yaml", "umap_anchor_other.png"}


@pytest.fixture(autouse=True)
def hub_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every Hugging Face cache and the token file live in the test's folder."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home


@pytest.fixture
def run_dir(toy_model: CoEmbedder, tmp_path: Path) -> Path:
    """A run folder as ``coembed train`` and the evaluation leave it."""
    run = tmp_path / "run"
    toy_model.save_pretrained(run / "model")
    (run / "recipe.yaml").write_text(RECIPE)
    (run / "metrics.json").write_text(json.dumps(METRICS))
    Image.new("RGB", (8, 8), (10, 200, 30)).save(run / "umap_anchor_other.png")
    for junk in ("train.log", "history.jsonl", "bad_items.jsonl", "report.md"):
        (run / junk).write_text("not for the Hub\n")
    return run


class Boom:
    """Unpickling this creates ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def hostile_repo(toy_model: CoEmbedder, folder: Path, marker: Path) -> Path:
    """A model folder that also ships pickles and Python code which would leave ``marker`` if run."""
    toy_model.save_pretrained(folder)
    for name in ("pytorch_model.bin", "model.pt", "heads.pkl"):
        (folder / name).write_bytes(pickle.dumps(Boom(marker)))
    (folder / "modeling_coembed.py").write_text(f"open({str(marker)!r}, 'w')\n")
    (folder / "coembed_remote_code").mkdir()
    (folder / "coembed_remote_code" / "__init__.py").write_text(f"open({str(marker)!r}, 'w')\n")
    return folder


def fake_hub(remote: Path, calls: list[tuple[str, dict[str, Any]]]) -> Any:
    """A ``snapshot_download`` that serves ``remote`` into a Hub-cache-shaped snapshot, honouring allow_patterns."""
    from huggingface_hub import constants

    def snapshot_download(repo_id: str, **kwargs: Any) -> str:
        calls.append((repo_id, kwargs))
        cache = Path(kwargs.get("cache_dir") or constants.HF_HUB_CACHE)
        snapshot = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
        files = [p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=kwargs.get("allow_patterns"),
                                        ignore_patterns=kwargs.get("ignore_patterns")):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_bytes((remote / name).read_bytes())
        return str(snapshot)

    return snapshot_download


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model load must never unpickle anything")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------


def test_hub_id_downloads_the_model_files_and_loads_them_like_a_folder(
        toy_model: CoEmbedder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_unpickling: None) -> None:
    marker = tmp_path / "executed"
    hostile_repo(toy_model, tmp_path / "remote", marker)
    calls: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(coembed.model.hub, "snapshot_download", fake_hub(tmp_path / "remote", calls))

    loaded = CoEmbedder.from_pretrained("user/toy-model", "cpu", revision="v1", token="hf_token",
                                        cache_dir=tmp_path / "cache")
    ((repo_id, kwargs),) = calls
    assert repo_id == "user/toy-model"
    assert kwargs["revision"] == "v1" and kwargs["token"] == "hf_token" and kwargs["repo_type"] == "model"
    assert kwargs["cache_dir"] == tmp_path / "cache" and kwargs["local_files_only"] is False
    assert kwargs["allow_patterns"] == DOWNLOAD_PATTERNS
    snapshot = tmp_path / "cache" / "models--user--toy-model" / "snapshots" / ("0" * 40)
    assert sorted(p.name for p in snapshot.iterdir()) == ["README.md", "config.json", "heads.safetensors"]
    assert loaded.record_dir == snapshot
    assert loaded.config() == toy_model.config()
    assert torch.equal(loaded.embed(other=VECTORS), toy_model.embed(other=VECTORS))
    assert not marker.exists() and "modeling_coembed" not in sys.modules


def test_loading_reads_only_the_config_and_the_safetensors(
        toy_model: CoEmbedder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_unpickling: None) -> None:
    marker = tmp_path / "executed"
    remote = hostile_repo(toy_model, tmp_path / "remote", marker)
    # even a download that ignored the patterns and brought every file along
    monkeypatch.setattr(coembed.model.hub, "snapshot_download", lambda repo_id, **kwargs: str(remote))
    for source in ("user/toy-model", remote):
        loaded = CoEmbedder.from_pretrained(source, "cpu")
        assert torch.equal(loaded.embed(other=VECTORS), toy_model.embed(other=VECTORS))
    assert not marker.exists() and "modeling_coembed" not in sys.modules and "coembed_remote_code" not in sys.modules


def test_offline_mode_loads_from_the_hub_cache(toy_model: CoEmbedder, tmp_path: Path) -> None:
    """The real ``snapshot_download``, with HF_HUB_OFFLINE=1 (conftest): a cached repo loads, others say why not."""
    commit = "1" * 40
    cache = tmp_path / "cache"
    repo = cache / "models--user--toy-model"
    toy_model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    loaded = CoEmbedder.from_pretrained("user/toy-model", "cpu", cache_dir=cache)
    assert torch.equal(loaded.embed(other=VECTORS), toy_model.embed(other=VECTORS))
    with pytest.raises(ModelLoadError, match="'user/other-model' is not a local folder and not in the Hugging Face "
                                             "cache.*HF_HUB_OFFLINE"):
        CoEmbedder.from_pretrained("user/other-model", cache_dir=cache)


def _http_error(cls: type[Exception]) -> Exception:
    http = importlib.import_module(Response.__module__.partition(".")[0])  # the HTTP library huggingface_hub uses
    return cls("nope", response=Response(404, request=http.Request("GET", "https://huggingface.co/api/models/u/m")))


@pytest.mark.parametrize(("error", "message"), [
    (RepositoryNotFoundError, "the Hub has no model repo of that name.*private: pass token"),
    (GatedRepoError, "is gated"),
    (RevisionNotFoundError, "has no revision 'v9'"),
])
def test_hub_errors_become_clear_messages(monkeypatch: pytest.MonkeyPatch, error: type[Exception],
                                          message: str) -> None:
    def failing(repo_id: str, **kwargs: Any) -> str:
        raise _http_error(error)

    monkeypatch.setattr(coembed.model.hub, "snapshot_download", failing)
    with pytest.raises(ModelLoadError, match=message):
        CoEmbedder.from_pretrained("user/toy-model", revision="v9")


def test_neither_a_folder_nor_a_repo_id(tmp_path: Path) -> None:
    (tmp_path / "file.json").write_text("{}")
    for bad in (tmp_path / "missing", tmp_path / "file.json", "./missing/model", "a/b/c"):
        with pytest.raises(ModelLoadError, match="is not a model folder, and not a Hugging Face Hub repo id"):
            CoEmbedder.from_pretrained(bad)


# ---------------------------------------------------------------------------------------
# uploading
# ---------------------------------------------------------------------------------------


@pytest.fixture
def fake_upload(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace the two Hub calls of an upload; capture what they were given and every file sent."""
    sent: dict[str, Any] = {}

    def create_repo(self: HfApi, repo_id: str, **kwargs: Any) -> RepoUrl:
        sent["create_repo"] = {"repo_id": repo_id, "token": self.token, **kwargs}
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self: HfApi, *, repo_id: str, folder_path: str | Path, **kwargs: Any) -> None:
        folder = Path(folder_path)
        sent["upload_folder"] = {"repo_id": repo_id, "token": self.token, "folder": folder, **kwargs}
        sent["files"] = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return sent


def uploaded_model(sent: dict[str, Any], folder: Path) -> CoEmbedder:
    """Write the files that were sent to ``folder`` and load them: what goes up must load."""
    folder.mkdir()
    for name, content in sent["files"].items():
        (folder / name).write_bytes(content)
    return CoEmbedder.from_pretrained(folder, "cpu")


def test_cli_push_uploads_a_run_with_its_card(toy_model: CoEmbedder, run_dir: Path, tmp_path: Path,
                                              fake_upload: dict[str, Any]) -> None:
    result = CliRunner().invoke(main, ["push", str(run_dir), "user/toy-model", "--private", "--token", "hf_secret",
                                       "--message", "first model"])
    assert result.exit_code == 0, result.output
    assert f"pushed {run_dir} to https://huggingface.co/user/toy-model" in result.output

    assert fake_upload["create_repo"] == {"repo_id": "user/toy-model", "token": "hf_secret", "private": True,
                                          "exist_ok": True, "repo_type": "model"}
    upload = fake_upload["upload_folder"]
    assert upload["repo_id"] == "user/toy-model" and upload["token"] == "hf_secret"
    assert upload["repo_type"] == "model" and upload["commit_message"] == "first model"
    assert not upload["folder"].exists()  # a temporary folder, gone after the upload
    files = fake_upload["files"]
    assert set(files) == MODEL_FILES
    for name in ("recipe.yaml", "metrics.json", "umap_anchor_other.png"):
        assert files[name] == (run_dir / name).read_bytes(), name
    assert files["heads.safetensors"] == (run_dir / "model" / "heads.safetensors").read_bytes()
    assert json.loads(files["config.json"]) == toy_model.config()

    card = ModelCard(files["README.md"].decode())
    meta = card.data.to_dict()
    assert meta["library_name"] == "coembed" and meta["pipeline_tag"] == "feature-extraction"
    assert set(meta["tags"]) == {"coembed", "co-embedding", "toy", "anchor", "other"}
    assert meta["datasets"] == ["org/labelled-sounds"]  # the generated training data is not on the Hub
    (index,) = meta["model-index"]
    assert index["name"] == "toy-model"
    values = {m["name"]: (m["type"], m["value"]) for r in index["results"] for m in r["metrics"]}
    assert values == {"other->anchor R@1": ("recall_at_1", 0.5), "other->anchor R@5": ("recall_at_5", 0.875),
                      "other->anchor (class level) R@1": ("recall_at_1", 0.75),
                      "anchor->other R@1": ("recall_at_1", 0.25),
                      "sounds top-1 accuracy": ("accuracy", 0.6), "sounds top-5 accuracy": ("top_5_accuracy", 0.9)}
    result_of = {r["task"]["name"]: r for r in index["results"]}
    retrieval = result_of["cross-modal retrieval: other->anchor"]
    assert retrieval["task"]["type"] == "retrieval"
    assert retrieval["dataset"] == {"name": "generated: data/toy", "type": "generated", "split": "validation"}
    zero_shot = result_of["zero-shot classification: sounds"]
    assert zero_shot["task"]["type"] == "zero-shot-classification"
    assert zero_shot["dataset"] == {"name": "org/labelled-sounds", "type": "org/labelled-sounds", "split": "test"}

    body = card.text
    for expected in ("# toy-model", "**anchor**", "`toy/vector`", "It was trained on generated: data/toy",
                     "## How to use", 'model = CoEmbedder.from_pretrained("user/toy-model")',
                     "other = model.embed(other=", "## Training recipe", "```yaml\n" + RECIPE.rstrip() + "\n```",
                     "## Metrics", "with the heads of epoch 3, the best by `mean_r1`", "| | R@1 | R@5 |",
                     "| other->anchor | 0.5 | 0.875 |", "| other->anchor (chance) | 0.0625 |  |",
                     "| other->anchor (class level) | 0.75 |  |", "### Zero-shot classification",
                     "| | top1 | top5 | chance/top1 | items |", "| sounds | 0.6 | 0.9 | 0.1 | 40 |",
                     "- broken: not evaluated (missing.csv not found)",
                     "![umap_anchor_other.png](umap_anchor_other.png)"):
        assert expected in body, expected
    assert torch.equal(uploaded_model(fake_upload, tmp_path / "down").embed(other=VECTORS),
                       toy_model.embed(other=VECTORS))


def test_push_to_hub_from_python_keeps_the_record_of_a_model_folder(toy_model: CoEmbedder, run_dir: Path,
                                                                    tmp_path: Path, fake_upload: dict[str, Any]) -> None:
    standalone = CoEmbedder.from_pretrained(run_dir, "cpu").save_pretrained(tmp_path / "standalone")
    assert {p.name for p in standalone.iterdir()} == MODEL_FILES  # the record travels with the model

    url = CoEmbedder.from_pretrained(standalone, "cpu").push_to_hub("org/other-name")
    assert url == "https://huggingface.co/org/other-name"
    assert fake_upload["create_repo"]["private"] is None and fake_upload["create_repo"]["token"] is None
    assert set(fake_upload["files"]) == MODEL_FILES
    assert 'from_pretrained("org/other-name")' in fake_upload["files"]["README.md"].decode()


def test_push_of_a_bare_model_sends_a_plain_card(toy_model: CoEmbedder, fake_upload: dict[str, Any]) -> None:
    toy_model.push_to_hub("user/bare")
    assert set(fake_upload["files"]) == {"README.md", "config.json", "heads.safetensors"}
    card = ModelCard(fake_upload["files"]["README.md"].decode())
    assert "model-index" not in card.data.to_dict() and card.data.library_name == "coembed"
    assert "No recipe was recorded" in card.text and "No metrics were recorded" in card.text
    assert "## Figures" not in card.text


def test_card_names_a_hub_training_data_set(toy_model: CoEmbedder, tmp_path: Path) -> None:
    record = tmp_path / "record"
    record.mkdir()
    recipe = yaml.safe_load(RECIPE) | {"data": {"source": "hf_dataset", "name": "org/pairs", "config": "small"}}
    (record / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (record / "metrics.json").write_text(json.dumps({"validation": METRICS["validation"]}))
    folder = toy_model.save_pretrained(tmp_path / "model", run_dir=record, repo_id="user/toy")
    meta = ModelCard.load(folder / "README.md").data.to_dict()
    assert meta["datasets"] == ["org/labelled-sounds", "org/pairs"]
    dataset = meta["model-index"][0]["results"][0]["dataset"]
    assert dataset == {"name": "org/pairs", "type": "org/pairs", "config": "small", "split": "validation"}


def test_push_fails_clearly_offline(run_dir: Path) -> None:
    """No replacement here: with HF_HUB_OFFLINE=1 huggingface_hub itself refuses, and the CLI says so."""
    result = CliRunner().invoke(main, ["push", str(run_dir), "user/toy-model", "--token", "hf_x"])
    assert result.exit_code == 2 and "offline mode is enabled" in result.output


def test_push_refuses_a_folder_that_would_not_load(run_dir: Path, fake_upload: dict[str, Any]) -> None:
    (run_dir / "model" / "heads.safetensors").write_bytes(b"garbage")
    result = CliRunner().invoke(main, ["push", str(run_dir), "user/toy-model"])
    assert result.exit_code == 2 and "not a readable safetensors file" in result.output
    assert fake_upload == {}

