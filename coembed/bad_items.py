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


def top_reasons(rows: Iterable[BadItemRow], n: int = 3) -> str:
    """The ``n`` most common reason kinds of ``rows`` with their counts: ``"too short (2,960), unreadable (15)"``."""
    counts = sorted(count_reasons(rows).items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{reason} ({count:,})" for reason, count in counts[:n])


def _over(n_bad: int, n_total: int, limit: float) -> bool:
    frac = bad_fraction(n_bad, n_total)
    return bool(n_total) and frac > limit and not math.isclose(frac, limit)


def _refuse(what: str, n_bad: int, n_total: int, rows: Sequence[BadItemRow], limit: float) -> None:
    raise TooManyBadItems(f"{what.format(bad=f'{n_bad:,}', total=f'{n_total:,}')} "
                          f"({bad_fraction(n_bad, n_total):.0%}), above the limit "
                          f"data.max_bad_fraction={limit:g}; most common reasons: "
                          f"{top_reasons(rows) or 'none recorded'}; see bad_items.jsonl in the run folder")


def check_bad_fraction(rows: Sequence[BadItemRow], good: Mapping[str, int], limit: float) -> None:
    """Fail when, for any modality, the share of its items that are bad passes ``limit`` (the recipe's
    ``data.max_bad_fraction``).

    ``rows`` are the bad-item rows (flagged rows are kept items and are not counted); ``good`` the number of
    usable items of each modality. A row without a modality (an input that became no record at all) counts
    against every modality. The message names the modality, the count, the most common reasons and the setting.
    """
    bad = [row for row in rows if not row.get("flagged")]
    lost_records = [row for row in bad if row.get("modality") is None]
    for modality, n_good in good.items():
        of_it = [row for row in bad if row.get("modality") == modality] + lost_records
        if _over(len(of_it), n_good + len(of_it), limit):
            _refuse(f"modality {modality}: {{bad}} of {{total}} items are bad", len(of_it), n_good + len(of_it),
                    of_it, limit)


def check_pair_fraction(rows: Sequence[BadItemRow], pair: tuple[str, str], n_candidates: int, n_pairs: int,
                        limit: float) -> None:
    """Fail when a pair type lost more than ``limit`` of its candidate pairs to bad items.

    ``n_candidates``: the records holding both modalities' items plus the inputs that became no record;
    ``n_pairs``: the pairs made of them. Each modality can pass :func:`check_bad_fraction` while their bad
    items, on different records, leave few pairs.
    """
    a, b = pair
    lost = n_candidates - n_pairs
    if _over(lost, n_candidates, limit):
        of_it = [row for row in rows if not row.get("flagged") and row.get("modality") in (a, b, None)]
        _refuse(f"pair type {a}-{b}: {{bad}} of {{total}} candidate pairs were lost to bad items", lost,
                n_candidates, of_it, limit)
