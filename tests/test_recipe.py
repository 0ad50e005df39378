from pathlib import Path

import pytest

from coembed.config import apply_overrides
from coembed.errors import RecipeError
from coembed.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_shipped_recipes_are_valid():
    quick = load_recipe(RECIPES / "quickstart.yaml")
    assert quick.anchor == "image" and quick.pairs == [("image", "audio")]
    paper = load_recipe(RECIPES / "image_audio.yaml")
    assert paper.train.lr == 1e-4 and paper.train.batch_size == 4096 and paper.train.epochs == 300
    assert paper.train.optimizer == "adam" and paper.data.split.validation == 0.33
    assert paper.modalities["image"].adapter_options == {"model": "ViT-B-32", "pretrained": "openai"}
    assert paper.modalities["image"].head.type == "identity"
    assert paper.modalities["audio"].head.type == "linear"


def test_overrides_reach_any_value():
    recipe = load_recipe(RECIPES / "quickstart.yaml",
                         ["train.epochs=5", "train.lr=0.01", "modalities.audio.head.type=mlp", "data.classes=3"])
    assert recipe.train.epochs == 5 and recipe.train.lr == 0.01
    assert recipe.modalities["audio"].head.type == "mlp"
    assert recipe.data.source_options["classes"] == 3


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(RECIPES / "quickstart.yaml")
    assert recipe.resolve_path("data/x") == tmp_path / "data/x"
    assert recipe.resolve_path("/abs/x") == Path("/abs/x")


@pytest.mark.parametrize("override, key, hint", [
    ("train.epochz=5", "train.epochz", "unknown key"),
    ("train.epochs=-1", "train.epochs", "greater than 0"),
    ("train.optimizer=sgd", "train.optimizer", "'adam' or 'adamw'"),
    ("modalities.audio.head.type=conv", "modalities.audio.head.type", "'identity', 'linear', 'mlp' or 'asif'"),
    ("modalities.audio.weightz=release", "modalities.audio.weightz", "accepts:"),
    ("modalities.audio.adapter=nope", "modalities.audio.adapter", "registered adapters"),
    ("anchor=video", "anchor", "not one of the modalities"),
    ("data.source=ftp", "data.source", "allowed:"),
    ("data.clases=3", "data.clases", "accepts:"),
    ("train.select_metric=audio->image/R@2", "train.select_metric", "audio->image/R@1"),
    ("modalities.audio.head.type=identity", "modalities", "nothing can be trained"),
])
def test_invalid_recipes_name_the_key_and_what_is_allowed(override, key, hint):
    with pytest.raises(RecipeError) as info:
        load_recipe(RECIPES / "quickstart.yaml", [override])
    message = str(info.value)
    assert key.split(".")[-1] in message and hint in message


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="key.subkey=value"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(bad)


def test_pairs_must_name_known_distinct_modalities():
    with pytest.raises(RecipeError, match="pairs"):
        load_recipe(RECIPES / "quickstart.yaml", ["pairs=[[image, image]]"])
    with pytest.raises(RecipeError, match="pairs"):
        load_recipe(RECIPES / "quickstart.yaml", ["pairs=[[image, smell]]"])


def test_select_metric_takes_any_value_an_epoch_records():
    for metric in ("mean_r1", "loss", "image->audio/median_rank", "audio->image/mAP", "audio->image/chance/R@5"):
        assert load_recipe(RECIPES / "quickstart.yaml", [f"train.select_metric={metric}"]).train.select_metric == metric


def test_broken_yaml_names_the_file_and_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("name: demo\ndata:\n  source: manifest\n  path: [data/manifest.csv\ntrain:\n  epochs: 3\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    message = str(caught.value)
    assert f"{recipe}, line 5, column 6: not valid YAML: while parsing a flow sequence" in message
    assert "<unicode string>" not in message
    tabbed = tmp_path / "tabbed.yaml"
    tabbed.write_text("name: demo\ntrain:\n\tepochs: 3\n")
    with pytest.raises(RecipeError, match=r"tabbed.yaml, line 3, column 1: not valid YAML"):
        load_recipe(tabbed)
