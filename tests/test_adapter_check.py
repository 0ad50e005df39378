"""The adapter contract checked on one adapter (``coembed modalities --check``), and a listing that
survives broken plugins."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from coembed.adapter_check import check_adapter
from coembed.cli import main
from plugins import install_plugin

#: A plugin of a modality coembed does not know ("pair": two numbers), with its own sample items, and
#: variants of it that each break one rule.
PAIR_PLUGIN = '''
import torch
from coembed.registry import Adapter, AdapterOptions, BadItem, SampleItems


class PairOptions(AdapterOptions):
    scale: float = 1.0


class PairAdapter(Adapter):
    modality = "pair"
    name = "good"
    Options = PairOptions

    @classmethod
    def sample_items(cls, folder):
        return SampleItems([(1.0, 2.0), (3.0, -1.0)], "not a pair")

    @property
    def dim(self):
        return 3

    def _load_model(self):
        layer = torch.nn.Linear(2, 3)
        with torch.no_grad():
            layer.weight.copy_(torch.arange(6.0).reshape(3, 2) * self.options.scale)
            layer.bias.zero_()
        return layer

    def load(self, item):
        if not (isinstance(item, tuple) and len(item) == 2):
            raise BadItem(f"not a pair: {item!r}")
        return torch.tensor(item, dtype=torch.float32)

    def _encode(self, batch):
        return self.model(batch.to(self.device))


class WrongDim(PairAdapter):
    name = "wrong-dim"

    @property
    def dim(self):
        return 4


class LoadsModel(PairAdapter):
    name = "loads-model"

    def load(self, item):
        self.model
        return super().load(item)


class Random(PairAdapter):
    name = "random"

    def _encode(self, batch):
        return super()._encode(batch) + torch.randn(len(batch), 3)


class FixedFingerprint(PairAdapter):
    name = "fixed-fingerprint"

    @property
    def fingerprint(self):
        return "pair-fixed"


class TakesAnything(PairAdapter):
    name = "takes-anything"

    def load(self, item):
        return torch.zeros(2)


class NaN(PairAdapter):
    name = "nan"

    def _encode(self, batch):
        return super()._encode(batch) * float("nan")


class NoSamples(PairAdapter):
    name = "no-samples"

    @classmethod
    def sample_items(cls, folder):
        return None


class RaisesOnCreate(PairAdapter):
    name = "raises"

    def __init__(self, *args, **kwargs):
        raise RuntimeError("needs a licence key")


class DimText(PairAdapter):
    name = "dim-text"

    @property
    def dim(self):
        return "3"
'''

BROKEN = {"wrong-dim": "output dim", "loads-model": "load without model", "random": "deterministic",
          "fixed-fingerprint": "fingerprint options", "takes-anything": "bad item", "nan": "finite",
          "no-samples": "sample items", "raises": "create", "dim-text": "declared dim, output dim"}
CLASSES = {"good": "PairAdapter", "wrong-dim": "WrongDim", "loads-model": "LoadsModel", "random": "Random",
           "fixed-fingerprint": "FixedFingerprint", "takes-anything": "TakesAnything", "nan": "NaN",
           "no-samples": "NoSamples", "raises": "RaisesOnCreate", "dim-text": "DimText"}


@pytest.fixture
def pair_plugins(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "pair-plugin",
                   {f"pair/{name}": f"pair_adapter:{cls}" for name, cls in CLASSES.items()},
                   {"pair_adapter": PAIR_PLUGIN})
    install_plugin(tmp_path, monkeypatch, "missing-plugin", {"pair/missing": "missing_adapter:Nope"},
                   {"missing_adapter": "raise ImportError('needs pairlib 2')\n"})


def test_a_plugin_that_keeps_the_contract_passes_every_rule(pair_plugins):
    report = check_adapter("pair/good")
    assert report.ok and report.distribution == "pair-plugin"
    outcomes = {r.rule: r.outcome for r in report.results}
    assert outcomes == {rule: "pass" for rule in ("create", "declared dim", "load without model", "output dim",
                                                  "dtype", "finite", "deterministic", "fingerprint stable",
                                                  "fingerprint options", "bad item")}
    assert "scale=2.0" in next(r.detail for r in report.results if r.rule == "fingerprint options")

    result = CliRunner().invoke(main, ["modalities", "--check", "pair/good", "--option", "scale=3"])
    assert result.exit_code == 0, result.output
    assert "with {'scale': 3}" in result.output and "pair/good keeps every rule checked" in result.output


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_broken_rule_fails_the_check_naming_the_plugin_and_the_rule(pair_plugins, name):
    report = check_adapter(f"pair/{name}")
    assert ", ".join(report.broken) == BROKEN[name]
    result = CliRunner().invoke(main, ["modalities", "--check", f"pair/{name}"])
    assert result.exit_code != 0
    assert f"adapter pair/{name} from pair-plugin breaks: {BROKEN[name]}" in result.output


def test_a_plugin_that_fails_to_import_fails_the_check(pair_plugins):
    result = CliRunner().invoke(main, ["modalities", "--check", "pair/missing", "--json"])
    assert result.exit_code != 0
    report = json.loads(result.output[:result.output.rindex("}") + 1])
    assert report["results"][0]["outcome"] == "fail" and "needs pairlib 2" in report["results"][0]["detail"]


def test_builtin_adapters_pass_the_check_with_random_weights():
    for key, options in (("audio/vggish", {"weights": "none"}), ("text/clip", {"pretrained": "none"})):
        report = check_adapter(key, options)
        assert report.ok, report.to_json()
    outcomes = {r.rule: r.outcome for r in check_adapter("audio/vggish", {"weights": "none"}).results}
    assert outcomes["fingerprint options"] == "pass"  # short_audio changes it


def test_the_listing_shows_every_other_adapter_and_says_which_plugin_is_broken_and_why(pair_plugins):
    result = CliRunner().invoke(main, ["modalities"])
    assert result.exit_code == 0, result.output
    table, _, notes = result.output.partition("\n\n")
    for key in ("audio/vggish", "image/clip", "text/clip", "pair/good", "pair/random"):
        assert key in table
    assert "pair/raises: adapter 'pair/raises' from distribution 'pair-plugin' cannot be described: " \
           "RuntimeError: needs a licence key" in notes
    assert "pair/dim-text: adapter 'pair/dim-text' from distribution 'pair-plugin' declares dim '3'" in notes
    assert "pair/missing: adapter 'pair/missing' from distribution 'missing-plugin' failed to import" in notes
    assert "needs pairlib 2" in notes
    rows = {r["key"]: r for r in json.loads(CliRunner().invoke(main, ["modalities", "--json"]).output)}
    assert rows["audio/vggish"]["dim"] == 128 and rows["pair/good"]["dim"] == 3
    assert {k for k, r in rows.items() if "error" in r} == {"pair/raises", "pair/dim-text", "pair/missing"}
