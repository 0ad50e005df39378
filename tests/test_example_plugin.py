"""The example plugin ``examples/coembed-video-frames``, installed for real as a user would, from outside.

It is built and installed with pip (offline, ``--no-build-isolation``) into a folder of ``tmp_path``,
and coembed runs in subprocesses with that folder on ``PYTHONPATH``: the project's environment is
left as it was. The plugin is listed, passes ``coembed modalities --check``, and a short recipe binds
its ``video`` modality to CLIP's image space.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "coembed-video-frames"

RECIPE = """
name: video-frames
seed: 0
anchor: image
pairs:
  - [image, video]
modalities:
  image:
    adapter: clip
    pretrained: none
    head: {type: identity}
  video:
    adapter: clip-frames
    pretrained: none
    frames: 2
    head: {type: linear}
data:
  source: manifest
  path: media/manifest.csv
  split: {validation: 0.34}
extraction:
  num_workers: 0
  cache_dir: store
train:
  epochs: 60
  batch_size: 16
  lr: 0.01
eval:
  plots: false
"""


def _write_media(folder: Path, n: int) -> None:
    """``n`` records: a PNG of one colour and a 1 s video of the same colour (64x64, mpeg4)."""
    import av
    from PIL import Image

    folder.mkdir(parents=True)
    colours = np.random.default_rng(0).integers(0, 256, size=(n, 3), dtype=np.uint8)
    rows = []
    for i, colour in enumerate(colours):
        pixels = np.broadcast_to(colour, (64, 64, 3)).copy()
        Image.fromarray(pixels).save(folder / f"c{i}.png")
        with av.open(str(folder / f"c{i}.mp4"), "w") as out:
            stream = out.add_stream("mpeg4", rate=4)
            stream.width = stream.height = 64
            stream.pix_fmt = "yuv420p"
            for t in range(4):
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
                frame.pts = t
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        rows.append({"id": f"c{i}", "group": f"c{i}", "image": f"c{i}.png", "video": f"c{i}.mp4"})
    with (folder / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The example installed into a folder of its own; the environment of a subprocess that sees it."""
    tmp = tmp_path_factory.mktemp("example-plugin")
    source = shutil.copytree(EXAMPLE, tmp / "source", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(source)], check=True, capture_output=True, text=True)
    return {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}


def _coembed(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coembed", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_the_installed_example_is_listed_and_keeps_the_contract(installed: dict[str, str]) -> None:
    listing = _coembed(installed, "modalities", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = {r["key"]: r for r in json.loads(listing.stdout)}
    assert rows["video/clip-frames"]["distribution"] == "coembed-video-frames"
    assert rows["video/clip-frames"]["dim"] == 512 and "audio/vggish" in rows

    check = _coembed(installed, "modalities", "--check", "video/clip-frames", "--option", "pretrained=none",
                     "--option", "frames=2")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "FAIL" not in check.stdout and "PASS  fingerprint options  changed by frames=3" in check.stdout


@pytest.mark.slow
def test_a_recipe_binds_the_plugins_modality_to_the_anchor(installed: dict[str, str], tmp_path: Path) -> None:
    _write_media(tmp_path / "media", 12)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    run = _coembed(installed, "train", "recipe.yaml", "--no-progress", "--run-dir", "run", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["counts"]["bad_items"] == 0
    n_val = metrics["counts"]["pairs"]["image-video"]["validation"]
    assert n_val >= 3
    # a video of one colour looks like the image of that colour: the head finds it well above chance
    assert metrics["validation"]["video->image/R@1"] > 1.0 / n_val
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["modalities"]["video"]["adapter"] == "video/clip-frames"
    assert config["modalities"]["video"]["adapter_config"]["frames"] == 2
