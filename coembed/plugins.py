"""Entry-point plugins: the one mechanism that finds adapters and data sources, built-in or not.

coembed's own adapters and sources register through the same entry-point
groups a third-party package uses, so a plugin is found exactly like them::

    [project.entry-points."coembed.modalities"]
    "audio/my-encoder" = "my_package.adapter:MyAudioAdapter"

    [project.entry-points."coembed.sources"]
    "my_layout" = "my_package.source:MySource"

Entry points load lazily, by name, on first use; one that fails to import is
reported with its name and distribution and never breaks the others.
``COEMBED_DISABLE_PLUGINS=1`` ignores every entry point that does not ship
with coembed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

#: The distribution whose entry points are coembed's own (never switched off).
BUILTIN_DISTRIBUTION = "coembed"
DISABLE_VARIABLE = "COEMBED_DISABLE_PLUGINS"

T = TypeVar("T")


@dataclass(frozen=True)
class Plugin:
    """One registered entry point: its name, the distribution that declares it, and where it points."""

    name: str
    distribution: str
    entry_point: EntryPoint


def plugins_disabled() -> bool:
    return os.environ.get(DISABLE_VARIABLE, "").lower() in {"1", "true", "yes"}


class PluginGroup(Generic[T]):
    """The classes registered in one entry-point group, each a subclass of ``base``.

    ``what`` names one of them in messages (``"adapter"``, ``"source"``);
    ``error`` is the exception type raised; ``check_name(name)`` returns why a
    name is malformed (or ``None``); ``declared_name(cls)`` is the name a loaded
    class says it has, which must equal its entry point's name.
    """

    def __init__(self, group: str, base: type[T], what: str, error: type[Exception],
                 declared_name: Callable[[type[T]], str],
                 check_name: Callable[[str], str | None] = lambda name: None) -> None:
        self.group = group
        self.base = base
        self.what = what
        self.error = error
        self.declared_name = declared_name
        self.check_name = check_name

    def available(self) -> dict[str, Plugin]:
        """Every usable entry point of the group, by name, sorted; malformed names are left out."""
        found: dict[str, Plugin] = {}
        for ep in entry_points(group=self.group):
            dist = ep.dist.name if ep.dist is not None else "?"
            if plugins_disabled() and dist != BUILTIN_DISTRIBUTION:
                continue
            if self.check_name(ep.name) is None:
                found.setdefault(ep.name, Plugin(ep.name, dist, ep))
        return dict(sorted(found.items()))

    def malformed(self) -> dict[str, str]:
        """``{"<name> (<distribution>)": why}`` for entry points whose name is malformed."""
        out = {}
        for ep in entry_points(group=self.group):
            dist = ep.dist.name if ep.dist is not None else "?"
            if not (plugins_disabled() and dist != BUILTIN_DISTRIBUTION) and (why := self.check_name(ep.name)):
                out[f"{ep.name} ({dist})"] = why
        return out

    def load(self, name: str) -> type[T]:
        """The class registered as ``name``; the group's error when it is unknown, broken or not a ``base``."""
        plugins = self.available()
        if name not in plugins:
            known = ", ".join(plugins) or "none"
            raise self.error(f"unknown {self.what} {name!r}; registered {self.what}s: {known}")
        plugin = plugins[name]
        try:
            cls = plugin.entry_point.load()
        except Exception as exc:  # a broken plugin is reported by name, never fatal for others
            raise self.error(f"{self.what} {name!r} from distribution {plugin.distribution!r} failed to import: "
                             f"{type(exc).__name__}: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise self.error(f"{self.what} {name!r} ({plugin.entry_point.value}) is not a coembed "
                             f"{self.base.__name__} subclass")
        if self.declared_name(cls) != name:
            raise self.error(f"{self.what} entry point {name!r} points at a class that declares "
                             f"{self.declared_name(cls)!r}")
        return cls
