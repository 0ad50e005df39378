import pytest
import torch

from coembed.heads import IdentityHead, LinearHead, MLPHead, build_head
from coembed.losses import LearnableTemperature, info_nce
from coembed.config import HeadConfig, TrainConfig
from coembed.training import PairSet, Trainer, evaluate_pairs


def _paired(n: int, d_in: int, d_out: int, seed: int, noise: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    anchor = torch.randn(n, d_out, generator=g)
    mixing = torch.randn(d_out, d_in, generator=g)
    other = anchor @ mixing + noise * torch.randn(n, d_in, generator=g)  # a hidden linear relation
    return anchor, other


def _pairset(seed=0, n=400, d_in=12, d_out=8):
    anchor, other = _paired(n, d_in, d_out, seed)
    cut = int(n * 0.67)
    return PairSet("image", "audio", anchor[:cut], other[:cut], anchor[cut:], other[cut:])


def _heads(d_in=12, d_out=8, kind="linear"):
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"image": IdentityHead(), "audio": build_head(HeadConfig(type=kind), d_in, d_out)})


def test_heads_shapes_and_identity_rules():
    assert isinstance(build_head(HeadConfig(type="identity"), 8, 8), IdentityHead)
    with pytest.raises(ValueError, match="identity head"):
        build_head(HeadConfig(type="identity"), 8, 4)
    assert isinstance(build_head(HeadConfig(type="linear"), 8, 4), LinearHead)
    mlp = build_head(HeadConfig(type="mlp", hidden_dim=16, num_layers=3), 8, 4)
    assert isinstance(mlp, MLPHead) and mlp(torch.zeros(2, 8)).shape == (2, 4)
    eye = build_head(HeadConfig(type="linear", identity_init=True), 5, 5)
    x = torch.randn(3, 5)
    assert torch.allclose(eye(x), x)


def test_info_nce_prefers_aligned_pairs_and_is_symmetric():
    x = torch.randn(16, 8)
    scale = torch.tensor(10.0)
    aligned = info_nce(x, x, scale)
    shuffled = info_nce(x, x[torch.randperm(16)], scale)
    assert aligned < shuffled
    y = torch.randn(16, 8)
    assert torch.allclose(info_nce(x, y, scale), info_nce(y, x, scale))


def test_temperature_is_clamped():
    t = LearnableTemperature(init=0.07, min_temperature=0.05)
    with torch.no_grad():
        t.log_scale.fill_(10.0)
    assert abs(t.temperature - 0.05) < 1e-6
    fixed = LearnableTemperature(init=0.05, learnable=False)
    assert not list(fixed.parameters())


def test_training_recovers_a_hidden_linear_map():
    pairs = [_pairset()]
    heads = _heads()
    result = Trainer(heads, pairs, TrainConfig(epochs=40, batch_size=64, lr=1e-2, device="cpu")).fit(progress=False)
    chance = 1 / pairs[0].val_a.shape[0]
    assert result.best_metrics["audio->image/R@1"] > 20 * chance
    assert result.best_metrics["image->audio/R@1"] > 20 * chance
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_same_seed_same_result():
    results = []
    for _ in range(2):
        heads = _heads(kind="mlp")
        Trainer(heads, [_pairset()], TrainConfig(epochs=3, batch_size=32, lr=1e-3, device="cpu"), seed=3).fit(progress=False)
        results.append(torch.cat([p.detach().flatten() for p in heads.parameters()]))
    assert torch.equal(results[0], results[1])


def test_best_checkpoint_is_kept_and_patience_stops():
    heads = _heads()
    result = Trainer(heads, [_pairset()], TrainConfig(epochs=30, batch_size=64, lr=5e-2, patience=3,
                                                       device="cpu")).fit(progress=False)
    best = max(row["mean_r1"] for row in result.history)
    assert result.best_metrics["mean_r1"] == best
    assert evaluate_pairs(heads, [_pairset()])["mean_r1"] == pytest.approx(best)
    assert len(result.history) <= 30


def test_n_way_training_uses_every_pair_type():
    g = torch.Generator().manual_seed(0)
    n, d = 300, 8
    image = torch.randn(n, d, generator=g)
    audio = image @ torch.randn(d, 10, generator=g)
    text = image @ torch.randn(d, 6, generator=g)
    cut = 200
    pairs = [PairSet("image", "audio", image[:cut], audio[:cut], image[cut:], audio[cut:]),
             PairSet("audio", "text", audio[:120], text[:120], audio[cut:], text[cut:])]  # fewer audio-text pairs
    torch.manual_seed(0)
    heads = torch.nn.ModuleDict({"image": IdentityHead(), "audio": LinearHead(10, d), "text": LinearHead(6, d)})
    result = Trainer(heads, pairs, TrainConfig(epochs=40, batch_size=64, lr=1e-2, device="cpu")).fit(progress=False)
    assert result.best_metrics["audio->text/R@1"] > 0.3
    assert result.best_metrics["audio->image/R@1"] > 0.3


def test_two_identity_heads_cannot_train():
    pairs = [PairSet("image", "text", *(torch.randn(4, 8) for _ in range(4)))]
    heads = torch.nn.ModuleDict({"image": IdentityHead(), "text": IdentityHead()})
    with pytest.raises(ValueError, match="trainable"):
        Trainer(heads, pairs, TrainConfig(device="cpu"))


def test_unknown_select_metric_is_an_error():
    with pytest.raises(KeyError, match="select_metric"):
        Trainer(_heads(), [_pairset()], TrainConfig(epochs=1, select_metric="nope", device="cpu")).fit(progress=False)


def test_without_validation_pairs_the_last_epoch_is_kept():
    """No validation pair: nothing to select by, so every epoch runs and the final heads are kept."""
    full = _pairset()
    pairs = [PairSet("image", "audio", full.train_a, full.train_b, full.val_a[:0], full.val_b[:0])]
    heads = _heads()
    result = Trainer(heads, pairs, TrainConfig(epochs=5, batch_size=64, lr=1e-2, patience=2,
                                               device="cpu")).fit(progress=False)
    assert len(result.history) == 5 and result.best_epoch == 5
    final = {f"heads.{k}": v for k, v in heads.state_dict().items()}
    assert all(torch.equal(final[k], result.state[k]) for k in final)
