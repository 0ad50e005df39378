"""The adapter contract, checked on one adapter: ``coembed modalities --check NAME``.

:func:`check_adapter` creates the adapter (with its default options or the
ones given), has it read a few items of its modality that the check makes
itself (a sine tone, a small image, short strings; an adapter of another
modality declares its own with :meth:`~coembed.registry.Adapter.sample_items`)
and reports each rule the pipeline relies on as passed, failed or skipped:

=====================  ==========================================================
``create``             the adapter is created with the options
``declared dim``       ``dim`` is a positive integer
``load without model`` ``load`` works on a pickled copy (as in a DataLoader worker)
                       and never loads the model there
``output dim``         ``encode`` gives ``[items, dim]`` for the declared ``dim``
``dtype``              the vectors are float32
``finite``             no NaN or infinite value
``deterministic``      two calls on the same items give the same vectors
``fingerprint stable`` the same options give the same fingerprint, a runtime
                       option (``device``) leaves it unchanged
``fingerprint options`` an output-changing option changes it
``bad item``           an unusable input raises ``BadItem``
=====================  ==========================================================
"""

from __future__ import annotations

import pickle
import tempfile
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
import torch
from PIL import Image
from pydantic import ValidationError

from coembed.errors import BadItem
from coembed.registry import Adapter, SampleItems, available_adapters, get_adapter_class

#: A rule's outcome: passed, failed, or not applicable to this adapter.
Outcome = Literal["pass", "fail", "skip"]

#: Vectors of two calls on the same items must agree to this tolerance.
DETERMINISM_ATOL = 1e-5


@dataclass(frozen=True)
class RuleResult:
    rule: str
    outcome: Outcome
    detail: str


@dataclass
class AdapterCheck:
    """What :func:`check_adapter` found for one adapter."""

    key: str
    distribution: str
    options: dict[str, Any]
    results: list[RuleResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.outcome != "fail" for r in self.results)

    @property
    def broken(self) -> list[str]:
        """The rules that failed."""
        return [r.rule for r in self.results if r.outcome == "fail"]

    def add(self, rule: str, passed: bool | None, detail: str) -> bool:
        self.results.append(RuleResult(rule, "skip" if passed is None else "pass" if passed else "fail", detail))
        return bool(passed)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "distribution": self.distribution, "options": self.options, "ok": self.ok,
                "results": [{"rule": r.rule, "outcome": r.outcome, "detail": r.detail} for r in self.results]}


def builtin_sample_items(modality: str, folder: Path) -> SampleItems | None:
    """The check's own items for ``audio`` (WAV files of a sine), ``image`` (PNG files) and ``text``;
    ``None`` for another modality."""
    if modality == "audio":
        rate = 16000
        paths = []
        for i, (seconds, hz) in enumerate([(1.5, 440.0), (2.0, 880.0)]):
            t = np.arange(round(seconds * rate)) / rate
            paths.append(folder / f"sine-{i}.wav")
            sf.write(paths[-1], (0.4 * np.sin(2 * np.pi * hz * t)).astype(np.float32), rate)
        (folder / "not-audio.wav").write_text("this is not a sound")
        return SampleItems([str(p) for p in paths], str(folder / "not-audio.wav"))
    if modality == "image":
        paths = []
        for i in range(2):
            y, x = np.mgrid[0:48, 0:64]
            pixels = np.stack([x * 4, y * 5, np.full_like(x, 100 + 100 * i)], axis=-1).astype(np.uint8)
            paths.append(folder / f"image-{i}.png")
            Image.fromarray(pixels if i == 0 else pixels[::-1]).save(paths[-1])
        (folder / "not-an-image.png").write_text("this is not an image")
        return SampleItems([str(p) for p in paths], str(folder / "not-an-image.png"))
    if modality == "text":
        return SampleItems(["a dog barking in the rain", "an orchestra tuning"], "")
    return None


def check_adapter(key: str, options: Mapping[str, Any] | None = None) -> AdapterCheck:
    """Check the adapter registered as ``key`` (``modality/name``) with ``options`` against every rule."""
    options = dict(options or {})
    info = available_adapters().get(key)
    report = AdapterCheck(key, info.distribution if info else "?", options)
    try:
        cls = get_adapter_class(key)
        adapter = cls(cls.Options(**options))
    except Exception as exc:  # an import error, unknown or invalid options, a constructor that raises
        report.add("create", False, _error(exc))
        return report
    report.add("create", True, f"{type(adapter).__name__}({adapter.config()})")
    with tempfile.TemporaryDirectory(prefix="coembed-check-") as tmp:
        _check(adapter, report, Path(tmp))
    return report


def _check(adapter: Adapter, report: AdapterCheck, folder: Path) -> None:
    try:
        dim = adapter.dim
    except Exception as exc:
        dim = None
        report.add("declared dim", False, f"dim raised {_error(exc)}")
    else:
        if not report.add("declared dim", isinstance(dim, int) and not isinstance(dim, bool) and dim > 0,
                          f"dim = {dim!r}"):
            dim = None
    try:
        samples = type(adapter).sample_items(folder) or builtin_sample_items(adapter.modality, folder)
    except Exception as exc:
        report.add("sample items", False, f"sample_items raised {_error(exc)}")
        return
    if samples is None:
        report.add("sample items", False, f"no sample items for modality {adapter.modality!r}: an adapter of a "
                                          f"new modality declares them with the classmethod sample_items")
        return

    loaded = _load_in_worker_copy(adapter, samples.good, report)
    if loaded is not None:
        first = _encode(adapter, loaded, report)
        if first is not None:
            _check_vectors(adapter, samples.good, first, dim, report)
    _check_fingerprint(adapter, report)
    bad = _show(samples.bad, folder)
    try:
        adapter.load(samples.bad)
    except BadItem as exc:
        report.add("bad item", True, f"{bad} raised BadItem: {exc}")
    except Exception as exc:
        report.add("bad item", False, f"{bad} raised {_error(exc)}, not BadItem")
    else:
        report.add("bad item", False, f"{bad} was loaded; an unusable input must raise BadItem")


def _load_in_worker_copy(adapter: Adapter, items: list[Any], report: AdapterCheck) -> list[Any] | None:
    """``load`` of every item by a pickled copy of the adapter, as a DataLoader worker runs it."""
    try:
        worker = pickle.loads(pickle.dumps(adapter))
    except Exception as exc:
        report.add("load without model", False, f"the adapter cannot be pickled for worker processes: {_error(exc)}")
        return None
    try:
        loaded = [worker.load(item) for item in items]
    except Exception as exc:
        report.add("load without model", False, f"load of a sample item raised {_error(exc)}")
        return None
    if "model" in worker.__dict__:
        report.add("load without model", False, "load loaded the model; it runs in worker processes and must not")
        return None
    report.add("load without model", True, f"{len(items)} items loaded by a pickled copy, no model loaded")
    return loaded


def _encode(adapter: Adapter, loaded: list[Any], report: AdapterCheck) -> torch.Tensor | None:
    try:
        return adapter.encode(adapter.collate(loaded))
    except Exception as exc:
        report.add("output dim", False, f"collate + encode raised {_error(exc)}")
        return None


def _check_vectors(adapter: Adapter, items: list[Any], vectors: torch.Tensor, dim: int | None,
                   report: AdapterCheck) -> None:
    shape = tuple(vectors.shape)
    if dim is None:
        report.add("output dim", False, f"encode gave {shape}; the declared dim is unusable")
    else:
        report.add("output dim", shape == (len(items), dim),
                   f"declared {dim}, encode gave {shape} for {len(items)} items")
    report.add("dtype", vectors.dtype == torch.float32, f"{vectors.dtype}")
    finite = bool(torch.isfinite(vectors).all())
    report.add("finite", finite, "all values finite" if finite else "NaN or infinite values")
    try:
        again = adapter.encode(adapter.collate([adapter.load(item) for item in items]))
    except Exception as exc:
        report.add("deterministic", False, f"a second call raised {_error(exc)}")
        return
    if again.shape != vectors.shape:
        report.add("deterministic", False, f"a second call gave shape {tuple(again.shape)}, the first {shape}")
        return
    if not torch.equal(torch.isnan(again), torch.isnan(vectors)):
        report.add("deterministic", False, "NaN in different places in two calls")
        return
    gap = (again - vectors).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs()
    diff = float(gap.max()) if gap.numel() else 0.0
    report.add("deterministic", diff <= DETERMINISM_ATOL, f"largest difference between two calls {diff:.2e}")


def _check_fingerprint(adapter: Adapter, report: AdapterCheck) -> None:
    cls = type(adapter)
    try:
        fingerprint = adapter.fingerprint
        same = [adapter.fingerprint, cls(adapter.options).fingerprint]
        if "device" in adapter.runtime_options:
            other_device = "cpu" if adapter.options.device != "cpu" else "auto"
            same.append(cls(adapter.options.model_copy(update={"device": other_device})).fingerprint)
    except Exception as exc:
        report.add("fingerprint stable", False, f"fingerprint raised {_error(exc)}")
        return
    changed = [fp for fp in same if fp != fingerprint]
    report.add("fingerprint stable", not changed and isinstance(fingerprint, str) and bool(fingerprint),
               f"{fingerprint}" if not changed else f"{fingerprint}, then {changed[0]} for the same encoder")
    varied: list[str] = []
    for option, value in _option_variants(adapter):
        try:
            other = cls(cls.Options(**{**adapter.options.model_dump(), option: value}))
            other_fingerprint = other.fingerprint
        except (ValidationError, ValueError):
            continue  # a value the adapter does not accept with the other options
        except Exception as exc:
            report.add("fingerprint options", False, f"{option}={value!r}: fingerprint raised {_error(exc)}")
            return
        varied.append(f"{option}={value!r}")
        if other_fingerprint == fingerprint:
            report.add("fingerprint options", False, f"{option}={value!r} (instead of {getattr(adapter.options, option)!r}) "
                                                     f"leaves the fingerprint {fingerprint}; an option that changes the "
                                                     f"vectors belongs in it, one that does not in runtime_options")
            return
    if varied:
        report.add("fingerprint options", True, f"changed by {', '.join(varied)}")
    else:
        report.add("fingerprint options", None, "no output-changing option with a value the check can vary "
                                                "(a choice, a flag or a number)")


def _option_variants(adapter: Adapter) -> Iterator[tuple[str, Any]]:
    """``(option, other value)`` for each output-changing option whose type gives another value: a literal's
    next choice, the other boolean, the number plus one."""
    config = adapter.config()
    for name, info in type(adapter.options).model_fields.items():
        if name in adapter.runtime_options or name not in config:
            continue
        value = getattr(adapter.options, name)
        for make in _VARIANTS:
            other = make(info.annotation, value)
            if other is not None and other != value:
                yield name, other
                break


def _literal_variant(annotation: Any, value: Any) -> Any:
    if typing.get_origin(annotation) is Literal:
        choices = [c for c in typing.get_args(annotation) if c != value]
        return choices[0] if choices else None
    return None


def _number_variant(annotation: Any, value: Any) -> Any:
    if annotation is bool and isinstance(value, bool):
        return not value
    if annotation in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value + 1
    return None


_VARIANTS: list[Callable[[Any, Any], Any]] = [_literal_variant, _number_variant]


def _show(item: Any, folder: Path) -> str:
    """A sample item in a message: a file the check wrote by its name, anything else by its repr."""
    if isinstance(item, (str, Path)) and str(item).startswith(str(folder)):
        return Path(item).name
    text = repr(item)
    return text if len(text) <= 60 else text[:57] + "..."


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
