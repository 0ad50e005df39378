"""The model card (``README.md`` of a model folder): Hub metadata and a page about the model.

The card is filled from the model's config and the training record saved with
it (:class:`~coembed.record.RunRecord`): Hub metadata (library, tags, data
sets, ``model-index`` results), what the model does, how to load it, the
recipe, the metrics with their chance levels, and the figures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from pydantic import ValidationError

from coembed import layout
from coembed.errors import AdapterError
from coembed.layout import looks_like_path
from coembed.metrics import CLASS_LEVEL, MEAN_R1, MetricKey
from coembed.model.folder import NAMED_MODALITIES, ModalitySpec, ModelConfig, record_files
from coembed.record import RunMetrics, RunRecord, read_record
from coembed.registry import get_adapter_class
from coembed.sources import DataDescription, describe_data

#: How the card words the qualifiers of retrieval metric keys.
QUALIFIERS = {CLASS_LEVEL: "class level", "chance": "chance"}
#: Retrieval metrics that go into ``model-index`` (the card's table has them all).
INDEX_RETRIEVAL = {"R@1": "recall_at_1", "R@5": "recall_at_5", "R@10": "recall_at_10"}
#: Zero-shot metrics that go into ``model-index``: metrics.json key -> (metric type, wording).
INDEX_ZERO_SHOT = {"top1": ("accuracy", "top-1 accuracy"), "top5": ("top_5_accuracy", "top-5 accuracy"),
                   "mean_per_class_top1": ("mean_per_class_accuracy", "mean per-class top-1 accuracy")}
#: The split of the training data the retrieval metrics were measured on.
VALIDATION_SPLIT = "validation"


def write_model_card(folder: Path, config: ModelConfig, repo_id: str | None = None) -> Path:
    """Write ``README.md`` for the model folder ``folder`` from its config and training record."""
    path = folder / layout.MODEL_CARD
    model_card(folder, config, repo_id).save(path)
    return path


def model_card(folder: Path, config: ModelConfig, repo_id: str | None = None) -> ModelCard:
    """The model card of a model folder: Hub metadata plus what, how to load, recipe, metrics, figures."""
    record = read_record(folder)
    figures = [p.name for p in record_files(folder) if p.suffix == ".png"]
    name = repo_id.split("/")[-1] if repo_id else str(config.metadata.get("recipe") or folder.name)
    kinds = sorted({s.kind for s in config.modalities.values()} | set(config.modalities))
    training_data, zero_shot_data = _data(record)
    results = _eval_results(record.metrics, training_data, zero_shot_data)
    hub_datasets = [d.hub_id for d in (training_data, *zero_shot_data.values()) if d is not None and d.hub_id]
    data = ModelCardData(
        library_name="coembed",
        pipeline_tag="feature-extraction",
        tags=["coembed", "co-embedding", *kinds],
        datasets=sorted(set(hub_datasets)) or None,
        model_name=name if results else None,
        eval_results=results or None,
    )
    body = _card_body(name, config, repo_id or f"path/to/{folder.name}", record, training_data, figures)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _data(record: RunRecord) -> tuple[DataDescription | None, dict[str, DataDescription]]:
    """The training data and each zero-shot set's data (by the set's name, as metrics.json names it)."""
    recipe = record.recipe
    if recipe is None:
        return None, {}
    return describe_data(recipe.data), {zs.name or zs.data.source: describe_data(zs.data)
                                        for zs in recipe.eval.zero_shot}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _retrieval_label(key: str) -> tuple[str, str] | None:
    """``"audio->image/class/R@1"`` -> ``("audio->image (class level)", "R@1")``; ``None`` for other keys."""
    if key == MEAN_R1:
        return "mean over directions", "R@1"
    parsed = MetricKey.parse(key)
    if parsed is None:
        return None
    qualifiers = [QUALIFIERS[q] for q, on in ((CLASS_LEVEL, parsed.level == CLASS_LEVEL), ("chance", parsed.chance))
                  if on]
    return (f"{parsed.direction} ({', '.join(qualifiers)})" if qualifiers else parsed.direction), parsed.name


def _eval_results(metrics: RunMetrics, training_data: DataDescription | None,
                  zero_shot_data: dict[str, DataDescription]) -> list[EvalResult]:
    """``model-index`` entries: retrieval on the validation split and zero-shot accuracy (no chance levels)."""
    results = []
    data = training_data or DataDescription("unrecorded")
    for key, value in metrics.headline_metrics.items():
        parsed, label = MetricKey.parse(key), _retrieval_label(key)
        if parsed is None or label is None or parsed.chance or parsed.name not in INDEX_RETRIEVAL or not _finite(value):
            continue
        results.append(EvalResult(
            task_type="retrieval", task_name=f"cross-modal retrieval: {label[0]}", dataset_type=data.hub_id or data.source,
            dataset_name=data.name, dataset_config=data.hub_config, dataset_split=VALIDATION_SPLIT,
            metric_type=INDEX_RETRIEVAL[parsed.name], metric_name=f"{label[0]} {parsed.name}",
            metric_value=round(float(value), 4)))
    for set_name, values in metrics.zero_shot_results().items():
        zs = zero_shot_data.get(set_name, DataDescription(set_name))
        for key, (metric_type, wording) in INDEX_ZERO_SHOT.items():
            if _finite(values.get(key)):
                results.append(EvalResult(
                    task_type="zero-shot-classification", task_name=f"zero-shot classification: {set_name}",
                    dataset_type=zs.hub_id or zs.source, dataset_name=zs.name, dataset_config=zs.hub_config,
                    dataset_split=zs.split, metric_type=metric_type, metric_name=f"{set_name} {wording}",
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


def local_weights_options(spec: ModalitySpec) -> dict[str, str]:
    """``{option: value}`` of the options that held local weights files when the model was trained."""
    try:
        cls = get_adapter_class(spec.adapter)
        adapter = cls(cls.Options(**spec.adapter_config))
    except (AdapterError, ValidationError):  # an adapter not installed here: judge by the values' form
        return {o: v for o, v in spec.adapter_config.items() if isinstance(v, str) and looks_like_path(v)}
    return {option: spec.adapter_config[option] for option in adapter.local_weights()}


def _local_weights_section(specs: dict[str, ModalitySpec], load_ref: str) -> list[str]:
    """How to point the encoders at local copies, for modalities trained with weights from local files."""
    rows = [(m, option, value, spec.weights) for m, spec in specs.items()
            if spec.weights.startswith(("sha256:", "folder-sha256:"))
            for option, value in local_weights_options(spec).items()]
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


def _metrics_section(metrics: RunMetrics) -> list[str]:
    lines = ["## Metrics", ""]
    retrieval: dict[str, dict[str, float]] = {}
    for key, value in metrics.headline_metrics.items():
        label = _retrieval_label(key)
        if label is not None and _finite(value):
            retrieval.setdefault(label[0], {})[label[1]] = float(value)
    if retrieval:
        epoch, select = metrics.best_epoch, metrics.select_metric
        heads = f" with the heads of epoch {epoch}, the best by `{select}`" if epoch is not None and select else ""
        lines += ["### Retrieval", "",
                  f"On the validation split{heads}. R@k: the share of queries whose paired item ranks in the top k "
                  "among all validation items of the other modality; class level: any item of the query's class "
                  "counts; chance: a random ranking.", "", *_table(retrieval), ""]
    results, errors = metrics.zero_shot_results(), metrics.zero_shot_errors()
    if results or errors:
        rows = {name: {k: float(v) for k, v in values.items() if _finite(v)} for name, values in results.items()}
        lines += ["### Zero-shot classification", "",
                  "Items of a labelled set classified against text prompts of its class names "
                  "(the recipe's `eval.zero_shot`).", "", *_table({k: v for k, v in rows.items() if v}), ""]
        lines += [f"- {name}: not evaluated ({error})" for name, error in errors.items()]
        lines += [""] if errors else []
    if len(lines) == 2:
        lines += ["No metrics were recorded with this model.", ""]
    return lines


def _example(spec: ModalitySpec) -> str:
    return {"image": "photo.jpg", "audio": "clip.wav", "text": "a dog barking"}.get(spec.kind, "...")


def _head_text(spec: ModalitySpec, output_dim: int) -> str:
    return "identity" if spec.head.type == "identity" else f"{spec.head.type} {spec.input_dim} → {output_dim}"


def _card_body(name: str, config: ModelConfig, load_ref: str, record: RunRecord,
               training_data: DataDescription | None, figures: list[str]) -> str:
    specs = config.modalities
    anchor, dim = config.anchor, config.output_dim
    recipe = record.recipe
    pairs = config.metadata.get("pairs") or (recipe.pairs if recipe is not None else [])
    trained = ""
    if training_data is not None:
        pair_text = ", ".join("–".join(map(str, p)) for p in pairs if isinstance(p, (list, tuple)))
        trained = f" It was trained on {training_data.name}" + (f" (pairs: {pair_text})." if pair_text else ".")
    lines = [
        f"# {name}",
        "",
        f"A **coembed** co-embedder: it maps {', '.join(f'**{m}**' for m in specs)} into one shared "
        f"{dim}-dimensional space, the space of its anchor modality **{anchor}** (`{specs[anchor].adapter}`). "
        "Every modality keeps its pretrained encoder frozen; only a small projection head per modality was "
        "trained, contrastively on paired data, so vectors of different modalities compare directly by cosine "
        f"similarity: cross-modal retrieval, zero-shot classification with text prompts, clustering.{trained}",
        "",
        "| modality | encoder (adapter) | encoder options | weights | head |",
        "|---|---|---|---|---|",
    ]
    for m, spec in specs.items():
        options = json.dumps(spec.adapter_config, sort_keys=True)
        lines.append(f"| {m} | `{spec.adapter}` | `{options}` | {spec.weights or 'n/a'} | {_head_text(spec, dim)} |")
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
    if record.recipe_text:
        lines += ["```yaml", record.recipe_text.rstrip(), "```", ""]
    else:
        lines += ["No recipe was recorded with this model.", ""]
    lines += _metrics_section(record.metrics)
    if figures:
        lines += ["## Figures", "", "UMAP views of the embedding spaces, from the training run.", ""]
        lines += [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(lines)
