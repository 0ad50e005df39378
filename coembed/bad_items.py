"""Bad and flagged items: the one row format of ``bad_items.jsonl``, reason kinds, the bad-fraction rule.

A *bad* item was skipped (unreadable, too short, refused by a setting, ...); a
*flagged* item was kept although suspect (silent audio with
``data.silent_audio: keep``, a short clip padded or repeated to fill its
encoder's window). Both are written as rows ``{"id", "modality",
"reason"}`` (flagged ones with ``"flagged": true``), whoever found them: a data
source, the extraction or an evaluation.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from coembed.errors import TooManyBadItems

#: One line of ``bad_items.jsonl``.
BadItemRow = dict[str, Any]


def bad_row(item_id: str, modality: str | None, reason: str) -> BadItemRow:
    """The row of a skipped item (``modality`` is ``None`` for an input that became no record at all)."""
    return {"id": item_id, "modality": modality, "reason": reason}


def flagged_row(item_id: str, modality: str, reason: str) -> BadItemRow:
    """The row of an item kept although suspect."""
    return {"id": item_id, "modality": modality, "reason": reason, "flagged": True}


def rows_of(ids: Sequence[str], modality: str, reasons: Mapping[int, str], flagged: bool = False) -> list[BadItemRow]:
    """Rows for ``reasons`` (position in ``ids`` -> reason), in the order of ``ids``."""
    make = flagged_row if flagged else bad_row
    return [make(ids[i], modality, reason) for i, reason in sorted(reasons.items())]


def reason_kind(reason: str) -> str:
    """The kind of a bad-item reason, for summaries: the text before any colon or parenthesis."""
    return reason.split(":")[0].split("(")[0].strip()


def count_reasons(rows: Iterable[BadItemRow]) -> dict[str, int]:
    """How many rows have each reason kind."""
    return dict(Counter(reason_kind(row["reason"]) for row in rows))


def bad_fraction(n_bad: int, n_total: int) -> float:
    return n_bad / n_total if n_total else 0.0


def check_bad_fraction(n_bad: int, n_total: int, limit: float) -> None:
    """Fail when the share of bad items passes ``limit`` (the recipe's ``data.max_bad_fraction``)."""
    frac = bad_fraction(n_bad, n_total)
    if n_total and frac > limit and not math.isclose(frac, limit):
        raise TooManyBadItems(f"{n_bad} of {n_total} items are bad ({frac:.0%}), above the limit "
                              f"data.max_bad_fraction={limit:g}; see bad_items.jsonl in the run folder")
