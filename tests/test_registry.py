import pytest
import torch

from coembed.registry import (AdapterError, available_adapters, create_adapter, describe_adapters,
                              get_adapter_class)
from plugins import TOY_ADAPTER_SOURCE, install_plugin

BUILTIN = {"image/clip", "text/clip", "audio/vggish", "text/sentence-transformers"}


def test_builtin_adapters_register_through_entry_points():
    adapters = available_adapters()
    assert BUILTIN <= set(adapters)
    assert all(adapters[k].distribution == "coembed" for k in BUILTIN)


def test_third_party_plugin_adds_a_modality(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "toy-plugin", {"toy/vector": "toy_adapter:ToyVectorAdapter"},
                   {"toy_adapter": TOY_ADAPTER_SOURCE})
    assert "toy/vector" in available_adapters()
    adapter = create_adapter("toy/vector", dim=6)
    out = adapter.encode_items([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    assert out.shape == (2, 6) and out.dtype == torch.float32
    assert not torch.allclose(out[0], out[1])
    row = next(r for r in describe_adapters() if r["key"] == "toy/vector")
    assert row["dim"] == 8 and row["distribution"] == "toy-plugin"


def test_broken_plugin_is_reported_by_name_and_spares_the_others(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "broken-plugin", {"toy/broken": "broken_adapter:Nope"},
                   {"broken_adapter": "raise ImportError('missing dependency xyz')\n"})
    rows = {r["key"]: r for r in describe_adapters()}
    assert "missing dependency xyz" in rows["toy/broken"]["error"]
    assert "broken-plugin" in rows["toy/broken"]["error"]
    assert "error" not in rows["text/clip"]
    with pytest.raises(AdapterError, match="toy/broken"):
        get_adapter_class("toy/broken")


def test_plugins_can_be_switched_off(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "toy-plugin", {"toy/vector": "toy_adapter:ToyVectorAdapter"},
                   {"toy_adapter": TOY_ADAPTER_SOURCE})
    monkeypatch.setenv("COEMBED_DISABLE_PLUGINS", "1")
    assert "toy/vector" not in available_adapters()
    assert BUILTIN <= set(available_adapters())


def test_unknown_adapter_lists_the_known_ones():
    with pytest.raises(AdapterError, match="audio/vggish"):
        get_adapter_class("audio/nope")


def test_mismatched_entry_point_name_is_refused(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "liar-plugin", {"audio/liar": "toy_adapter:ToyVectorAdapter"},
                   {"toy_adapter": TOY_ADAPTER_SOURCE})
    with pytest.raises(AdapterError, match="declares 'toy/vector'"):
        get_adapter_class("audio/liar")


def test_fingerprint_tracks_output_changing_options_only(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "toy-plugin", {"toy/vector": "toy_adapter:ToyVectorAdapter"},
                   {"toy_adapter": TOY_ADAPTER_SOURCE})
    a = create_adapter("toy/vector", seed=1)
    assert a.fingerprint == create_adapter("toy/vector", seed=1, device="cpu").fingerprint
    assert a.fingerprint != create_adapter("toy/vector", seed=2).fingerprint
    assert a.fingerprint.startswith("toy-vector-")
