"""Resumable extraction: killed at any moment (SIGKILL included), a re-run finishes the job."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _media import write_png, write_wav
from _toy_adapter import CountingAdapter, ToyAudioAdapter, ToyImageAdapter
from coembed.extraction import ItemChecks, extract
from coembed.store import EmbeddingStore, item_key

TESTS = Path(__file__).resolve().parent

#: Extraction of N counting items in a child process: the command a user re-runs after a kill.
JOB = """
import sys
from _toy_adapter import CountingAdapter
from coembed.extraction import extract

store, log, n, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
adapter = CountingAdapter(log=log, delay=delay, device="cpu")
lookup, stats = extract(adapter, [f"r{i}" for i in range(n)], [f"item-{i}" for i in range(n)], store,
                        batch_size=2, shard_size=4, num_workers=0, progress=False)
assert lookup.ok.all(), lookup.errors
print("done", stats.cached, stats.encoded)
"""

N, SHARD = 40, 4


def _job(store: Path, log: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", JOB, str(store), str(log), str(N), str(delay)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _shard_rows(store: EmbeddingStore) -> list[str]:
    """Every key of every shard, duplicates included (the store's own index deduplicates)."""
    return [k for shard in store.shards() for k in store.shard_keys(shard)]


def test_sigkill_mid_extraction_then_rerun_finishes_with_every_item_once(tmp_path):
    adapter = CountingAdapter(device="cpu")
    root, log = tmp_path / "store", tmp_path / "encoded.log"
    store_dir = root / adapter.fingerprint
    child = _job(root, log, delay=0.12)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            if (store_dir / "store.json").exists():
                # a reader running beside the writer only ever sees whole shards
                n = len(EmbeddingStore(root, adapter.fingerprint, adapter.dim).keys())
                assert n % SHARD == 0
                if n >= 3 * SHARD:
                    break
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(30)
    assert child.returncode == -signal.SIGKILL, child.stderr.read() if child.stderr else ""

    store = EmbeddingStore(root, adapter.fingerprint, adapter.dim)
    before = set(_shard_rows(store))
    assert 3 * SHARD <= len(before) < N  # killed part-way, with finished shards on disk
    keys = [item_key(f"r{i}", f"item-{i}") for i in range(N)]
    finished = {i for i, k in enumerate(keys) if k in before}
    first_run = [int(x) for x in log.read_text().split()]

    rerun = _job(root, log, delay=0.0)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert out.split() == ["done", str(len(finished)), str(N - len(finished))]

    store = EmbeddingStore(root, adapter.fingerprint, adapter.dim)
    rows = _shard_rows(store)
    assert sorted(rows) == sorted(keys)            # every item exactly once, none lost, none doubled
    assert not list(store.dir.glob(".tmp-*"))      # no leftovers
    encoded = [int(x) for x in log.read_text().split()]
    second_run = encoded[len(first_run):]
    assert finished.isdisjoint(second_run)         # finished shards were not encoded again
    assert sorted(second_run) == sorted(set(range(N)) - finished)
    lookup = store.lookup(keys)
    n = np.arange(N, dtype=np.float32)
    np.testing.assert_allclose(lookup.vectors, np.stack([n, 2 * n, np.sin(n), np.ones(N)], axis=1), rtol=1e-6)


def test_leftovers_of_a_killed_writer_are_never_read_and_are_removed(tmp_path):
    adapter = CountingAdapter(device="cpu")
    store = EmbeddingStore(tmp_path, adapter.fingerprint, adapter.dim)
    shard = store.write_shard(["k1"], ["r1"], np.ones((1, adapter.dim)), [None])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    from coembed.store import _host

    # a half-written shard of a killed process, and one of a writer that is still running
    for pid in (dead_pid, os.getpid()):
        tmp = store.dir / f".tmp-{_host()}-{pid}-shard-99999999999999999999-deadbeef.arrow"
        tmp.write_bytes(b"\x00partial")
    assert store.shards() == [shard]
    assert EmbeddingStore(tmp_path, adapter.fingerprint, adapter.dim).keys() == {"k1"}
    store.clean_partial()
    assert [p.name.split("-")[2] for p in store.dir.glob(".tmp-*")] == [str(os.getpid())]


def test_a_failed_write_leaves_nothing_a_reader_could_take_for_a_shard(tmp_path, monkeypatch):
    import coembed.store

    adapter = CountingAdapter(device="cpu")
    real = coembed.store._write_table

    def dies_half_way(fs, path, table, durable):
        real(fs, path, table.slice(0, 1), durable)
        raise OSError("disk full")

    monkeypatch.setattr(coembed.store, "_write_table", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        extract(adapter, ["r0", "r1"], ["item-0", "item-1"], tmp_path, progress=False)
    store = EmbeddingStore(tmp_path, adapter.fingerprint, adapter.dim)
    assert store.shards() == [] and not list(store.dir.glob(".tmp-*")) and len(store) == 0
    monkeypatch.setattr(coembed.store, "_write_table", real)
    lookup, stats = extract(adapter, ["r0", "r1"], ["item-0", "item-1"], tmp_path, progress=False)
    assert lookup.ok.all() and stats.encoded == 2


def test_two_shards_with_one_key_the_older_wins_and_it_counts_once(tmp_path):
    adapter = CountingAdapter(device="cpu")
    store = EmbeddingStore(tmp_path, adapter.fingerprint, adapter.dim)
    store.write_shard(["a", "b"], ["ra", "rb"], np.full((2, 4), 1.0), [None, None])
    store.write_shard(["b", "c"], ["rb", "rc"], np.full((2, 4), 2.0), [None, None])  # e.g. two runs at once
    reader = EmbeddingStore(tmp_path, adapter.fingerprint, adapter.dim)
    assert len(reader) == 3 and reader.keys() == {"a", "b", "c"}
    lookup = reader.lookup(["a", "b", "c"])
    assert lookup.vectors[:, 0].tolist() == [1.0, 1.0, 2.0]


def test_an_unreadable_shard_is_skipped_and_its_items_encoded_again(tmp_path, caplog):
    adapter = CountingAdapter(device="cpu", log=str(tmp_path / "log"))
    ids, items = [f"r{i}" for i in range(8)], [f"item-{i}" for i in range(8)]
    extract(adapter, ids, items, tmp_path / "s", batch_size=4, shard_size=4, progress=False)
    store = EmbeddingStore(tmp_path / "s", adapter.fingerprint, adapter.dim)
    damaged = store.shards()[0]
    damaged.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="coembed"):
        lookup, stats = extract(adapter, ids, items, tmp_path / "s", batch_size=4, shard_size=4, progress=False)
    assert lookup.ok.all() and stats.cached == 4 and stats.encoded == 4
    assert any("unreadable store shard" in r.getMessage() for r in caplog.records)


def test_limits_are_not_cached_and_silence_is_judged_at_each_run_without_encoding_again(tmp_path, monkeypatch):
    big = write_png(tmp_path / "big.png", size=(120, 100))
    small = write_png(tmp_path / "small.png")
    images = ToyImageAdapter(device="cpu")
    lookup, _ = extract(images, ["big", "small"], [str(big), str(small)], tmp_path / "s",
                        checks=ItemChecks(max_image_pixels=10_000), progress=False)
    assert lookup.ok.tolist() == [False, True] and lookup.errors[0].startswith("image too large")
    assert len(EmbeddingStore(tmp_path / "s", images.fingerprint, images.dim)) == 1  # the refusal is not stored
    lookup, stats = extract(images, ["big", "small"], [str(big), str(small)], tmp_path / "s", progress=False)
    assert lookup.ok.all() and stats.encoded == 1  # a higher limit takes effect at once

    quiet = write_wav(tmp_path / "quiet.wav", amplitude=0.003)   # about -53 dBFS
    loud = write_wav(tmp_path / "loud.wav")
    sounds = ToyAudioAdapter(device="cpu")
    ids, items = ["quiet", "loud"], [str(quiet), str(loud)]
    lookup, stats = extract(sounds, ids, items, tmp_path / "s", progress=False)
    assert lookup.ok.all() and lookup.flags == {} and stats.encoded == 2      # -53 dBFS is not below -60
    monkeypatch.setattr(ToyAudioAdapter, "_encode", lambda self, batch: pytest.fail("encoded again"))
    lookup, stats = extract(sounds, ids, items, tmp_path / "s", checks=ItemChecks(silence_db=-40), progress=False)
    assert lookup.ok.all() and list(lookup.flags) == [0] and "kept" in lookup.flags[0] and stats.flagged == 1
    lookup, stats = extract(sounds, ids, items, tmp_path / "s", checks=ItemChecks(silence_db=-40, drop_silent=True),
                            progress=False)
    assert lookup.ok.tolist() == [False, True] and "dropped" in lookup.errors[0]
    assert stats.bad_reasons == {"silent audio": 1} and stats.cached == 2


def test_a_write_after_reading_adds_its_shard_without_reading_every_shard_again(tmp_path, monkeypatch):
    store = EmbeddingStore(tmp_path, "fp", 4)
    store.write_shard(["a", "b"], ["ra", "rb"], np.full((2, 4), 1.0), [None, "bad"], [{"audio_db": -10.0}, None])
    assert store.keys() == {"a", "b"}
    monkeypatch.setattr(EmbeddingStore, "_read_parts", lambda self: pytest.fail("shards read again")
                        if self._parts is None else self._parts)
    store.write_shard(["b", "c"], ["rb", "rc"], np.array([[2.0] * 4, [np.nan] * 4]), [None, None],
                      [None, {"audio_db": -20.0}])
    keys = ["a", "b", "c", "d"]
    got = store.lookup(keys)
    monkeypatch.undo()
    fresh = EmbeddingStore(tmp_path, "fp", 4).lookup(keys)  # what a reader of the shards on disk sees
    np.testing.assert_array_equal(got.vectors, fresh.vectors)
    assert (got.ok.tolist(), got.errors, got.missing, got.notes) == (fresh.ok.tolist(), fresh.errors, fresh.missing,
                                                                     fresh.notes)
    assert got.ok.tolist() == [True, False, True, False] and got.errors == {1: "bad"} and got.missing == [3]
    assert got.notes == {0: {"audio_db": -10.0}, 2: {"audio_db": -20.0}} and len(store) == 3
