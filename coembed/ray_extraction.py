"""The Ray engine: extraction on Ray Data (``extraction.engine: ray``, settings in ``extraction.ray``).

Every Ray call of coembed is in this module, and nothing imports it but the
engine choice in :mod:`coembed.run`, which loads it by name only when a recipe
asks for Ray: ``pip install "coembed[ray]"`` is needed for that alone.

The work list :func:`coembed.extraction.extract` hands over (only the items the
store lacks) becomes a Ray dataset of ``(row, pickled raw item)``; decoding
(:func:`coembed.extraction.load_item`) runs in parallel CPU tasks; the encoder
runs in a pool of actors that each load the model once (GPUs where the cluster
has them); the encoded rows stream back to the driver, where ``extract``
writes them into the store exactly as it writes the local engine's. Keys,
shards, bad-item reasons and resume are therefore the same for both engines;
a killed driver is resumed by running the command again.

Faults: a decoding task or an encoder actor whose process dies is retried (the
actor restarted) by Ray, without limit by default or up to
``extraction.ray.max_retries`` times, and Ray Data hands each block downstream
once, so no item is lost or stored twice.
Python errors never reach Ray: a failed load or encode is the item's reason.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import warnings
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.util.annotations import RayDeprecationWarning

from coembed.config import RayConfig
from coembed.errors import RecipeError
from coembed.extraction import EncodedBatch, ItemChecks, Unloadable, encode_checked, load_item, usable_workers
from coembed.registry import Adapter

log = logging.getLogger(__name__)

#: Rows per block of the input dataset, as a multiple of the decoding batch: a block is a unit of scheduling.
_BATCHES_PER_BLOCK = 4


def _decode(rows: pa.Table, adapter: Adapter, max_image_pixels: int | None) -> pa.Table:
    """A Ray task: ``adapter.load`` of each raw item; the loaded value pickled, or the reason it failed."""
    loaded: list[bytes | None] = []
    errors: list[str | None] = []
    stored: list[bool] = []
    for blob in rows.column("item").to_pylist():
        outcome = load_item(adapter, pickle.loads(blob), max_image_pixels)
        if isinstance(outcome, Unloadable):
            loaded.append(None)
            errors.append(outcome.reason)
            stored.append(outcome.stored)
        else:
            loaded.append(pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL))
            errors.append(None)
            stored.append(True)
    return pa.table({"row": rows.column("row"), "loaded": pa.array(loaded, pa.large_binary()),
                     "error": pa.array(errors, pa.string()), "stored": pa.array(stored, pa.bool_())})


class _Encoder:
    """A Ray actor of the encoder pool: the model loaded once, then ``adapter.encode`` batch after batch."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        adapter.model  # loaded here, once per actor (on its GPU when it has one)

    def __call__(self, rows: pa.Table) -> pa.Table:
        adapter = self.adapter
        blobs = rows.column("loaded").to_pylist()
        good = [k for k, blob in enumerate(blobs) if blob is not None]
        values, notes = zip(*[pickle.loads(blobs[k]) for k in good]) if good else ((), ())
        errors: list[str | None] = rows.column("error").to_pylist()
        vectors = np.zeros((len(blobs), adapter.dim), dtype=np.float32)
        note_text: list[str | None] = [None] * len(blobs)
        if good:
            encoded, errs = encode_checked(adapter, adapter.collate(list(values)), len(good), lambda k: values[k])
            vectors[good] = encoded
            for k, err, note in zip(good, errs, notes):
                errors[k] = err
                note_text[k] = json.dumps(note) if note else None
        return pa.table({
            "row": rows.column("row"),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), adapter.dim),
            "error": pa.array(errors, pa.string()), "notes": pa.array(note_text, pa.string()),
            "stored": rows.column("stored"), "encoded": pa.array([b is not None for b in blobs], pa.bool_())})


def _as_encoded(table: pa.Table, dim: int) -> EncodedBatch:
    """The rows the encoder pool sent back, as :func:`~coembed.extraction.extract` writes them."""
    rows = table.column("row").to_numpy()
    stored = table.column("stored").to_numpy(zero_copy_only=False)
    errors = table.column("error").to_pylist()
    notes = [None if t is None else json.loads(t) for t in table.column("notes").to_pylist()]
    vectors = (table.column("vector").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, dim)
               if len(table) else np.zeros((0, dim), dtype=np.float32))
    keep = np.flatnonzero(stored)
    return EncodedBatch(
        rows=rows[keep].tolist(), vectors=vectors[keep].astype(np.float32, copy=False),
        errors=[errors[k] for k in keep], notes=[notes[k] for k in keep],
        refused={int(rows[k]): str(errors[k]) for k in np.flatnonzero(~stored)},
        encoded=int(np.count_nonzero(table.column("encoded").to_numpy(zero_copy_only=False))))


class RayEngine:
    """Decoding in Ray tasks and encoding in a Ray actor pool; a context that joins (or starts) Ray."""

    def __init__(self, config: RayConfig, batch_size: int) -> None:
        self.config = config
        self.encode_batch_size = config.encode_batch_size or batch_size
        self._started = False

    def __enter__(self) -> RayEngine:
        if ray.is_initialized():
            log.info("extraction on the Ray cluster this process has joined")
        elif self.config.address:
            ray.init(address=self.config.address)
            self._started = True
            log.info("extraction on the Ray cluster at %s", self.config.address)
        else:
            cores = usable_workers(os.cpu_count() or 1)
            ray.init(num_cpus=cores, include_dashboard=False)
            self._started = True
            log.info("extraction on a local Ray with %d CPUs", cores)
        ray.data.DataContext.get_current().enable_progress_bars = False  # extract shows its own
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._started:
            ray.shutdown()
            self._started = False

    def encoder_gpus(self) -> float:
        """GPUs per encoder actor: the setting, else one when the cluster has GPUs."""
        if self.config.encoder_gpus is not None:
            return self.config.encoder_gpus
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def _check_cpus(self) -> None:
        """The encoder actors must leave a CPU for decoding, or the pipeline waits for ever."""
        config = self.config
        cpus = ray.cluster_resources().get("CPU", 0.0)
        wanted = config.encoders * config.encoder_cpus + config.decode_cpus
        if wanted > cpus:
            message = (f"extraction.ray: {config.encoders} encoder actor(s) of {config.encoder_cpus:g} CPU and a "
                       f"decoding task of {config.decode_cpus:g} CPU need {wanted:g} CPUs; the Ray cluster has "
                       f"{cpus:g}. Lower extraction.ray.encoders or encoder_cpus (fractions are allowed)")
            if not self.config.address:  # a local Ray does not grow: it would wait for ever
                raise RecipeError(message)
            log.warning("%s, unless the cluster grows", message)

    def _retries(self, *names: str) -> dict[str, int]:
        """Ray's retry arguments set to ``extraction.ray.max_retries`` (null: -1, without limit, Ray Data's default)."""
        return {name: -1 if self.config.max_retries is None else self.config.max_retries for name in names}

    def batches(self, adapter: Adapter, work: Sequence[Any], checks: ItemChecks) -> Iterator[EncodedBatch]:
        config = self.config
        table = pa.table({"row": pa.array(np.arange(len(work), dtype=np.int64)),
                          "item": pa.array([pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL) for x in work],
                                           pa.large_binary())})
        block = config.decode_batch_size * _BATCHES_PER_BLOCK
        blocks = [table.slice(start, block) for start in range(0, len(table), block)]
        gpus = self.encoder_gpus()
        self._check_cpus()
        log.info("ray: %d items in %d blocks; decoding %d per task, %d encoder actor(s) of %g CPU and %g GPU, "
                 "%d items per call", len(work), len(blocks), config.decode_batch_size, config.encoders,
                 config.encoder_cpus, gpus, self.encode_batch_size)
        # The retry arguments are given explicitly (Ray 2.60 warns that such arguments will need another form, and
        # has none yet). Given to the actors and not to the tasks, they also keep Ray Data from fusing the decoding
        # into the encoder actors: decoding stays in tasks of its own, on every free CPU.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=RayDeprecationWarning, message=".*ray_remote_args")
            dataset = ray.data.from_arrow(blocks).map_batches(
                _decode, batch_size=config.decode_batch_size, batch_format="pyarrow",
                fn_kwargs={"adapter": adapter, "max_image_pixels": checks.max_image_pixels},
                num_cpus=config.decode_cpus, **self._retries("max_retries"),
            ).map_batches(
                _Encoder, batch_size=self.encode_batch_size, batch_format="pyarrow",
                fn_constructor_kwargs={"adapter": adapter}, compute=ray.data.ActorPoolStrategy(size=config.encoders),
                num_cpus=config.encoder_cpus, num_gpus=gpus,
                **self._retries("max_restarts", "max_task_retries"),
            )
        for out in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield _as_encoded(out, adapter.dim)
