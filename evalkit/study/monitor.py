"""The researcher's live view of a served study (the admin page): per labeler, done / assigned and every quality
figure of ``evalkit.analysis.quality`` with its flags; per policy, the running preference rate against the baseline
with its Wilson interval (never shown to labelers). The page refreshes itself from ``stats.json`` every few seconds
(the table is rebuilt with text nodes only: nothing a labeler wrote can run); ``stats.csv`` downloads the labeler table.
"""

from __future__ import annotations

import json
import math
import sqlite3

import pandas as pd

from evalkit import artifacts
from evalkit.analysis.quality import labeler_quality, running_rates
from evalkit.config import QualityConfig
from evalkit.study.exchange import human_judgment_id
from evalkit.vocab import confidence_side

REFRESH_S = 5
LABELER_COLUMNS = ("labeler_id", "done", "assigned", "median_seconds", "gold_accuracy", "n_gold", "attention_failures", "n_attention",
                   "agreement_with_others", "n_shared", "agreement_with_researcher", "n_researcher", "left_rate", "flags", "excluded")
POLICY_COLUMNS = ("policy_id", "n", "wins", "rate", "wilson_low", "wilson_high")

MONITOR_SCRIPT = """<script>(function(){var url=document.getElementById('monitor').dataset.stats;
function fill(id,cols,rows){var t=document.getElementById(id);while(t.rows.length>1)t.deleteRow(1);
rows.forEach(function(r){var tr=t.insertRow();tr.className=r.flags?'flagged':'';cols.forEach(function(c){var v=r[c];
tr.insertCell().textContent=v===null||v===undefined?'\\u2014':(typeof v==='number'&&!Number.isInteger(v)?v.toFixed(3):String(v));});});}
function load(){fetch(url,{cache:'no-store'}).then(function(r){return r.json();}).then(function(s){
fill('labelers',s.labeler_columns,s.labelers);fill('policies',s.policy_columns,s.policies);
document.getElementById('updated').textContent=s.updated;document.getElementById('summary').textContent=s.summary;});}
load();setInterval(load,%d);})();</script>""" % (REFRESH_S * 1000)


def web_judgments(conn: sqlite3.Connection, source: str) -> pd.DataFrame:
    """The app's stored answers as ``judgments`` rows (``labeler_kind="human"``, the side chosen and the preferred
    generation read from the 9-point confidence, the left/right swap undone by the generation ids)."""
    df = pd.read_sql_query("SELECT j.*, t.gen_id_left, t.gen_id_right, t.kind FROM judgments j JOIN tasks t USING (task_id)", conn)
    pairwise = df["kind"] == "pairwise"
    df["preferred"] = None
    df.loc[pairwise, "preferred"] = [confidence_side(c) for c in df.loc[pairwise, "confidence"]]
    df["preferred_gen_id"] = df["gen_id_left"].where(df["preferred"] == "left", df["gen_id_right"]).where(pairwise, None)
    df["judgment_id"] = [human_judgment_id(t, lab) for t, lab in zip(df["task_id"], df["labeler_id"])]
    df["labeler_kind"] = "human"
    df["source"] = source
    df["submitted_at"] = pd.to_datetime(df["submitted_at"], utc=True)
    return artifacts.conform(df.drop(columns=["gen_id_left", "gen_id_right", "kind"]), "judgments")


def researcher_labels(conn: sqlite3.Connection) -> pd.DataFrame:
    """The researcher's answers: one per comparison (item, unordered pair), with the generation preferred."""
    df = pd.read_sql_query("SELECT item_id, pair, gen_id_left, gen_id_right, confidence, note FROM researcher", conn)
    side = [confidence_side(c) for c in df["confidence"]]
    df["preferred_gen_id"] = [left if s == "left" else right if s == "right" else None
                              for s, left, right in zip(side, df["gen_id_left"], df["gen_id_right"])]
    return df


def study_stats(tables: dict[str, pd.DataFrame], rules: QualityConfig, researcher: pd.DataFrame, assigned: dict[str, int],
                baseline: str) -> dict:
    """Everything the admin page shows, as plain JSON values (NaN as null)."""
    quality = labeler_quality(tables, rules, researcher)
    done = tables["judgments"].groupby("labeler_id").size()
    labelers = sorted(set(assigned) | set(done.index))
    table = pd.DataFrame({"labeler_id": labelers}).merge(quality, on="labeler_id", how="left")
    table["done"] = table["labeler_id"].map(done).fillna(0).astype(int)
    table["assigned"] = table["labeler_id"].map(assigned).fillna(0).astype(int)
    table["flags"] = table["flags"].fillna("")
    table["excluded"] = table["excluded"].fillna("")
    rates = running_rates(tables, baseline)
    flagged = int((table["flags"] != "").sum())
    return {"labeler_columns": list(LABELER_COLUMNS), "policy_columns": list(POLICY_COLUMNS),
            "labelers": _records(table, LABELER_COLUMNS), "policies": _records(rates, POLICY_COLUMNS),
            "summary": f"{int(table['done'].sum())} of {int(table['assigned'].sum())} tasks done by {len(table)} labelers; "
                       f"{flagged} flagged; {len(researcher)} researcher labels; rates against {baseline} (Wilson 95%)",
            "updated": pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%d %H:%M:%S UTC")}


def _records(df: pd.DataFrame, columns) -> list[dict]:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v.item() if hasattr(v, "item") else v

    return [{c: clean(r.get(c)) for c in columns} for r in df.to_dict("records")]


def stats_csv(stats: dict) -> str:
    return pd.DataFrame(stats["labelers"], columns=stats["labeler_columns"]).to_csv(index=False)


def stats_json(stats: dict) -> str:
    return json.dumps(stats, allow_nan=False)
