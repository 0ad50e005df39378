"""The ``coembed`` command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from coembed import __version__

SET_HELP = "Override a recipe value, e.g. --set train.epochs=5 (repeatable; values are YAML)."


def _fail(message: str) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="coembed")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """Co-embed modalities: frozen encoders, cached embeddings, projection heads into one anchor space."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
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
    from coembed.recipe import RecipeError, load_recipe
    from coembed.registry import AdapterError

    try:
        parsed = load_recipe(recipe, list(overrides))
    except (RecipeError, AdapterError) as exc:
        _fail(str(exc))
    from coembed.run import train_recipe

    try:
        result = train_recipe(parsed, run_dir=run_dir, progress=not no_progress)
    except (RecipeError, AdapterError) as exc:
        _fail(str(exc))
    val = result.metrics["validation"]
    click.echo(f"best epoch {result.metrics['best_epoch']}: "
               + ", ".join(f"{k} {v:.3f}" for k, v in val.items() if k.endswith("R@1") or k == "mean_r1"))
    click.echo(f"run folder: {result.run_dir}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def modalities(as_json: bool) -> None:
    """List every registered modality adapter."""
    from coembed.registry import describe_adapters

    rows = describe_adapters()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = ("ADAPTER", "MODALITY", "NAME", "DIM", "WEIGHTS (default)", "FROM")
    table = [header] + [(r["key"], r["modality"], r["name"], str(r.get("dim", "?")),
                         r.get("weights", "error: " + r.get("error", "")), r["distribution"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@main.command("check")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def check(recipe: Path, overrides: tuple[str, ...]) -> None:
    """Validate a RECIPE (keys, values, adapters) without running it; print it resolved."""
    from coembed.recipe import RecipeError, load_recipe

    try:
        parsed = load_recipe(recipe, list(overrides))
    except RecipeError as exc:
        _fail(str(exc))
    click.echo(parsed.to_yaml(), nl=False)


if __name__ == "__main__":  # pragma: no cover
    main()
