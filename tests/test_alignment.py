"""The baselines of ``train.method``: each on a tiny case with a known answer, then through the pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from coembed import CoEmbedder
from coembed.alignment import Aligner, cca_maps, procrustes_map, ridge_maps
from coembed.config import TrainConfig
from coembed.errors import RecipeError
from coembed.heads import AsifHead, IdentityHead, LinearHead
from coembed.report import render_report
from coembed.run import train_recipe
from coembed.training import PairSet
from _toy_adapter import register_toys, toy_recipe


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_ridge_recovers_a_planted_linear_map():
    g = _gen()
    x = torch.randn(500, 6, generator=g)
    w, b = torch.randn(6, 4, generator=g), torch.randn(4, generator=g)
    y = x @ w + b + 0.01 * torch.randn(500, 4, generator=g)
    (got_w, got_b), (big_w, _) = ridge_maps(x, y, [1e-6, 10.0])
    assert torch.allclose(got_w.float(), w, atol=1e-2) and torch.allclose(got_b.float(), b, atol=1e-2)
    assert big_w.norm() < 0.5 * got_w.norm()  # the penalty shrinks the map


def test_procrustes_recovers_a_planted_orthogonal_map():
    g = _gen(1)
    x = torch.randn(300, 5, generator=g) + 3.0
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    y = 2.0 * (x - x.mean(0)) @ q + 1.0
    w, b = procrustes_map(x, y)
    assert torch.allclose(w.float(), 2.0 * q, atol=1e-4)
    assert torch.allclose((x.double() @ w + b).float(), y, atol=1e-3)


def test_procrustes_between_different_dims_is_a_partial_isometry():
    g = _gen(2)
    x = torch.randn(300, 7, generator=g)
    q = torch.linalg.qr(torch.randn(4, 4, generator=g))[0]
    y = x[:, :4] @ q  # y sees 4 of x's 7 directions, rotated
    w, _ = procrustes_map(x, y)
    rotation = w / w.norm(dim=0).mean()
    assert torch.allclose(rotation.T @ rotation, torch.eye(4, dtype=w.dtype), atol=1e-5)  # orthonormal columns
    planted = torch.cat([q, torch.zeros(3, 4)]).double()
    assert (rotation - planted).abs().max() < 0.15


def test_cca_finds_a_planted_shared_direction():
    g = _gen(3)
    n = 2000
    shared = torch.randn(n, generator=g)
    x = torch.randn(n, 5, generator=g)
    y = torch.randn(n, 3, generator=g)
    x[:, 2] += 3 * shared  # the shared signal lies along e2 in x and e0 + e1 in y
    y[:, 0] += 3 * shared
    y[:, 1] += 3 * shared
    a, b, rho, _, _ = cca_maps(x, y)
    assert rho[0] > 0.9 and rho[1] < 0.2
    assert abs(float(torch.nn.functional.normalize(a[:, 0], dim=0)[2])) > 0.95
    direction = torch.nn.functional.normalize(b[:, 0], dim=0)
    assert abs(float(direction[0])) == pytest.approx(abs(float(direction[1])), abs=0.1)
    assert abs(float(direction[2])) < 0.2


def test_asif_retrieves_the_right_item_on_a_constructed_case():
    """Anchor pairs are (e_i in x, f_i in y); a query near e_3 and a target near f_3 share their top anchor."""
    g = _gen(4)
    ex = torch.eye(8)
    fy = torch.linalg.qr(torch.randn(8, 8, generator=g))[0]  # another basis: no shared coordinates
    hx, hy = AsifHead.over(ex, top_k=2, power=4.0), AsifHead.over(fy, top_k=2, power=4.0)
    queries = ex + 0.1 * torch.randn(8, 8, generator=g)
    targets = fy + 0.1 * torch.randn(8, 8, generator=g)
    qx, ty = hx(queries), hy(targets)
    assert (qx > 0).sum(dim=1).max() <= 2  # top-k: at most two non-zero similarities per item
    assert torch.equal((qx @ ty.T).argmax(dim=1), torch.arange(8))
    assert not torch.equal((queries @ targets.T).argmax(dim=1), torch.arange(8))  # raw spaces do not match


def _planted_pairs(n=400, d_anchor=6, d_other=9, seed=5) -> PairSet:
    g = _gen(seed)
    anchor = torch.randn(n, d_anchor, generator=g)
    other = torch.tanh(anchor @ torch.randn(d_anchor, d_other, generator=g)) + 0.05 * torch.randn(n, d_other, generator=g)
    cut = 300
    return PairSet("anchor", "other", anchor[:cut], other[:cut], anchor[cut:], other[cut:])


@pytest.mark.parametrize("method", ["ridge", "procrustes", "cca", "asif"])
def test_each_method_keeps_the_best_candidate_on_validation(method):
    heads = nn.ModuleDict({"anchor": IdentityHead(), "other": LinearHead(9, 6)})
    config = TrainConfig(method=method, device="cpu", alignment={"asif_anchors": 200, "cca_dims": [2, 4, 6]})
    aligner = Aligner(heads, [_planted_pairs()], config, "anchor")
    result = aligner.fit(progress=False)
    values = [row["mean_r1"] for row in result.history]
    assert result.best_metrics["mean_r1"] == max(values) > 0.1  # chance is 0.01
    assert len(values) == {"ridge": 6, "procrustes": 1, "cca": 3, "asif": 9}[method]
    final = aligner.final_metrics(result.best_metrics)
    assert final["anchor->other/R@1"] == result.best_metrics["anchor->other/R@1"]
    expected_out = {"ridge": 6, "procrustes": 6, "cca": 6, "asif": 200}[method]
    assert aligner.output_dim == expected_out
    assert aligner.head_configs["anchor"].type == {"cca": "linear", "asif": "asif"}.get(method, "identity")


def test_a_method_needs_the_anchor_in_every_pair_type(tmp_path):
    with pytest.raises(RecipeError, match="hold the anchor"):
        toy_recipe(tmp_path, {"source": "generated", "path": str(tmp_path)}, pairs=[["image", "audio"], ["audio", "text"]],
                   modalities={"image": {"adapter": "toy"}, "audio": {"adapter": "toy"}, "text": {"adapter": "toy"}},
                   train={"method": "ridge"})


@pytest.mark.parametrize("method", ["ridge", "procrustes", "cca", "asif"])
def test_each_method_runs_through_the_pipeline_saves_and_reloads(tmp_path, monkeypatch, method):
    register_toys(tmp_path, monkeypatch)
    data = {"source": "generated", "path": str(tmp_path / "media"), "classes": 2, "items_per_class": 6,
            "image_size": 32, "audio_seconds": 1.0}
    recipe = toy_recipe(tmp_path, data, train={"method": method, "epochs": 1, "batch_size": 4, "device": "cpu",
                                               "alignment": {"asif_anchors": 5, "cca_dims": [2]}},
                        eval={"plots": False, "report": True})
    result = train_recipe(recipe, run_dir=tmp_path / "run", progress=False)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert "image->audio/R@1" in metrics["retrieval"] and metrics["temperature"] is None
    report = (result.run_dir / "report.md").read_text()
    assert f"train.method: {method}" in report and "image->audio" in report
    (result.run_dir / "training-curve.png").write_bytes(b"")   # the caption names settings, not epochs
    assert "for each setting tried" in render_report(result.run_dir)
    assert "training loss per epoch" not in render_report(result.run_dir)
    model = CoEmbedder.from_pretrained(result.run_dir, device="cpu")
    assert model.metadata["method"] == method
    assert model.output_dim == {"cca": 2, "asif": 5}.get(method, 8)
    images = sorted((tmp_path / "media").rglob("*.png"))[:3]
    got = model.embed(image=[str(p) for p in images])
    want = result.model.embed(image=[str(p) for p in images])
    assert got.shape == (3, model.output_dim)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)
