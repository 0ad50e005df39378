import math

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


# ---------------------------------------------------------------------------------------
# validation at scale: a fixed sample for model selection, every pair once at the end
# ---------------------------------------------------------------------------------------


def _grouped_pairset(n=600, group_size=3, seed=0):
    full = _pairset(seed=seed, n=n)
    groups = [f"video-{i // group_size}" for i in range(full.val_a.shape[0])]
    return PairSet("image", "audio", full.train_a, full.train_b, full.val_a, full.val_b,
                   val_labels=[f"class-{i % 4}" for i in range(len(groups))], val_record_groups=groups)


def test_the_validation_sample_takes_whole_groups_fixed_by_the_seed():
    from coembed.training import sample_by_group

    groups = [f"g{i // 4}" for i in range(400)] + [f"solo{i}" for i in range(50)]  # 100 groups of 4, 50 of 1
    first = sample_by_group(groups, 60, seed=1)
    assert first.tolist() == sample_by_group(groups, 60, seed=1).tolist()  # reproducible
    assert first.tolist() != sample_by_group(groups, 60, seed=2).tolist()  # the seed draws it
    assert 60 <= len(first) < 64 and first.tolist() == sorted(first.tolist())
    chosen = {groups[i] for i in first}
    assert all((groups[i] in chosen) == (i in set(first.tolist())) for i in range(len(groups)))  # whole groups
    assert sample_by_group(groups, 1000, seed=1).tolist() == list(range(450))  # fewer than asked: all of them

    pair = _grouped_pairset()
    sample = pair.validation_sample(30, seed=5)
    assert len(sample) >= 30 and len(sample) % 3 == 0  # groups of 3, taken whole
    trainer = Trainer(_heads(), [pair], TrainConfig(epochs=1, validation_sample=30, device="cpu"), seed=5)
    assert torch.equal(trainer.selection[0].vectors_a, sample.vectors_a) and not trainer.selection_is_full


def test_selection_ranks_the_sample_and_the_final_metrics_every_pair_once(monkeypatch):
    import coembed.metrics
    import coembed.training

    pair = _grouped_pairset()
    n_val = pair.val_a.shape[0]
    sizes = []
    real = coembed.metrics.rank_gallery

    def counting(queries, gallery, *args, **kwargs):
        sizes.append((queries.shape[0], gallery.shape[0]))
        return real(queries, gallery, *args, **kwargs)

    monkeypatch.setattr(coembed.metrics, "rank_gallery", counting)
    heads = _heads()
    trainer = Trainer(heads, [pair], TrainConfig(epochs=4, batch_size=64, lr=1e-2, validation_sample=30,
                                                 validate_every=2, device="cpu"))
    result = trainer.fit(progress=False)
    selection = len(trainer.selection[0])
    assert [row["epoch"] for row in result.history if "mean_r1" in row] == [2, 4]  # every 2 epochs
    assert sizes == [(selection, selection)] * 4  # 2 validations x 2 directions, on the sample only
    assert result.validation_pairs == {"image-audio": {"selection": selection, "full": n_val}}
    sizes.clear()
    final = trainer.final_metrics(result.best_metrics)
    assert sizes.count((n_val, n_val)) == 4  # instance and class level, both directions, once each
    expected = evaluate_pairs(heads, [pair], class_level=True)
    assert final == pytest.approx(expected, nan_ok=True)

    small = _grouped_pairset()
    trainer = Trainer(_heads(), [small], TrainConfig(epochs=2, batch_size=64, validation_sample=None, device="cpu"))
    result = trainer.fit(progress=False)
    assert trainer.selection_is_full
    sizes.clear()
    final = trainer.final_metrics(result.best_metrics)
    assert sizes == [(n_val, n_val)] * 2  # the instance level is the best epoch's already: class level only
    assert {k: v for k, v in final.items() if "/class/" not in k} == result.best_metrics


def test_the_loop_is_plain_adam_on_info_nce_with_autocast_off():
    """Autocast off (the CPU default), the trainer computes exactly this reference loop: the same heads,
    bit for bit, as the trainer before device-side loss accounting and autocast existed."""
    import math

    pair = _pairset()
    config = TrainConfig(epochs=3, batch_size=64, lr=1e-2, device="cpu", autocast=False)
    heads = _heads(kind="mlp")
    Trainer(heads, [pair], config, seed=7).fit(progress=False)

    ref = _heads(kind="mlp")
    temperature = LearnableTemperature(0.07, True, 0.01)
    params = [p for p in list(ref.parameters()) + list(temperature.parameters()) if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    torch.manual_seed(7)
    generator = torch.Generator().manual_seed(7)
    n = pair.train_a.shape[0]
    for _ in range(3):
        perm = torch.randperm(n, generator=generator)
        for step in range(math.ceil(n / 64)):
            idx = perm[step * 64:(step + 1) * 64]
            if idx.numel() < 2:
                continue
            loss = info_nce(ref["image"](pair.train_a[idx]), ref["audio"](pair.train_b[idx]), temperature())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    for (name, got), (_, want) in zip(heads.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(got, want), name


def test_autocast_trains_the_heads_in_bf16_and_keeps_the_loss_in_float32(monkeypatch):
    import coembed.losses

    dtypes = []
    real = coembed.losses.info_nce

    def spy(a, b, scale, workspace=None, excluded=None):
        loss = real(a, b, scale, workspace, excluded)
        dtypes.append((b.dtype, scale.dtype, loss.dtype))  # b: the audio head's output (a: the identity's)
        return loss

    monkeypatch.setattr(coembed.losses, "info_nce", spy)
    heads = _heads()
    result = Trainer(heads, [_pairset()], TrainConfig(epochs=2, batch_size=64, lr=1e-2, device="cpu",
                                                      autocast=True)).fit(progress=False)
    assert {d for d, _, _ in dtypes} == {torch.bfloat16}  # the trained head's output under autocast
    assert {(s, l) for _, s, l in dtypes} == {(torch.float32, torch.float32)}
    assert heads["audio"].weight.dtype == torch.float32 and math.isfinite(result.history[-1]["loss"])
