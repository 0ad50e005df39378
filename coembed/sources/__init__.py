"""Data sources: where paired records come from.

======================  ==========================================================
``base``                :class:`Record`, :class:`BadRecord`, :class:`Source`, its
                        options and :class:`SourceContext`; the source registry
``manifest``            rows of a CSV or JSONL file
``generated``           labelled PNG/WAV/caption triples written by coembed (the quickstart)
``video_folder``        videos -> a frame and the audio around it (the paper's VGG-Sound data)
``hf_dataset``          a Hugging Face ``datasets`` data set
``esc50``               the ESC-50 sound set in its published layout
======================  ==========================================================

Each built-in source registers through the entry-point group ``coembed.sources``
exactly as a plugin's source does (see :mod:`coembed.plugins`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from coembed.config import DataConfig
from coembed.errors import RecipeError, validation_problems
from coembed.sources.base import (SOURCES, BadRecord, Record, Source, SourceContext, SourceOptions, SourceRead,
                                  cell_text, make_record, read_source, record_id, source_class, unique_ids)

__all__ = ["SOURCES", "BadRecord", "DataDescription", "Record", "Source", "SourceContext", "SourceOptions",
           "SourceRead", "build_source", "cell_text", "describe_data", "make_record", "read_source", "record_id",
           "source_class", "unique_ids"]


def build_source(data: DataConfig, context: SourceContext) -> Source:
    """The source a recipe's ``data`` section names, with its options checked."""
    cls = source_class(data.source)
    try:
        options = cls.Options(**data.source_options)
    except ValidationError as exc:
        raise RecipeError(validation_problems(exc, "data")) from None
    return cls(options, context)


@dataclass(frozen=True)
class DataDescription:
    """A data section as reports and model cards name it."""

    source: str
    location: str | None = None
    split: str | None = None
    #: the Hugging Face Hub data set it reads, if any (for a model card's metadata)
    hub_id: str | None = None
    hub_config: str | None = None

    @property
    def name(self) -> str:
        return self.hub_id or (f"{self.source}: {self.location}" if self.location else self.source)


def describe_data(data: DataConfig) -> DataDescription:
    """Where ``data`` reads and which part of it, as its source says (options it cannot read are left out)."""
    try:
        options = source_class(data.source).Options(**data.source_options)
    except (RecipeError, ValidationError):  # a source of another installation, or options of another version
        path = data.source_options.get("path")
        return DataDescription(data.source, str(path) if path else None)
    hub_id = getattr(options, "hub_dataset", lambda: None)()
    return DataDescription(data.source, options.location(), options.split_name(), hub_id,
                           getattr(options, "config", None) if hub_id else None)
