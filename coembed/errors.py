"""Every exception coembed raises, under one base class, :class:`CoembedError`.

This module imports nothing of coembed, so any module (a data source, an
adapter, the command line) can raise or catch any of them. Each keeps the
built-in class it has always been (``ValueError``, ``RuntimeError``, ...), so
code that catches those still does.

============================  ==================================================
``RecipeError``               a recipe is invalid; ``problems`` lists each one
``AdapterError``              an adapter cannot be found, configured or loaded
``WeightsUnavailable``        pretrained weights cannot be loaded (no network, ...)
``BadItem``                   one input cannot be used; it is reported and skipped
``OverLimit``                 an input refused by a setting (never cached as bad)
``TooManyBadItems``           the share of bad items passed ``data.max_bad_fraction``
``TooFewPairs``               a pair type has too few usable training pairs
``ModelLoadError``            a model folder or Hub repo was refused
``HubError``                  the Hugging Face Hub refused or could not be reached
============================  ==================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class CoembedError(Exception):
    """Base class of every exception coembed raises on purpose."""


class RecipeError(CoembedError, ValueError):
    """A recipe is invalid.

    ``problems`` holds one line per problem, each naming the key and what is
    allowed (``"train.epochs: Input should be greater than 0"``). The message
    is ``"invalid recipe:"`` followed by those lines.
    """

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("invalid recipe:\n" + "\n".join(f"  {p}" for p in self.problems))

    def within(self, prefix: str) -> RecipeError:
        """The same problems, with their keys under ``prefix`` (``"data.path: ..."`` -> ``"eval.zero_shot.0.data.path: ..."``)."""
        return RecipeError([f"{prefix}.{p}" for p in self.problems])


class AdapterError(CoembedError):
    """An adapter cannot be found, configured or loaded."""


class WeightsUnavailable(AdapterError):
    """Pretrained weights cannot be loaded (no network, missing file, ...)."""


class BadItem(CoembedError):
    """Raised by :meth:`coembed.registry.Adapter.load` (and the media decoders) for an input that cannot be used.

    The message is the reason written to ``bad_items.jsonl``; the item is
    skipped and the run goes on.
    """


class OverLimit(BadItem):
    """An item refused by a configurable limit (not a fault of the file): never cached as bad."""


class TooManyBadItems(CoembedError, RuntimeError):
    """The share of bad items passed ``data.max_bad_fraction``."""


class TooFewPairs(CoembedError, RuntimeError):
    """A pair type has fewer than 2 usable training pairs."""


class ModelLoadError(CoembedError, ValueError):
    """A model cannot be loaded: missing, malformed, written by a newer coembed, or its
    heads do not fit the encoders that would feed them. The message says why."""


class HubError(CoembedError, RuntimeError):
    """The Hub could not be reached or refused a request; the message says which and why."""


def validation_problems(exc: Any, prefix: str = "") -> list[str]:
    """One ``"key: problem"`` line per error of a :class:`pydantic.ValidationError`, keys under ``prefix``.

    Pydantic's own names for validator functions are left out of the keys, an
    unknown key reads ``unknown key`` and a wrong literal names the value given.
    """
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        key = ".".join(x for x in (prefix, loc) if x) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "literal_error":
            msg = f"{msg} (got {err.get('input')!r})"
        lines.append(f"{key}: {msg}")
    return lines
