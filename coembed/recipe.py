"""Recipes read and checked before any work: the schema, then what the schema alone cannot know.

:func:`load_recipe` reads a recipe file, applies ``--set`` overrides and
checks it. Past the schema (:mod:`coembed.config`), it checks that each
modality's adapter is registered and accepts its options, that the data
source (and every zero-shot set's source) exists and accepts its options,
that some head can be trained and that ``train.select_metric`` is a value an
epoch records, and the zero-shot sets' modalities, text side and templates.
Every problem found is reported at once, each with its key and what is
allowed (:class:`~coembed.errors.RecipeError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from coembed.config import DataConfig, Recipe, apply_overrides, parse_recipe, read_recipe_file
from coembed.errors import AdapterError, RecipeError, validation_problems
from coembed.metrics import selectable_metrics
from coembed.prompts import resolve_templates, text_side
from coembed.registry import get_adapter_class, input_kinds
from coembed.sources import SOURCES, source_class

__all__ = ["Recipe", "RecipeError", "check_recipe", "load_recipe", "recipe_from_dict"]


def adapter_problems(recipe: Recipe) -> list[str]:
    """Each modality's adapter is registered and accepts its options."""
    problems = []
    for modality, key in recipe.adapter_keys().items():
        try:
            cls = get_adapter_class(key)
        except AdapterError as exc:
            problems.append(f"modalities.{modality}.adapter: {exc}")
            continue
        try:
            cls.Options(**recipe.modalities[modality].adapter_options)
        except ValidationError as exc:
            allowed = ", ".join(sorted(cls.Options.model_fields))
            problems += [f"{p} ({key} accepts: {allowed})"
                         for p in validation_problems(exc, f"modalities.{modality}")]
    return problems


def training_problems(recipe: Recipe) -> list[str]:
    """What training would otherwise refuse only after extraction: a head to train, the select metric."""
    problems = []
    if all(cfg.head.type == "identity" for cfg in recipe.modalities.values()):
        problems.append("modalities: every head is an identity head, so nothing can be trained; "
                        "give a modality a linear or mlp head")
    if recipe.train.select_metric not in (known := selectable_metrics(recipe.pairs)):
        problems.append(f"train.select_metric: {recipe.train.select_metric!r} is not a validation metric; "
                        f"known: {', '.join(known)}")
    return problems


def source_problems(data: DataConfig, where: str = "data") -> list[str]:
    """The data section's source is registered and accepts its options."""
    if data.source not in SOURCES.available():
        return [f"{where}.source: unknown source {data.source!r}; allowed: {', '.join(SOURCES.available())}"]
    try:
        cls = source_class(data.source)
    except RecipeError as exc:  # registered, but broken
        return [f"{where}.source: {p}" for p in exc.problems]
    try:
        cls.Options(**data.source_options)
    except ValidationError as exc:
        allowed = ", ".join([*sorted(cls.Options.model_fields), *DataConfig.COMMON_KEYS])
        return [f"{p} (source {cls.name!r} accepts: {allowed})" for p in validation_problems(exc, where)]
    return []


def zero_shot_problems(recipe: Recipe) -> list[str]:
    """Every ``eval.zero_shot`` set: modalities, text side, templates, unique names, source options."""
    problems: list[str] = []
    seen: set[str] = set()
    keys = recipe.adapter_keys()
    try:
        kinds: dict[str, str] | None = input_kinds(keys)
    except AdapterError:
        kinds = None  # an unknown adapter is reported by adapter_problems
    for i, zs in enumerate(recipe.eval.zero_shot):
        where = f"eval.zero_shot.{i}"
        name = zs.name or zs.data.source
        if name in seen:
            problems.append(f"{where}.name: {name!r} is used twice; give each zero-shot set its own name")
        seen.add(name)
        if zs.modality not in recipe.modalities:
            problems.append(f"{where}.modality: {zs.modality!r} is not one of the modalities "
                            f"{sorted(recipe.modalities)}")
            continue
        try:
            if kinds is not None:
                text_side(kinds, zs.text_modality, zs.modality)
            resolve_templates(zs.templates, keys[zs.modality].partition("/")[0])
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
        problems += source_problems(zs.data, f"{where}.data")
    return problems


def check_recipe(recipe: Recipe, check_adapters: bool = True) -> Recipe:
    """Every check past the schema; :class:`RecipeError` listing all problems found."""
    problems = training_problems(recipe)
    if check_adapters:
        problems += adapter_problems(recipe)
    problems += source_problems(recipe.data)
    problems += zero_shot_problems(recipe)
    if problems:
        raise RecipeError(problems)
    return recipe


def recipe_from_dict(data: dict[str, Any], base_dir: str | Path = ".", check_adapters: bool = True) -> Recipe:
    """A checked recipe from a raw mapping; relative paths in it resolve against ``base_dir``."""
    return check_recipe(parse_recipe(data, base_dir), check_adapters)


def load_recipe(path: str | Path, overrides: list[str] | None = None, check_adapters: bool = True) -> Recipe:
    """Read, override and check a recipe file.

    Relative paths inside the recipe (data, output_dir, cache_dir) resolve
    against the current working directory, as paths given to a command do.
    """
    data = apply_overrides(read_recipe_file(path), list(overrides or []))
    return recipe_from_dict(data, base_dir=Path.cwd(), check_adapters=check_adapters)
