"""The Ray engine on a real local Ray (2 CPUs, started once for the module) against the local engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

ray = pytest.importorskip("ray")

from _media import truncate, write_png, write_wav  # noqa: E402
from _toy_adapter import CountingAdapter, register_toys, toy_recipe  # noqa: E402
from coembed.cli import main  # noqa: E402
from coembed.config import ExtractionConfig, RayConfig  # noqa: E402
from coembed.errors import RecipeError  # noqa: E402
from coembed.extraction import extract  # noqa: E402
from coembed.ray_extraction import RayEngine  # noqa: E402
from coembed.record import read_metrics  # noqa: E402
from coembed.run import embed_recipe, extraction_engine, train_recipe  # noqa: E402
from coembed.store import EmbeddingStore  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module; its workers import the toy adapters from tests/."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}})
    yield
    ray.shutdown()


@pytest.fixture
def toys(tmp_path, monkeypatch):
    register_toys(tmp_path, monkeypatch)


def _messy_manifest(tmp_path: Path) -> str:
    """Good pictures and sounds, and files that are empty, not media, truncated, missing, too large or silent."""
    media = tmp_path / "m"
    rows = []
    for n in range(6):
        rows.append((f"good{n}", write_png(media / f"i{n}.png", colour=(40 * n, 20, 200 - 30 * n)).name,
                     write_wav(media / f"a{n}.wav", freq=200.0 + 100 * n).name))
    (media / "empty.wav").write_bytes(b"")
    (media / "notes.wav").write_text("plain text, not audio")
    truncate(write_png(media / "big.png", size=(300, 300)), media / "cut.png", 0.3)
    write_png(media / "huge.png", size=(400, 400))
    write_wav(media / "quiet.wav", amplitude=0.0)
    rows += [("zero", "i0.png", "empty.wav"), ("notmedia", "i1.png", "notes.wav"), ("truncated", "cut.png", "a0.wav"),
             ("missing", "nowhere.png", "a1.wav"), ("huge", "huge.png", "a2.wav"), ("silent", "i2.png", "quiet.wav")]
    (media / "manifest.csv").write_text("id,image,audio\n" + "".join(f"{r},{i},{a}\n" for r, i, a in rows))
    return "m/manifest.csv"


def _bad_items(folder: Path) -> list[tuple[str, str, str, bool]]:
    rows = [json.loads(line) for line in (folder / "bad_items.jsonl").read_text().splitlines()]
    return sorted((r["id"], r["modality"], r["reason"], bool(r.get("flagged"))) for r in rows)


def _store_contents(root: str | Path, adapter_dim: int, fingerprint: str) -> dict[str, tuple[np.ndarray, str | None]]:
    store = EmbeddingStore(root, fingerprint, adapter_dim)
    keys = sorted(store.keys())
    lookup = store.lookup(keys)
    vectors = lookup.vectors
    return {k: (vectors[i], lookup.errors.get(i)) for i, k in enumerate(keys)}


def test_both_engines_give_the_same_store_and_bad_items_and_train_reads_it_back(tmp_path, toys, local_ray,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe file written below holds paths relative to here
    manifest = _messy_manifest(tmp_path)
    data = {"source": "manifest", "path": manifest, "max_image_pixels": 100_000, "max_bad_fraction": 0.9}
    local = toy_recipe(tmp_path, data, extraction={"cache_dir": "local-store"})
    local_result = embed_recipe(local, run_dir=tmp_path / "local", progress=False)

    uri = (tmp_path / "ray-store").as_uri()  # file:// : the store behind a pyarrow URI
    result = CliRunner().invoke(main, [
        "embed", str(tmp_path / "local" / "recipe.yaml"), "--engine", "ray", "--no-progress",
        "--run-dir", str(tmp_path / "ray"), "--set", f"extraction.cache_dir={uri}",
        "--set", "extraction.ray.decode_batch_size=3", "--set", "extraction.ray.encoders=2",
        "--set", "extraction.ray.encoder_cpus=0.5"])
    assert result.exit_code == 0, result.output
    assert "embed folder:" in result.output
    summary = json.loads((tmp_path / "ray" / "extraction.json").read_text())
    assert summary["engine"] == "ray"

    assert _bad_items(tmp_path / "ray") == _bad_items(tmp_path / "local")
    reasons = {(r[0], r[1]) for r in _bad_items(tmp_path / "local")}
    assert {("zero", "audio"), ("notmedia", "audio"), ("truncated", "image"), ("missing", "image"),
            ("huge", "image"), ("silent", "audio")} <= reasons
    for m, stats in local_result.summary["extraction"].items():
        ray_stats = summary["extraction"][m]
        assert {k: ray_stats[k] for k in ("items", "encoded", "bad", "flagged", "bad_reasons")} == \
               {k: stats[k] for k in ("items", "encoded", "bad", "flagged", "bad_reasons")}
        local_store = _store_contents(tmp_path / "local-store", 8, stats["fingerprint"])
        ray_store = _store_contents(uri, 8, stats["fingerprint"])
        assert local_store.keys() == ray_store.keys() and len(local_store) >= 11  # "huge" is refused, not stored
        for key, (vector, error) in local_store.items():
            assert ray_store[key][1] == error
            np.testing.assert_allclose(ray_store[key][0], vector, rtol=1e-5, atol=1e-6)

    # training on the store the Ray engine filled encodes nothing (the refused "huge" image is tried again, and
    # refused again, by the pixel limit)
    trained = train_recipe(toy_recipe(tmp_path, data, extraction={"cache_dir": uri}), run_dir=tmp_path / "run",
                           progress=False)
    extraction = trained.metrics["extraction"]
    assert all(s["encoded"] == 0 for s in extraction.values())
    assert extraction["audio"]["cached"] == 12 and extraction["image"]["cached"] == 11
    assert read_metrics(tmp_path / "run").counts.bad_items == local_result.summary["counts"]["bad_items"]


def _every_key_once(root: Path, adapter: CountingAdapter) -> Counter[str]:
    store = EmbeddingStore(root, adapter.fingerprint, adapter.dim)
    return Counter(k for shard in store.shards() for k in store.shard_keys(shard))


def test_an_interrupted_ray_run_resumes_with_every_good_item_once(tmp_path, local_ray, monkeypatch):
    log = tmp_path / "encoded.txt"
    adapter = CountingAdapter(log=str(log))
    n = 40
    ids = [f"r{i}" for i in range(n)]
    items = [f"item-{i}" if i % 9 else f"broken-{i}" for i in range(n)]
    config = RayConfig(decode_batch_size=4, encoders=1)
    written = []
    real_write = EmbeddingStore.write_shard

    def write_then_die(store, *args, **kwargs):  # the driver is killed once two shards are safe
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(real_write(store, *args, **kwargs))
        return written[-1]

    monkeypatch.setattr(EmbeddingStore, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt), RayEngine(config, batch_size=4) as engine:
        extract(adapter, ids, items, tmp_path / "store", shard_size=8, engine=engine, progress=False)
    monkeypatch.setattr(EmbeddingStore, "write_shard", real_write)
    assert sum(_every_key_once(tmp_path / "store", adapter).values()) == 16

    with RayEngine(config, batch_size=4) as engine:
        lookup, stats = extract(adapter, ids, items, tmp_path / "store", shard_size=8, engine=engine, progress=False)
    assert stats.cached == 16 and stats.cached + len(lookup.ok) - 16 == n
    counts = _every_key_once(tmp_path / "store", adapter)
    assert len(counts) == n and set(counts.values()) == {1}
    assert sorted(lookup.errors) == [i for i in range(n) if i % 9 == 0]
    assert lookup.ok.sum() == n - 5
    np.testing.assert_allclose(lookup.gather(np.flatnonzero(lookup.ok))[:, 0],
                               [i for i in range(n) if i % 9], rtol=0, atol=0)


def test_a_killed_encoder_actor_is_restarted_and_no_item_is_lost_or_stored_twice(tmp_path, local_ray):
    marker = tmp_path / "died"
    adapter = CountingAdapter(die_at=13, die_once=str(marker))
    n = 24
    with RayEngine(RayConfig(decode_batch_size=4, max_retries=2), batch_size=4) as engine:
        lookup, stats = extract(adapter, [f"r{i}" for i in range(n)], [f"item-{i}" for i in range(n)],
                                tmp_path / "store", shard_size=8, engine=engine, progress=False)
    assert marker.exists()  # the actor did die, once
    assert lookup.ok.all() and stats.encoded == n
    counts = _every_key_once(tmp_path / "store", adapter)
    assert len(counts) == n and set(counts.values()) == {1}


def test_ray_is_imported_only_when_the_ray_engine_is_asked_for(monkeypatch):
    code = "import sys, coembed.cli, coembed.run; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"

    def no_ray(name: str):
        raise ModuleNotFoundError("No module named 'ray'", name="ray")

    monkeypatch.setattr("coembed.run.importlib.import_module", no_ray)
    with pytest.raises(RecipeError, match=r"coembed\[ray\]"):
        extraction_engine(ExtractionConfig(engine="ray"))
