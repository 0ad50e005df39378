"""The vocabulary of zero-shot classification: prompt templates, class names in prompts, the text side.

Plain data and rules, used both to check a recipe's ``eval.zero_shot`` sets
before any work and to run them (:mod:`coembed.zeroshot`).
"""

from __future__ import annotations

from collections.abc import Sequence

#: Built-in prompt template sets; ``{}`` stands for the class name. A model's
#: modality uses the set named after its adapter's kind (``audio`` for
#: ``audio/vggish``), else ``plain``.
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "plain": ("{}",),
    "audio": (
        "a sound of a {}.",
        "the sound of {}.",
        "a recording of {}.",
        "this is the sound of {}.",
        "{} can be heard.",
    ),
    "image": (
        "a photo of a {}.",
        "a blurry photo of a {}.",
        "a close-up photo of a {}.",
        "a photo of the {}.",
        "a drawing of a {}.",
        "a photo of many {}.",
    ),
}
TOP_K = 5


def resolve_templates(templates: str | Sequence[str] | None, kind: str) -> list[str]:
    """The prompt templates: a list as given, a built-in set by name, or the set for ``kind``."""
    if templates is None:
        return list(TEMPLATE_SETS.get(kind, TEMPLATE_SETS["plain"]))
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ValueError(f"unknown template set {templates!r}; built-in sets: {', '.join(TEMPLATE_SETS)} "
                             "(or give a list of templates with '{}')")
        return list(TEMPLATE_SETS[templates])
    out = list(templates)
    if not out:
        raise ValueError("templates: at least one template is needed")
    for t in out:
        if t.count("{}") != 1:
            raise ValueError(f"template {t!r} must hold '{{}}' exactly once, where the class name goes")
    return out


def prompt_name(label: str) -> str:
    """How a class label reads in a prompt: ``"chirping_birds"`` -> ``"chirping birds"``."""
    return " ".join(label.replace("_", " ").split())


def text_side(kinds: dict[str, str], requested: str | None, classified: str) -> str:
    """The modality that reads the prompts: ``requested``, else ``text``, else the only text-taking one.

    ``kinds`` maps each modality to how its adapter takes input (``"text"`` or ``"file"``).
    """
    if requested is not None:
        if requested not in kinds:
            raise ValueError(f"text_modality {requested!r} is not one of the modalities {sorted(kinds)}")
        if kinds[requested] != "text":
            raise ValueError(f"text_modality {requested!r} does not take text")
        found = requested
    elif kinds.get("text") == "text":
        found = "text"
    else:
        texts = [m for m, k in kinds.items() if k == "text"]
        if len(texts) != 1:
            raise ValueError("zero-shot classification needs a text side, a modality whose adapter takes text "
                             f"(e.g. text/clip); {'none' if not texts else 'several: ' + ', '.join(texts)} found: "
                             "name it with text_modality")
        found = texts[0]
    if found == classified:
        raise ValueError(f"the classified modality {classified!r} cannot be its own text side")
    return found
