"""The ``coembed`` command line."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
import numpy as np
from pydantic import ValidationError
from tqdm import tqdm

from coembed.adapter_check import check_adapter
from coembed.config import DataConfig, ExtractionConfig, ZeroShotConfig, apply_overrides
from coembed.errors import (AdapterError, BadItem, HubError, ModelLoadError, RecipeError, TooFewPairs,
                            TooManyBadItems)
from coembed.evaluation import EvaluationData, retrieval_on_data
from coembed.layout import METRICS, REPORT, retrieval_file, run_folder
from coembed.metrics import headline
from coembed.model import CoEmbedder
from coembed.plots import draw_run_figures, plot_zero_shot
from coembed.prompts import TOP_K
from coembed.recipe import load_recipe
from coembed.record import read_metrics, write_json, write_metrics
from coembed.registry import available_adapters, describe_adapters
from coembed.report import retrieval_tables, write_report
from coembed.run import embed_recipe, train_recipe
from coembed.version import __version__
from coembed.zeroshot import run_zero_shot

SET_HELP = "Override a recipe value, e.g. --set train.epochs=5 (repeatable; values are YAML)."
ADAPTER_OPTION_HELP = ("Set an option of a modality's encoder for this load, e.g. --adapter-option "
                       "audio.weights=/data/vggish.pth to use this machine's copy of the weights the model was "
                       "trained with (repeatable; values are YAML).")


class _TqdmLogHandler(logging.Handler):
    """Console log lines printed above the progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _fail(message: str) -> NoReturn:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(2)


def _adapter_options(items: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``--adapter-option MODALITY.OPTION=VALUE`` items as ``CoEmbedder.from_pretrained(adapter_options=...)``."""
    for item in items:
        key, equals, _ = item.partition("=")
        modality, _, option = key.strip().partition(".")
        if not (equals and modality and option) or "." in option:
            _fail(f"--adapter-option takes MODALITY.OPTION=VALUE, e.g. audio.weights=/data/vggish.pth (got {item!r})")
    return apply_overrides({}, list(items))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="coembed")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """Co-embed modalities: frozen encoders, cached embeddings, projection heads into one anchor space."""
    console = _TqdmLogHandler()
    console.setLevel(logging.DEBUG if verbose else logging.INFO)  # per-epoch lines are DEBUG: train.log has them
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if not verbose:  # libraries that log to the root logger (open_clip) speak only when it matters
        console.addFilter(lambda r: r.name.startswith("coembed") or r.levelno >= logging.WARNING)
    root = logging.getLogger()
    root.addHandler(console)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # third-party chatter stays at warnings unless asked for
    for name in ("httpx", "urllib3", "huggingface_hub", "datasets", "sentence_transformers", "open_clip"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the run here instead of <output_dir>/<name>-<time>.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def train(recipe: Path, overrides: tuple[str, ...], run_dir: Path | None, no_progress: bool) -> None:
    """Train the heads a RECIPE describes; writes a run folder (model, metrics, log)."""
    try:
        parsed = load_recipe(recipe, list(overrides))
    except (RecipeError, AdapterError) as exc:
        _fail(str(exc))
    try:
        result = train_recipe(parsed, run_dir=run_dir, progress=not no_progress)
    except (RecipeError, AdapterError, TooManyBadItems, TooFewPairs) as exc:
        _fail(str(exc))
    if result is None:  # under torchrun, a process other than 0: process 0 reports the run
        return
    click.echo(f"best epoch {result.metrics['best_epoch']}: {headline(result.metrics['validation'])}")
    click.echo(f"run folder: {result.run_dir}")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--engine", type=click.Choice(["local", "ray"]), default=None,
              help="Where the encoders run [default: the recipe's extraction.engine, local unless set].")
@click.option("--address", default=None, metavar="ADDR",
              help="The Ray cluster to join, e.g. auto or ray://head:10001 (the Ray engine) [default: "
                   "extraction.ray.address; none: a local Ray on this machine].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the summary here instead of <output_dir>/<name>-embed-<time>.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def embed(recipe: Path, engine: str | None, address: str | None, overrides: tuple[str, ...], run_dir: Path | None,
          no_progress: bool) -> None:
    """Run only the extraction stage of a RECIPE: fill the embedding store, report bad items.

    A later `coembed train` of the recipe reads the filled store and encodes nothing again. Writes
    recipe.yaml, embed.log, bad_items.jsonl and extraction.json into a folder.
    """
    if address is not None and engine == "local":
        _fail("--address is the Ray cluster to join: it needs --engine ray")
    extra = [f"extraction.engine={engine or 'ray'}"] if engine or address is not None else []
    extra += [f"extraction.ray.address={address}"] if address is not None else []
    try:
        parsed = load_recipe(recipe, [*overrides, *extra])
        result = embed_recipe(parsed, run_dir=run_dir, progress=not no_progress)
    except (RecipeError, AdapterError, TooManyBadItems) as exc:
        _fail(str(exc))
    click.echo("stored: " + ", ".join(f"{m} {stats['items'] - stats['bad']} of {stats['items']}"
                                      for m, stats in result.summary["extraction"].items()))
    click.echo(f"embed folder: {result.run_dir}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--check", "check_key", metavar="NAME", default=None,
              help="Check one adapter (modality/name, or a name only one adapter has) against the adapter "
                   "contract on items it makes itself; exits non-zero naming each rule it breaks.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="An option of the adapter --check creates, e.g. --option weights=none (repeatable; values are YAML).")
def modalities(as_json: bool, check_key: str | None, options: tuple[str, ...]) -> None:
    """List every registered modality adapter, or check one (--check)."""
    if check_key is not None:
        _check_modality(check_key, options, as_json)
        return
    if options:
        _fail("--option applies to the adapter of --check")
    rows = describe_adapters()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = ("ADAPTER", "MODALITY", "NAME", "DIM", "WEIGHTS (default)", "FROM")
    table = [header] + [(r["key"], r["modality"], r["name"], "?" if r.get("dim") is None else str(r["dim"]),
                         r.get("weights", "(adapter failed to load)"), r["distribution"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    notes = [(r["key"], r.get("error") or r.get("note")) for r in rows if r.get("error") or r.get("note")]
    for key, text in notes:
        click.echo(f"\n{key}: {text}")


def _check_modality(name: str, option_items: tuple[str, ...], as_json: bool) -> None:
    """``coembed modalities --check NAME``: print every rule of :func:`check_adapter` and fail on any broken."""
    known = available_adapters()
    key = name
    if "/" not in name:
        matches = [k for k, info in known.items() if info.name == name]
        if len(matches) != 1:
            _fail(f"--check {name!r}: " + (f"several adapters have that name ({', '.join(matches)}); give modality/name"
                                            if matches else f"no adapter of that name; registered: {', '.join(known)}"))
        key = matches[0]
    try:
        options = apply_overrides({}, list(option_items))
    except RecipeError as exc:
        _fail(f"--option: {exc}")
    report = check_adapter(key, options)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        given = f" with {options}" if options else " with its default options"
        click.echo(f"checking {key} (from {report.distribution}){given}")
        width = max(len(r.rule) for r in report.results)
        for r in report.results:
            click.echo(f"  {r.outcome.upper():4}  {r.rule.ljust(width)}  {r.detail}")
    if not report.ok:
        _fail(f"adapter {key} from {report.distribution} breaks: {', '.join(report.broken)}")
    if not as_json:
        click.echo(f"{key} keeps every rule checked")


@main.command("check")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def check(recipe: Path, overrides: tuple[str, ...]) -> None:
    """Validate a RECIPE (keys, values, adapters) without running it; print it resolved."""
    try:
        parsed = load_recipe(recipe, list(overrides))
    except RecipeError as exc:
        _fail(str(exc))
    click.echo(parsed.to_yaml(), nl=False)


@main.command()
@click.argument("model")
@click.option("--image", "images", multiple=True, metavar="PATH", help="An image file (repeatable).")
@click.option("--audio", "audios", multiple=True, metavar="PATH",
              help="An audio or video file, or a .npy array of samples with --sample-rate (repeatable).")
@click.option("--text", "texts", multiple=True, metavar="TEXT", help="A text (repeatable).")
@click.option("--sample-rate", type=click.IntRange(min=1), default=None, help="Sample rate of .npy audio arrays.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file: .npy for one modality, .npz (one array per modality) for several "
                   "[default: vectors.npy or vectors.npz].")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: CUDA when available].")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) when MODEL is a repo id.")
@click.option("--adapter-option", "adapter_options", multiple=True, metavar="MODALITY.OPTION=VALUE",
              help=ADAPTER_OPTION_HELP)
def encode(model: str, images: tuple[str, ...], audios: tuple[str, ...], texts: tuple[str, ...],
           sample_rate: int | None, out: Path | None, device: str | None, batch_size: int,
           revision: str | None, adapter_options: tuple[str, ...]) -> None:
    """Embed inputs with MODEL (a model folder, a run folder or a Hub repo id) and save the vectors.

    Vectors are L2-normalised rows in the model's shared space, in the order given.
    """
    inputs: dict[str, list[str | np.ndarray]] = {m: list(v) for m, v in (("image", images), ("audio", audios), ("text", texts)) if v}
    if not inputs:
        _fail("nothing to encode: give --image, --audio and/or --text")
    suffix = ".npy" if len(inputs) == 1 else ".npz"
    out = out or Path(f"vectors{suffix}")
    if out.suffix not in {".npy", ".npz"}:
        out = out.with_name(out.name + suffix)
    if out.suffix == ".npy" and len(inputs) > 1:
        _fail(f"{len(inputs)} modalities need an .npz output (one array per modality), got --out {out}")
    if "audio" in inputs:
        try:
            inputs["audio"] = [np.load(p, allow_pickle=False) if p.endswith(".npy") else p for p in inputs["audio"]]
        except (OSError, ValueError) as exc:
            _fail(f"cannot read an audio array: {exc}")
    try:
        embedder = CoEmbedder.from_pretrained(model, device, revision=revision,
                                              adapter_options=_adapter_options(adapter_options))
        arrays = {m: embedder.embed(**{m: items}, sample_rate=sample_rate if m == "audio" else None,
                                    batch_size=batch_size, as_numpy=True) for m, items in inputs.items()}
    except (ModelLoadError, AdapterError, BadItem, ValueError) as exc:
        _fail(str(exc))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, next(iter(arrays.values())))
    else:
        np.savez(out, **arrays)
    for m, vectors in arrays.items():
        click.echo(f"{m}: {vectors.shape[0]} x {vectors.shape[1]}")
    click.echo(f"wrote {out}")


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private (an existing repo keeps its visibility).")
@click.option("--token", default=None, help="Hub token [default: HF_TOKEN or the stored login].")
@click.option("--message", default=None, help="Commit message.")
def push(path: Path, repo_id: str, private: bool, token: str | None, message: str | None) -> None:
    """Upload a trained model to the Hugging Face Hub repo REPO_ID, with a model card.

    PATH is a run folder (its model/, recipe, metrics and UMAP figures go up) or a model folder.
    """
    try:
        model = CoEmbedder.from_pretrained(path, "cpu")
        url = model.push_to_hub(repo_id, private=private or None, token=token, commit_message=message)
    except (ModelLoadError, HubError) as exc:
        _fail(str(exc))
    click.echo(f"pushed {path} to {url}")


# ---------------------------------------------------------------------------------------
# evaluation, figures and reports
# ---------------------------------------------------------------------------------------


def _eval_data_options(command: Callable[..., None]) -> Callable[..., None]:
    """Options shared by the ``eval`` commands: the model and where the evaluation data comes from."""
    options = [
        click.argument("model"),
        click.option("--data", "data_path", required=True, help="The data: an ESC-50 folder, a manifest file "
                     "(CSV/JSONL) or a folder of videos."),
        click.option("--layout", default="manifest", show_default=True,
                     help="The data source reading --data: esc50, manifest, video_folder (or any registered one)."),
        click.option("--folds", default=None, metavar="1,2,...", help="esc50: the folds to read [default: all]."),
        click.option("--split", "splits", multiple=True, metavar="NAME",
                     help="video_folder: keep CSV rows of this split, e.g. --split test (repeatable)."),
        click.option("--label-column", default=None, help="manifest: the label column [default: label]."),
        click.option("--column", "columns", multiple=True, metavar="MODALITY=COLUMN",
                     help="The data column holding a modality [default: the modality's name] (repeatable)."),
        click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
                     help="Any other option of the data source, e.g. --option csv=vggsound.csv (values are YAML)."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Folder for the results [default: the run folder when MODEL is one, else here]."),
        click.option("--cache-dir", default=None, help="Embedding store root [default: ~/.cache/coembed/embeddings]."),
        click.option("--device", default=None, help="cpu, cuda, ... [default: CUDA when available]."),
        click.option("--adapter-option", "adapter_options", multiple=True, metavar="MODALITY.OPTION=VALUE",
                     help=ADAPTER_OPTION_HELP),
        click.option("--no-progress", is_flag=True, help="Hide progress bars."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _eval_setup(model: str, data_path: str, layout: str, folds: str | None, splits: tuple[str, ...],
                label_column: str | None, columns: tuple[str, ...], options: tuple[str, ...],
                cache_dir: str | None, device: str | None, adapter_options: tuple[str, ...]
                ) -> tuple[CoEmbedder, EvaluationData]:
    """The loaded model and the data to evaluate it on, as the options of an ``eval`` command say."""
    if folds and not all(f.strip().isdigit() for f in folds.split(",")):
        _fail(f"--folds takes fold numbers like 1,2 (got {folds!r})")
    if any("=" not in c for c in columns):
        _fail("--column takes MODALITY=COLUMN")
    try:
        source_options = apply_overrides({}, list(options))
        if folds:
            source_options["folds"] = [int(f) for f in folds.split(",")]
        if splits:
            source_options["csv_splits"] = list(splits)
        if label_column:
            source_options["label_column"] = label_column
        data = DataConfig.model_validate({"source": layout, "path": data_path, **source_options})
        embedder = CoEmbedder.from_pretrained(model, device, adapter_options=_adapter_options(adapter_options))
    except (RecipeError, ModelLoadError) as exc:
        _fail(str(exc))
    except ValidationError as exc:
        _fail(f"invalid data options: {exc}")
    column_map = tuple(tuple(c.split("=", 1)) for c in columns)
    return embedder, EvaluationData(data, ExtractionConfig(cache_dir=cache_dir), column_map, Path.cwd())  # type: ignore[arg-type]


def _refresh_run(run_dir: Path, section: str, name: str, values: dict[str, float]) -> None:
    """Record new evaluation results in a run's metrics.json and rewrite its report when it has one."""
    if (run_dir / METRICS).is_file():
        metrics = read_metrics(run_dir)
        getattr(metrics, section)[name] = values
        write_metrics(run_dir, metrics)
    if (run_dir / REPORT).is_file():
        write_report(run_dir)


@main.group("eval")
def eval_group() -> None:
    """Evaluate a trained model: zero-shot classification, retrieval."""


@eval_group.command("zero-shot")
@_eval_data_options
@click.option("--modality", default="audio", show_default=True, help="The modality whose items are classified.")
@click.option("--text-modality", default=None, help="The modality reading the prompts [default: text].")
@click.option("--templates", default=None, metavar="SET|FILE",
              help="A built-in template set (plain, audio, image) or a file with one template per line, '{}' "
                   "standing for the class name [default: the set for the modality].")
@click.option("--name", default=None, help="Name of the results [default: the layout].")
def zero_shot(model: str, data_path: str, layout: str, folds: str | None, splits: tuple[str, ...],
              label_column: str | None, columns: tuple[str, ...], options: tuple[str, ...], out: Path | None,
              cache_dir: str | None, device: str | None, adapter_options: tuple[str, ...], no_progress: bool,
              modality: str, text_modality: str | None, templates: str | None, name: str | None) -> None:
    """Zero-shot classification with MODEL (a run folder, a model folder or a Hub repo id).

    Labelled items of one modality (e.g. ESC-50 clips) are matched against their class names,
    put into prompt templates and embedded by the model's text side. Prints top-1 and top-5
    accuracy with chance levels; writes zeroshot-<name>.json and a confusion-matrix figure.
    """
    embedder, evaluation = _eval_setup(model, data_path, layout, folds, splits, label_column, columns, options,
                                       cache_dir, device, adapter_options)
    template_list: str | list[str] | None = templates
    if templates and Path(templates).is_file():
        template_list = [line.strip() for line in Path(templates).read_text().splitlines() if line.strip()]
    run_dir = run_folder(model)
    out = out or run_dir or Path.cwd()
    try:
        config = ZeroShotConfig(name=name, modality=modality, text_modality=text_modality, templates=template_list,
                                column=dict(evaluation.columns).get(modality), data=evaluation.data)
        result = run_zero_shot(embedder, config, extraction=evaluation.extraction, base_dir=evaluation.base_dir,
                               progress=not no_progress)
    except (RecipeError, AdapterError, TooManyBadItems, ValueError) as exc:
        _fail(str(exc))
    result.save(out)
    plot_zero_shot(result, out)
    if run_dir is not None and out == run_dir:
        _refresh_run(run_dir, "zero_shot", result.name, result.metrics)
    m = result.metrics
    click.echo(f"{result.name}: {int(m['items'])} {result.modality} items, {int(m['classes'])} classes, "
               f"{len(result.templates)} templates")
    click.echo(f"  top-1 {m['top1']:.4f}  (chance {m['chance/top1']:.4f}, majority {m['majority/top1']:.4f})")
    click.echo(f"  top-{TOP_K} {m[f'top{TOP_K}']:.4f}  (chance {m[f'chance/top{TOP_K}']:.4f})")
    click.echo(f"  mean per-class top-1 {m['mean_per_class_top1']:.4f}")
    click.echo(f"wrote {out / result.json_name} and {out / result.figure_name}")


@eval_group.command("retrieval")
@_eval_data_options
@click.option("--pair", "pairs", multiple=True, metavar="A,B",
              help="A pair type to evaluate, e.g. --pair audio,text (repeatable) [default: the pair types the "
                   "model was trained on].")
@click.option("--name", default=None, help="Name of the results [default: the layout].")
def retrieval(model: str, data_path: str, layout: str, folds: str | None, splits: tuple[str, ...],
              label_column: str | None, columns: tuple[str, ...], options: tuple[str, ...], out: Path | None,
              cache_dir: str | None, device: str | None, adapter_options: tuple[str, ...], no_progress: bool,
              pairs: tuple[str, ...], name: str | None) -> None:
    """Retrieval in both directions with MODEL over paired data (R@1/5/10, median rank, mAP, chance levels).

    Records holding items of both modalities of a pair type are the pairs; where they have labels,
    class-level retrieval follows. Writes retrieval-<name>.json.
    """
    embedder, evaluation = _eval_setup(model, data_path, layout, folds, splits, label_column, columns, options,
                                       cache_dir, device, adapter_options)
    chosen = [tuple(p.split(",")) for p in pairs] or [tuple(p) for p in embedder.metadata.get("pairs", [])]
    if not chosen or any(len(p) != 2 for p in chosen):
        _fail("name the pair types with --pair A,B (the model does not record the ones it was trained on)")
    try:
        metrics, counts = retrieval_on_data(embedder, evaluation, chosen, progress=not no_progress)  # type: ignore[arg-type]
    except (RecipeError, AdapterError, TooManyBadItems, ValueError) as exc:
        _fail(str(exc))
    if not metrics:
        _fail(f"fewer than 2 pairs for every pair type: {counts['pairs']}")
    run_dir = run_folder(model)
    out = out or run_dir or Path.cwd()
    name = name or layout
    out.mkdir(parents=True, exist_ok=True)
    path = write_json(out / retrieval_file(name),
                      {"metrics": metrics, "counts": counts, "data": evaluation.data.model_dump(mode="json")})
    if run_dir is not None and out == run_dir:
        _refresh_run(run_dir, "retrieval_sets", name, metrics)
    click.echo("\n".join(retrieval_tables(metrics)).rstrip())
    click.echo(f"pairs: {counts['pairs']}")
    click.echo(f"wrote {path}")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--classes", default=None, metavar="A,B,...",
              help="Only these classes of the run's figure sample [default: all of them].")
@click.option("--seed", type=int, default=None, help="UMAP random state [default: the recipe's seed].")
@click.option("--neighbors", type=click.IntRange(min=2), default=None,
              help="UMAP n_neighbors [default: the recipe's eval.umap_neighbors].")
def plot(run: Path, classes: str | None, seed: int | None, neighbors: int | None) -> None:
    """Draw the figures of a RUN folder: UMAP views (the paper's Figures 2-4) and the training curve."""
    try:
        paths = draw_run_figures(run, seed, neighbors, [c.strip() for c in classes.split(",")] if classes else None)
    except (FileNotFoundError, ModelLoadError, ValueError) as exc:
        _fail(str(exc))
    for p in paths:
        click.echo(f"wrote {p}")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report(run: Path) -> None:
    """Write report.md for a RUN folder from its recipe, metrics, figures and zero-shot results."""
    if not (run / METRICS).is_file():
        _fail(f"{run} has no {METRICS}: not a finished run folder")
    click.echo(f"wrote {write_report(run)}")


if __name__ == "__main__":  # pragma: no cover
    main()
