"""Training on several processes: the gathered loss, the shards, and two gloo processes against one.

Two processes training on halves of the pairs, with the batch gathered across them, must take the steps one
process takes on the whole batch: the same losses and, after a few steps, the same heads.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from coembed.config import HeadConfig, TrainConfig
from coembed.distributed import SINGLE, World, join, leave, shard_batches
from coembed.heads import IdentityHead, build_head
from coembed.losses import info_nce, info_nce_gathered
from coembed.run import train_recipe
from coembed.training import PairSet, Trainer, distributed_unsupported
from _toy_adapter import register_toys, toy_recipe

TESTS = Path(__file__).resolve().parent


def test_the_shares_of_the_gathered_loss_add_up_to_the_loss_and_gradients_of_one_process():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(11, 6, generator=g), torch.randn(11, 6, generator=g)
    scale = torch.tensor(8.0)

    def grads(loss_of):
        leaves = [a.clone().requires_grad_(), b.clone().requires_grad_(), scale.clone().requires_grad_()]
        loss = loss_of(*leaves)
        return loss.detach(), torch.autograd.grad(loss, leaves)

    def shares(x, y, s):  # three processes holding rows 0-3, 4-8, 9-10
        xn, yn = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
        logits = (s * xn @ yn.T).detach()
        blocks = ((0, 4), (4, 9), (9, 11))
        partials = torch.stack([torch.logsumexp(logits[lo:hi], dim=0) for lo, hi in blocks])
        total = torch.zeros(())
        for k, (lo, hi) in enumerate(blocks):
            # "gathering" concatenates everyone's rows; every share's gradient reaches the rows of the others
            # too, as the gather's backward sends it
            def gather(rows, lo=lo, hi=hi):
                return torch.cat([yn[:lo], rows, yn[hi:]]), lo

            def across(mine, k=k):
                return torch.logsumexp(torch.cat([partials[:k], mine[None], partials[k + 1:]]), dim=0)

            total = total + info_nce_gathered(x[lo:hi], y[lo:hi], s, gather, across)
        return total

    one, one_grads = grads(info_nce)
    split, split_grads = grads(shares)
    assert torch.allclose(one, split, atol=1e-6)
    for expected, got in zip(one_grads, split_grads):
        assert torch.allclose(expected, got, atol=1e-6)


def test_every_global_batch_is_the_same_pairs_whatever_the_number_of_processes():
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(3))
    worlds = [World(rank, 3) for rank in range(3)]
    parts = [shard_batches(perm, 5, w) for w in worlds]
    assert all(len(p) == 5 for p in parts)
    for step in range(5):
        held = []
        for w, p in zip(worlds, parts):
            local, counts = p.batch(step)
            assert counts == parts[0].counts[step] and len(local) == counts[w.rank]
            held += w.shard(23)[local.numpy()].tolist()  # back to positions among all pairs
        assert sorted(held) == sorted(perm[step * 5:(step + 1) * 5].tolist())
    one = shard_batches(perm, 5, SINGLE)
    assert torch.equal(one.local, perm) and one.counts[-1] == [3]


# ---------------------------------------------------------------------------------------
# two gloo processes against one
# ---------------------------------------------------------------------------------------

CONFIG = TrainConfig(epochs=3, batch_size=8, lr=0.01, device="cpu", validation_sample=None)


def _pairs() -> PairSet:
    g = torch.Generator().manual_seed(0)
    anchor = torch.randn(49, 8, generator=g)
    other = anchor @ torch.randn(8, 12, generator=g) + 0.3 * torch.randn(49, 12, generator=g)
    return PairSet("image", "audio", anchor[:37], other[:37], anchor[37:], other[37:])  # 37 = 4 x 8 + 5


def _heads() -> torch.nn.ModuleDict:
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"image": IdentityHead(),
                                "audio": build_head(HeadConfig(type="mlp", hidden_dim=16), 12, 8)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = join("cpu")
    try:
        full = _pairs()
        held = torch.from_numpy(world.shard(full.n_train))
        shard = PairSet("image", "audio", full.train_a[held], full.train_b[held], full.val_a, full.val_b,
                        train_total=full.n_train)
        result = Trainer(_heads(), [shard], CONFIG, seed=0, world=world).fit(progress=False)
        save_file(result.state, f"{out}/state-{rank}.safetensors")
        Path(f"{out}/history-{rank}.json").write_text(json.dumps([result.best_epoch, result.history]))
    finally:
        leave(world)


def test_two_gloo_processes_train_the_heads_one_process_trains_on_the_whole_batch(tmp_path):
    mp.spawn(_train_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    one = Trainer(_heads(), [_pairs()], CONFIG, seed=0).fit(progress=False)
    for rank in (0, 1):
        state = load_file(tmp_path / f"state-{rank}.safetensors")
        assert state.keys() == one.state.keys()
        for key, value in one.state.items():
            assert torch.allclose(state[key], value, atol=1e-5), key
        best_epoch, history = json.loads((tmp_path / f"history-{rank}.json").read_text())
        assert best_epoch == one.best_epoch
        for mine, theirs in zip(history, one.history, strict=True):
            assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)  # the global batch's loss
            assert mine["mean_r1"] == pytest.approx(theirs["mean_r1"])  # process 0's validation, on both
    assert one.history[-1]["loss"] < one.history[0]["loss"]  # it learned: the steps compared are real ones


# ---------------------------------------------------------------------------------------
# coembed train under torchrun
# ---------------------------------------------------------------------------------------


def test_coembed_train_under_torchrun_writes_one_run_folder_with_the_heads_of_one_process(tmp_path, monkeypatch):
    register_toys(tmp_path, monkeypatch)
    data = {"source": "generated", "path": str(tmp_path / "media"), "classes": 2, "items_per_class": 10,
            "image_size": 32, "audio_seconds": 1.0}
    recipe = toy_recipe(tmp_path, data, train={"epochs": 3, "batch_size": 6}, output_dir=str(tmp_path / "runs"))
    (tmp_path / "recipe.yaml").write_text(recipe.to_yaml())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site-coembed-test-toys"), str(TESTS)]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "coembed", "train", str(tmp_path / "recipe.yaml"), "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs  # process 1 made no folder of its own
    run = runs[0]
    assert done.stdout.count("run folder:") == 1
    assert (run / "train.log").read_text().count("run folder") == 1
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["counts"]["pairs"]["image-audio"]["train"] >= 10  # every pair, not process 0's shard

    single = train_recipe(recipe, run_dir=tmp_path / "single", progress=False)  # the same recipe, one process
    assert single is not None
    assert [row["loss"] for row in history] == pytest.approx([row["loss"] for row in single.history], abs=1e-5)
    assert metrics["best_epoch"] == single.metrics["best_epoch"]
    assert metrics["counts"]["pairs"] == single.metrics["counts"]["pairs"]
    heads = load_file(run / "model" / "heads.safetensors")
    expected = load_file(tmp_path / "single" / "model" / "heads.safetensors")
    assert heads.keys() == expected.keys() and heads
    for key in heads:
        assert torch.allclose(heads[key], expected[key], atol=1e-5), key
    assert yaml.safe_load((run / "recipe.yaml").read_text()) == yaml.safe_load(recipe.to_yaml())


def test_several_processes_refuse_the_options_their_gathered_loss_lacks():
    assert distributed_unsupported(TrainConfig()) == []
    refused = distributed_unsupported(TrainConfig(loss="sigmoid", mixup=0.4, label_positives=True))
    assert refused == ["train.loss=sigmoid", "train.mixup=0.4", "train.label_positives=True"]
