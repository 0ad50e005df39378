"""The trainer's options, each shown to act: heads, the sigmoid loss, mixup, label-aware positives, the
learning-rate schedule, early stopping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import coembed.losses
import coembed.training
from coembed.config import HeadConfig, TrainConfig
from coembed.heads import IdentityHead, LinearHead, MLPHead, ResidualBlock, build_head
from coembed.losses import PairLoss, info_nce, same_class, sigmoid_pairwise
from coembed.dataset import load_dataset
from coembed.extraction import extract_dataset
from coembed.run import build_adapters
from coembed.training import PairSet, Trainer, build_pair_sets, excluded_negatives, lr_factor, mix_halves
from _toy_adapter import register_toys, toy_recipe


def _pairs(n=240, d_in=10, d_out=6, seed=0, labels=None) -> PairSet:
    g = torch.Generator().manual_seed(seed)
    anchor = torch.randn(n, d_out, generator=g)
    other = anchor @ torch.randn(d_out, d_in, generator=g) + 0.05 * torch.randn(n, d_in, generator=g)
    cut = n * 3 // 4
    return PairSet("image", "audio", anchor[:cut], other[:cut], anchor[cut:], other[cut:],
                   train_labels=None if labels is None else labels[:cut])


def _heads(d_in=10, d_out=6) -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict({"image": IdentityHead(), "audio": LinearHead(d_in, d_out)})


def test_residual_mlp_head_is_pre_layernorm_residual_blocks():
    head = build_head(HeadConfig(type="mlp", hidden_dim=16, num_layers=3, residual=True, dropout=0.1), 10, 6)
    blocks = [m for m in head.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 2 and isinstance(blocks[0].net[0], nn.LayerNorm)
    block = blocks[0]
    with torch.no_grad():
        block.net[-1].weight.zero_()
        block.net[-1].bias.zero_()
    x = torch.randn(5, 16)
    assert torch.equal(block(x), x)  # x + f(LN(x)) with f = 0
    assert head(torch.randn(5, 10)).shape == (5, 6)
    plain = build_head(HeadConfig(type="mlp", norm="none"), 10, 6)
    assert not any(isinstance(m, nn.LayerNorm) for m in plain.modules())
    legacy = MLPHead(10, 6)  # the default layout (old folders' weight names) is unchanged
    assert isinstance(legacy.net[0], nn.LayerNorm) and isinstance(legacy.net[1], nn.Linear)


def test_sigmoid_loss_is_siglip_pairwise_with_a_learnable_bias():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)
    logits = scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T + bias
    want = -sum(F.logsigmoid((1.0 if i == j else -1.0) * logits[i, j]) for i in range(5) for j in range(5)) / 5
    assert float(sigmoid_pairwise(a, b, scale, bias)) == pytest.approx(float(want), rel=1e-5)
    loss = PairLoss("sigmoid", bias_init=-3.0)
    assert [n for n, _ in loss.named_parameters()] == ["bias"]
    assert float(loss(a, b, scale).detach()) == pytest.approx(float(want), rel=1e-5)
    assert not list(PairLoss("sigmoid", learnable_bias=False).parameters())


def test_training_with_the_sigmoid_loss_learns_and_trains_its_bias():
    heads = _heads()
    trainer = Trainer(heads, [_pairs()], TrainConfig(epochs=15, batch_size=32, lr=1e-2, loss="sigmoid",
                                                     device="cpu"))
    result = trainer.fit(progress=False)
    assert result.best_metrics["mean_r1"] > 0.5  # chance is 1/60
    assert float(trainer.loss.bias) != -10.0 and "loss.bias" in result.state


def test_mix_halves_mixes_the_two_halves_with_one_lambda():
    x_a, x_b = torch.randn(6, 3), torch.randn(6, 2)
    m_a, m_b = mix_halves(x_a, x_b, 0.3)
    assert torch.allclose(m_a, 0.3 * x_a[:3] + 0.7 * x_a[3:])
    assert torch.allclose(m_b, 0.3 * x_b[:3] + 0.7 * x_b[3:])
    assert mix_halves(torch.randn(7, 3), torch.randn(7, 2), 0.5)[0].shape == (3, 3)  # an odd row is left out


def test_the_trainer_feeds_the_heads_mixed_batches(monkeypatch):
    calls = []
    real = coembed.training.mix_halves

    def spy(x_a, x_b, lam):
        out = real(x_a, x_b, lam)
        calls.append((lam, out))
        return out

    monkeypatch.setattr(coembed.training, "mix_halves", spy)
    seen = []
    heads = _heads()
    heads["audio"].register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    Trainer(heads, [_pairs()], TrainConfig(epochs=1, batch_size=32, lr=1e-2, mixup=0.4, device="cpu")).fit(progress=False)
    steps = [x for x in seen if x.shape[0] != 60]  # the 60 rows: validation
    # 180 training pairs in batches of 32: five mixed into 16 pairs, the last 20 into 10
    assert [x.shape[0] for x in steps] == [16] * 5 + [10] and len(calls) == math.ceil(180 / 32)
    assert all(torch.equal(x, out[1]) for x, (_, out) in zip(steps, calls))
    assert all(0.0 < lam < 1.0 for lam, _ in calls) and len({lam for lam, _ in calls}) > 1


def test_same_class_pairs_are_not_negatives_in_the_loss():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    labels = torch.tensor([0, 0, 1, 1, -1, -1])  # -1: unknown, never excluded
    excluded = same_class(labels)
    assert excluded.sum() == 4 and not excluded.diagonal().any() and not excluded[4:].any()
    scale = torch.tensor(5.0)
    logits = scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    masked = logits.masked_fill(excluded, float("-inf"))
    target = torch.arange(6)
    want = 0.5 * (F.cross_entropy(masked, target) + F.cross_entropy(masked.T, target))
    a_grad, a_ref = a.clone().requires_grad_(), a.clone().requires_grad_()
    got = info_nce(a_grad, b, scale, excluded=excluded)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert float(got) != pytest.approx(float(info_nce(a, b, scale)), rel=1e-3)
    got.backward()
    ref_logits = scale * F.normalize(a_ref, dim=-1) @ F.normalize(b, dim=-1).T
    ref_logits = ref_logits.masked_fill(excluded, float("-inf"))
    (0.5 * (F.cross_entropy(ref_logits, target) + F.cross_entropy(ref_logits.T, target))).backward()
    assert torch.allclose(a_grad.grad, a_ref.grad, atol=1e-6)  # the fused backward pass agrees
    sig = sigmoid_pairwise(a, b, scale, torch.tensor(0.0), excluded)
    terms = F.logsigmoid((2 * torch.eye(6) - 1) * logits).masked_fill(excluded, 0.0)
    assert float(sig) == pytest.approx(float(-terms.sum() / 6), rel=1e-5)


def test_label_positives_reach_the_loss_with_mixup_too():
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    mixed = excluded_negatives(labels, mixed=True)  # halves (0, 0, 1) and (1, 0, 1)
    assert mixed.tolist() == [[False, False, False], [False, False, False], [False, False, False]]
    labels = torch.tensor([0, 0, 1, 1, 1, 0])  # halves (0, 0, 1) and (1, 1, 0): pairs 0 and 1 share both
    assert excluded_negatives(labels, mixed=True)[0, 1]


def test_the_trainer_passes_same_class_masks_only_when_asked(monkeypatch):
    masks = []
    real = coembed.losses.info_nce

    def spy(a, b, scale, workspace=None, excluded=None):
        masks.append(excluded)
        return real(a, b, scale, workspace, excluded)

    monkeypatch.setattr(coembed.losses, "info_nce", spy)
    labels = torch.arange(240) % 3
    for asked in (False, True):
        masks.clear()
        Trainer(_heads(), [_pairs(labels=labels)], TrainConfig(epochs=1, batch_size=30, lr=1e-2, device="cpu",
                                                               label_positives=asked)).fit(progress=False)
        if asked:
            assert all(m is not None and m.sum() > 0 for m in masks)
        else:
            assert all(m is None for m in masks)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_warmup_and_cosine_give_the_specified_learning_rates(monkeypatch, schedule):
    lrs = []
    real_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    # 180 training pairs, batch 60: 3 steps per epoch, 4 epochs: 12 steps, 4 of warmup
    Trainer(_heads(), [_pairs()], TrainConfig(epochs=4, batch_size=60, lr=0.1, schedule=schedule, warmup_steps=4,
                                              device="cpu")).fit(progress=False)
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    if schedule == "constant":
        assert lrs[4:] == pytest.approx([0.1] * 8)
    else:
        assert lrs[4:] == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
    assert lr_factor(12, 12, 4, "cosine") == pytest.approx(0.0)


def test_warmup_fraction_is_a_share_of_all_steps():
    trainer = Trainer(_heads(), [_pairs()], TrainConfig(epochs=10, batch_size=60, warmup_fraction=0.1, device="cpu"))
    assert trainer.steps_per_epoch == 3
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 / 3)  # step 0 of a 3-step warmup
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(warmup_steps=3, warmup_fraction=0.1)


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    """A learning rate too small to change a ranking: epoch 1 stays the best, and training stops at 1 + 3."""
    result = Trainer(_heads(), [_pairs()], TrainConfig(epochs=50, batch_size=60, lr=1e-12, patience=3,
                                                       device="cpu")).fit(progress=False)
    assert len(result.history) == 4 and result.best_epoch == 1
    result = Trainer(_heads(), [_pairs()], TrainConfig(epochs=6, batch_size=60, lr=1e-12, device="cpu")).fit(progress=False)
    assert len(result.history) == 6  # no patience: every epoch runs


@pytest.mark.parametrize("asked", [True, False])
def test_pair_sets_carry_the_training_classes_for_label_aware_positives(tmp_path, monkeypatch, asked):
    register_toys(tmp_path, monkeypatch)
    data = {"source": "generated", "path": str(tmp_path / "media"), "classes": 2, "items_per_class": 6,
            "image_size": 16, "audio_seconds": 1.0}
    recipe = toy_recipe(tmp_path, data, train={"label_positives": asked, "device": "cpu"})
    adapters = build_adapters(recipe)
    dataset = load_dataset(recipe, progress=False)
    (pair,) = build_pair_sets(recipe, dataset, extract_dataset(recipe, adapters, dataset, progress=False))
    if not asked:
        assert pair.train_labels is None
        return
    records = dataset.train
    assert pair.train_labels.shape == (pair.n_train,) and len(records) == pair.n_train
    # one integer per class, equal for equal labels, in the order of the training pairs
    for i in range(pair.n_train):
        for j in range(pair.n_train):
            same = records[i].label == records[j].label
            assert bool(pair.train_labels[i] == pair.train_labels[j]) == same
