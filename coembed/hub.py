"""Model folders on the Hugging Face Hub: find, download, upload, and the model card.

Built on ``huggingface_hub``'s helpers rather than its ``ModelHubMixin``: the
mixin passes ``config.json`` to ``__init__`` as keyword arguments and loads a
fixed ``model.safetensors``, while a coembed model validates a versioned,
nested config first and checks every head weight and encoder fingerprint
itself; overriding the mixin's hooks for that would leave nothing of it.

* :func:`download` is the only function that fetches a model. It calls
  :func:`huggingface_hub.snapshot_download` for the data files a model folder
  holds (:data:`DOWNLOAD_PATTERNS`; never ``.bin``, ``.pt`` or ``.py`` files),
  which also honours ``HF_HUB_OFFLINE`` and the cache. The folder it returns is
  then loaded exactly like a local folder.
* :func:`upload_folder` creates the repo and uploads a folder written by
  :meth:`~coembed.model.CoEmbedder.save_pretrained` in one commit.
* :func:`model_card` writes ``README.md``: Hub metadata (library, tags,
  data set, ``model-index`` results from ``metrics.json``), what the model
  does, how to load it, the recipe, the metrics table and the figures.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from coembed.model import CONFIG_NAME, NAMED_MODALITIES, WEIGHTS_NAME, ModelLoadError

if TYPE_CHECKING:
    from huggingface_hub import EvalResult, ModelCard

log = logging.getLogger(__name__)

CARD_NAME = "README.md"
RECIPE_NAME = "recipe.yaml"
METRICS_NAME = "metrics.json"
#: Figures of a run that go with the model (UMAP plots of the shared space).
FIGURE_GLOB = "umap*.png"
#: The files of a model folder that are downloaded; nothing else in a repo is fetched.
DOWNLOAD_PATTERNS = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, RECIPE_NAME, METRICS_NAME, FIGURE_GLOB]


def _version() -> str:
    from coembed import __version__

    return __version__


# ---------------------------------------------------------------------------------------
# finding and downloading
# ---------------------------------------------------------------------------------------


def locate_model(model_id: str | os.PathLike[str], *, revision: str | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, token: str | bool | None = None,
                 local_files_only: bool = False) -> tuple[Path, Path]:
    """``(model folder, record folder)`` for a local model or run folder, or a Hub repo id (downloaded)."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        return local_folders(path)
    repo_id = os.fspath(model_id)
    if path.exists() or isinstance(model_id, os.PathLike) or not is_repo_id(repo_id):
        raise ModelLoadError(f"{repo_id!r} is not a model folder, and not a Hugging Face Hub repo id ('user/name')")
    return local_folders(download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                  local_files_only=local_files_only))


def local_folders(path: Path) -> tuple[Path, Path]:
    """``(model folder, record folder)`` for a model folder or a run folder.

    The record folder holds the training record used for the model card: the
    run folder for a run (or a run's ``model/``), else the model folder itself.
    """
    if (path / CONFIG_NAME).is_file():
        is_run_model = path.name == "model" and (path.parent / RECIPE_NAME).is_file()
        return path, path.parent if is_run_model else path
    if (path / "model" / CONFIG_NAME).is_file():
        return path / "model", path
    raise ModelLoadError(f"{path} holds neither a coembed model ({CONFIG_NAME}) nor a run's model/{CONFIG_NAME}")


def is_repo_id(text: str) -> bool:
    """Whether ``text`` has the form of a Hugging Face Hub repo id (``name`` or ``owner/name``)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def download(repo_id: str, *, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
             token: str | bool | None = None, local_files_only: bool = False) -> Path:
    """Fetch the data files of the model repo ``repo_id`` into the Hugging Face cache; return the snapshot folder."""
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        folder = snapshot_download(repo_id, repo_type="model", revision=revision, cache_dir=cache_dir, token=token,
                                   local_files_only=local_files_only, allow_patterns=DOWNLOAD_PATTERNS,
                                   library_name="coembed", library_version=_version())
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(f"{repo_id!r} is not a local folder and not in the Hugging Face cache, and the Hub "
                             f"was not asked (HF_HUB_OFFLINE / local_files_only) or could not be reached: {exc}") from None
    except GatedRepoError:
        raise ModelLoadError(f"Hub repo {repo_id!r} is gated: accept its conditions on the Hub and pass a token") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{repo_id!r} is not a local folder, and the Hub has no model repo of that name "
                             "(or it is private: pass token=... or log in with `hf auth login`)") from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"Hub repo {repo_id!r} has no revision {revision!r}") from None
    except network_errors() as exc:
        raise ModelLoadError(f"could not download {repo_id!r} from the Hub: {type(exc).__name__}: {exc}") from None
    return Path(folder)


class HubError(RuntimeError):
    """The Hub could not be reached or refused a request; the message says which and why."""


def network_errors() -> tuple[type[BaseException], ...]:
    """Errors of the Hub client's HTTP stack (requests, httpx or httpx2, by huggingface_hub version)."""
    import importlib

    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    errors: list[type[BaseException]] = [HfHubHTTPError, OfflineModeIsEnabled, ConnectionError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def snapshot_download(repo_id: str, **kwargs: Any) -> str:
    """:func:`huggingface_hub.snapshot_download`: the one network call of loading (tests replace it)."""
    from huggingface_hub import snapshot_download as hub_snapshot_download

    return hub_snapshot_download(repo_id, **kwargs)


# ---------------------------------------------------------------------------------------
# uploading
# ---------------------------------------------------------------------------------------


def upload_folder(folder: Path, repo_id: str, *, private: bool | None = None, token: str | None = None,
                  commit_message: str | None = None) -> str:
    """Create the model repo ``repo_id`` if needed and upload ``folder`` in one commit; returns the repo URL."""
    from huggingface_hub import HfApi

    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    log.info("uploading %s to Hub repo %s", ", ".join(files), repo_id)
    api = HfApi(token=token, library_name="coembed", library_version=_version())
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                          commit_message=commit_message or f"Upload coembed model ({_version()})")
    except network_errors() as exc:
        raise HubError(f"could not upload to Hub repo {repo_id!r}: {type(exc).__name__}: {exc}") from None
    return str(url)


# ---------------------------------------------------------------------------------------
# the training record and the model card
# ---------------------------------------------------------------------------------------


def record_files(folder: Path) -> list[Path]:
    """The training record in ``folder``: recipe, metrics and figures that exist there."""
    files = [folder / name for name in (RECIPE_NAME, METRICS_NAME) if (folder / name).is_file()]
    return files + sorted(folder.glob(FIGURE_GLOB))


def copy_record(source: Path, target: Path) -> None:
    """Copy the training record of ``source`` (a run or model folder) into the model folder ``target``."""
    for file in record_files(source):
        dest = target / file.name
        if not (dest.exists() and dest.samefile(file)):
            shutil.copyfile(file, dest)


def write_model_card(folder: Path, config: dict[str, Any], repo_id: str | None = None) -> Path:
    """Write ``README.md`` for the model folder ``folder`` from its config and training record."""
    path = folder / CARD_NAME
    model_card(folder, config, repo_id).save(path)
    return path


def model_card(folder: Path, config: dict[str, Any], repo_id: str | None = None) -> ModelCard:
    """The model card of a model folder: Hub metadata plus what, how to load, recipe, metrics, figures."""
    from huggingface_hub import ModelCard, ModelCardData

    recipe_text = (folder / RECIPE_NAME).read_text(encoding="utf-8") if (folder / RECIPE_NAME).is_file() else None
    recipe = _yaml_mapping(recipe_text)
    metrics = _read_metrics(folder / METRICS_NAME)
    figures = [p.name for p in record_files(folder) if p.suffix == ".png"]
    name = repo_id.split("/")[-1] if repo_id else str(config.get("metadata", {}).get("recipe") or folder.name)
    specs: dict[str, dict[str, Any]] = config["modalities"]
    kinds = sorted({s["adapter"].partition("/")[0] for s in specs.values()} | set(specs))
    results = _eval_results(metrics, recipe)
    hub_datasets = [d.hub_id for d in (_data_ref(recipe.get("data")), *_zero_shot_data(recipe).values()) if d.hub_id]
    data = ModelCardData(
        library_name="coembed",
        pipeline_tag="feature-extraction",
        tags=["coembed", "co-embedding", *kinds],
        datasets=sorted(set(hub_datasets)) or None,
        model_name=name if results else None,
        eval_results=results or None,
    )
    body = _card_body(name, config, repo_id or f"path/to/{folder.name}", recipe, recipe_text, metrics, figures)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _yaml_mapping(text: str | None) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _read_metrics(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        log.warning("%s is not valid JSON (%s); the model card has no metrics", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class _DataRef:
    """A data set as the card names it; ``hub_id`` when it is a Hub data set."""

    name: str
    type: str
    hub_id: str | None = None
    config: str | None = None
    split: str | None = None


def _data_ref(data: Any) -> _DataRef:
    """The data set a recipe's ``data`` section (or a zero-shot set's) reads."""
    if not isinstance(data, dict):
        return _DataRef("unrecorded", "unrecorded")
    source = str(data.get("source", "manifest"))
    name, config = data.get("name"), data.get("config")
    split = data.get("split") if isinstance(data.get("split"), str) else None
    if source == "hf_dataset" and isinstance(name, str) and is_repo_id(name) and not Path(name).exists():
        return _DataRef(name, name, name, config if isinstance(config, str) else None, split)
    where = data.get("path") or name
    return _DataRef(f"{source}: {where}" if where else source, source, split=split)


def _zero_shot_data(recipe: dict[str, Any]) -> dict[str, _DataRef]:
    """The data of each ``eval.zero_shot`` set, by the set's name (as metrics.json names it)."""
    evaluation = recipe.get("eval") if isinstance(recipe.get("eval"), dict) else {}
    sets = evaluation.get("zero_shot") if isinstance(evaluation.get("zero_shot"), list) else []
    out = {}
    for entry in sets:
        if isinstance(entry, dict) and isinstance(entry.get("data"), dict):
            out[str(entry.get("name") or entry["data"].get("source", "manifest"))] = _data_ref(entry["data"])
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _retrieval(metrics: dict[str, Any]) -> dict[str, Any]:
    """Retrieval metrics of the selected heads: the final evaluation (with class level) or the validation's."""
    for key in ("retrieval", "validation"):
        if isinstance(metrics.get(key), dict) and metrics[key]:
            return metrics[key]
    return {}


def _zero_shot(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    sets = metrics.get("zero_shot") if isinstance(metrics.get("zero_shot"), dict) else {}
    return {name: values for name, values in sets.items() if isinstance(values, dict)}


def _retrieval_key(key: str) -> tuple[str, str]:
    """``"audio->image/class/R@1"`` -> ``("audio->image (class level)", "R@1")``."""
    if key == "mean_r1":
        return "mean over directions", "R@1"
    direction, *qualifiers, metric = key.split("/")
    if not qualifiers:
        return direction, metric
    return f"{direction} ({', '.join(QUALIFIERS.get(q, q) for q in qualifiers)})", metric


#: How the card words the qualifiers of retrieval metric keys.
QUALIFIERS = {"class": "class level", "chance": "chance"}
#: Retrieval metrics that go into ``model-index`` (the card's table has them all).
INDEX_RETRIEVAL = {"R@1": "recall_at_1", "R@5": "recall_at_5", "R@10": "recall_at_10"}
#: Zero-shot metrics that go into ``model-index``: metrics.json key -> (metric type, wording).
INDEX_ZERO_SHOT = {"top1": ("accuracy", "top-1 accuracy"), "top5": ("top_5_accuracy", "top-5 accuracy"),
                   "mean_per_class_top1": ("mean_per_class_accuracy", "mean per-class top-1 accuracy")}


def _eval_results(metrics: dict[str, Any], recipe: dict[str, Any]) -> list[EvalResult]:
    """``model-index`` entries: retrieval on the validation split and zero-shot accuracy (no chance levels)."""
    from huggingface_hub import EvalResult

    results = []
    data = _data_ref(recipe.get("data"))
    for key, value in _retrieval(metrics).items():
        label, metric = _retrieval_key(key)
        if "chance" in key.split("/") or metric not in INDEX_RETRIEVAL or not _finite(value):
            continue
        results.append(EvalResult(
            task_type="retrieval", task_name=f"cross-modal retrieval: {label}", dataset_type=data.type,
            dataset_name=data.name, dataset_config=data.config, dataset_split="validation",
            metric_type=INDEX_RETRIEVAL[metric], metric_name=f"{label} {metric}", metric_value=round(float(value), 4)))
    zero_data = _zero_shot_data(recipe)
    for set_name, values in _zero_shot(metrics).items():
        data = zero_data.get(set_name, _DataRef(set_name, set_name))
        for key, (metric_type, wording) in INDEX_ZERO_SHOT.items():
            if _finite(values.get(key)):
                results.append(EvalResult(
                    task_type="zero-shot-classification", task_name=f"zero-shot classification: {set_name}",
                    dataset_type=data.type, dataset_name=data.name, dataset_config=data.config,
                    dataset_split=data.split, metric_type=metric_type, metric_name=f"{set_name} {wording}",
                    metric_value=round(float(values[key]), 4)))
    return results


def _table(rows: dict[str, dict[str, float]]) -> list[str]:
    """A Markdown table: one row per key of ``rows``, one column per metric seen."""
    columns = list(dict.fromkeys(c for values in rows.values() for c in values))
    if not columns:
        return []
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, values in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{values[c]:.4g}" if c in values else "" for c in columns) + " |")
    return lines


def _local_weights_section(specs: dict[str, dict[str, Any]], load_ref: str) -> list[str]:
    """How to point the encoders at local copies, for modalities trained with weights from local files."""
    rows = []
    for m, spec in specs.items():
        if not str(spec.get("weights") or "").startswith(("sha256:", "folder-sha256:")):
            continue
        for option, value in spec["adapter_config"].items():
            if isinstance(value, str) and (os.path.isabs(value) or value.startswith(("~", "."))):
                rows.append((m, option, value, spec["weights"]))
    if not rows:
        return []
    overrides = ", ".join(f'"{m}": {{"{o}": "/path/to/your/copy"}}' for m, o, _, _ in rows)
    flags = " ".join(f"--adapter-option {m}.{o}=/path/to/your/copy" for m, o, _, _ in rows)
    lines = ["### Encoders trained with local weights", "",
             "These encoders were loaded from files on the training machine. Point them at your copy of the "
             "same weights (the content is checked, not the path):", ""]
    lines += [f"- {m}: option `{o}` was `{v}`, weights `{w}`" for m, o, v, w in rows]
    lines += ["", "```python", f'model = CoEmbedder.from_pretrained("{load_ref}", adapter_options={{{overrides}}})',
              "```", "", "```bash", f"coembed encode {load_ref} {flags} ...", "```", ""]
    return lines


def _metrics_section(metrics: dict[str, Any]) -> list[str]:
    lines = ["## Metrics", ""]
    retrieval: dict[str, dict[str, float]] = {}
    for key, value in _retrieval(metrics).items():
        if _finite(value):
            label, metric = _retrieval_key(key)
            retrieval.setdefault(label, {})[metric] = float(value)
    if retrieval:
        epoch, select = metrics.get("best_epoch"), metrics.get("select_metric")
        heads = f" with the heads of epoch {epoch}, the best by `{select}`" if epoch is not None and select else ""
        lines += ["### Retrieval", "",
                  f"On the validation split{heads}. R@k: the share of queries whose paired item ranks in the top k "
                  "among all validation items of the other modality; class level: any item of the query's class "
                  "counts; chance: a random ranking.", "", *_table(retrieval), ""]
    zero_shot = _zero_shot(metrics)
    if zero_shot:
        rows = {name: {k: float(v) for k, v in values.items() if _finite(v)} for name, values in zero_shot.items()}
        lines += ["### Zero-shot classification", "",
                  "Items of a labelled set classified against text prompts of its class names "
                  "(the recipe's `eval.zero_shot`).", "", *_table({k: v for k, v in rows.items() if v}), ""]
        lines += [f"- {name}: not evaluated ({values['error']})" for name, values in zero_shot.items()
                  if "error" in values]
        lines += [""] if any("error" in values for values in zero_shot.values()) else []
    if len(lines) == 2:
        lines += ["No metrics were recorded with this model.", ""]
    return lines


def _example(spec: dict[str, Any]) -> str:
    return {"image": "photo.jpg", "audio": "clip.wav", "text": "a dog barking"}.get(
        spec["adapter"].partition("/")[0], "...")


def _head_text(spec: dict[str, Any], output_dim: int) -> str:
    head = spec["head"]
    if head.get("type") == "identity":
        return "identity"
    return f"{head.get('type')} {spec['input_dim']} → {output_dim}"


def _card_body(name: str, config: dict[str, Any], load_ref: str, recipe: dict[str, Any], recipe_text: str | None,
               metrics: dict[str, Any], figures: list[str]) -> str:
    specs: dict[str, dict[str, Any]] = config["modalities"]
    anchor, dim = config["anchor"], config["output_dim"]
    pairs = config.get("metadata", {}).get("pairs") or recipe.get("pairs") or []
    trained = ""
    if recipe:
        pair_text = ", ".join("–".join(map(str, p)) for p in pairs if isinstance(p, (list, tuple)))
        trained = f" It was trained on {_data_ref(recipe.get('data')).name}" + (
            f" (pairs: {pair_text})." if pair_text else ".")
    lines = [
        f"# {name}",
        "",
        f"A **coembed** co-embedder: it maps {', '.join(f'**{m}**' for m in specs)} into one shared "
        f"{dim}-dimensional space, the space of its anchor modality **{anchor}** (`{specs[anchor]['adapter']}`). "
        "Every modality keeps its pretrained encoder frozen; only a small projection head per modality was "
        "trained, contrastively on paired data, so vectors of different modalities compare directly by cosine "
        f"similarity: cross-modal retrieval, zero-shot classification with text prompts, clustering.{trained}",
        "",
        "| modality | encoder (adapter) | encoder options | weights | head |",
        "|---|---|---|---|---|",
    ]
    for m, spec in specs.items():
        options = json.dumps(spec["adapter_config"], sort_keys=True)
        lines.append(f"| {m} | `{spec['adapter']}` | `{options}` | {spec['weights'] or 'n/a'} | "
                     f"{_head_text(spec, dim)} |")
    lines += [
        "",
        "This repository holds the heads (`heads.safetensors`) and their config (`config.json`); the frozen "
        "encoders are loaded by their own libraries, with the options above, on first use. Loading checks "
        "each encoder's fingerprint against the one its head was trained on.",
        "",
        "## How to use",
        "",
        "```bash",
        "pip install coembed",
        "```",
        "",
        "```python",
        "from coembed import CoEmbedder",
        "",
        f'model = CoEmbedder.from_pretrained("{load_ref}")',
        *(f'{m} = model.embed({m}=["{_example(spec)}"])' for m, spec in specs.items()),
        f"print(model.similarity({', '.join(list(specs)[:2])}))  # cosine similarities",
        "```",
        "",
    ]
    shell = [f'--{m} "{_example(spec)}"' for m, spec in specs.items() if m in NAMED_MODALITIES]
    if shell:
        out = "vectors.npy" if len(shell) == 1 else "vectors.npz"
        lines += ["From the shell:", "", "```bash", f"coembed encode {load_ref} {' '.join(shell)} --out {out}",
                  "```", ""]
    lines += _local_weights_section(specs, load_ref)
    lines += ["## Training recipe", ""]
    if recipe_text:
        lines += ["```yaml", recipe_text.rstrip(), "```", ""]
    else:
        lines += ["No recipe was recorded with this model.", ""]
    lines += _metrics_section(metrics)
    if figures:
        lines += ["## Figures", "", "UMAP views of the embedding spaces, from the training run.", ""]
        lines += [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(lines)
