"""Whose labels an analysis reads: people's, the simulated panel's or one judge's, never pooled unless asked.

A study's judgments fall into label sets: ``people`` (labeler kinds human and imported), ``simulated`` (the simulated
panel; its judge named in each judgment's source), and one set per automatic judge (kinds model and llm; the set is
named by the judge's id, its ``labeler_id``). ``select_labels`` picks one set: by default people's when there are
any, else the simulated panel's, else the one judge's; ``all`` pools every set (only when asked).
"""

from __future__ import annotations

import pandas as pd

from evalkit.errors import EvalkitError
from evalkit.vocab import PEOPLE_KINDS

PEOPLE, SIMULATED, ALL = "people", "simulated", "all"
PANEL_SOURCE = "simulated-panel"  # a simulated judgment's source: "simulated-panel:<judge id>"
KIND_WORDS = {"human": "human labels", "imported": "imported human labels (OpenAI release)"}


def label_sets(judgments: pd.DataFrame) -> pd.Series:
    """Each judgment's label set: people, simulated, or the judge's id."""
    kind = judgments["labeler_kind"].fillna("")
    out = judgments["labeler_id"].astype(str).copy()
    out[kind.isin(PEOPLE_KINDS)] = PEOPLE
    out[kind == "simulated"] = SIMULATED
    return out


def default_labels(judgments: pd.DataFrame) -> str:
    sets = set(label_sets(judgments))
    for first in (PEOPLE, SIMULATED):
        if first in sets:
            return first
    if len(sets) == 1:
        return next(iter(sets))
    raise EvalkitError(f"this study's labels come from several judges ({', '.join(sorted(sets))}) and no people; "
                       "choose one with report.labels")


def describe(judgments: pd.DataFrame, labels: str) -> str:
    """Whose labels these are, in words (a figure's title says it)."""
    if labels == PEOPLE:
        return ", ".join(KIND_WORDS[k] for k in sorted(set(judgments["labeler_kind"].dropna()))) or "no labels"
    if labels == SIMULATED:
        judges = sorted({s.partition(":")[2] for s in judgments["source"].dropna() if str(s).startswith(PANEL_SOURCE + ":")})
        return "SIMULATED panel" + (f" on judge {', '.join(judges)}" if judges else "") + ", not people"
    if labels == ALL:
        return "ALL labels pooled: " + ", ".join(sorted(set(label_sets(judgments))))
    return f"judge {labels}, not people"


def select_labels(judgments: pd.DataFrame, labels: str = "") -> tuple[pd.DataFrame, str, str]:
    """(the judgments of one label set, its name, its description). ``labels``: "" (the default rule), people,
    simulated, a judge's id, or all."""
    if judgments.empty:
        return judgments, labels or PEOPLE, "no labels"
    name = labels or default_labels(judgments)
    sets = label_sets(judgments)
    if name == ALL:
        chosen = judgments
    elif name in set(sets):
        chosen = judgments[sets == name]
    else:
        raise EvalkitError(f"labels {name!r}: this study has {', '.join(sorted(set(sets)))}; expected one of them or {ALL!r}")
    return chosen, name, describe(chosen, name)


def machine_sets(judgments: pd.DataFrame, chosen: str) -> list[str]:
    """The other label sets of a study that are not people's (for agreement on shared tasks)."""
    return sorted(set(label_sets(judgments)) - {chosen, PEOPLE})


def set_judgments(judgments: pd.DataFrame, name: str) -> pd.DataFrame:
    return judgments[label_sets(judgments) == name]
