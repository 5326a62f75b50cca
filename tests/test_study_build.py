"""evalkit study build: balanced, seeded, blind tasks with overlap, gold, attention and sentinels."""

import dataclasses

import pytest
from conftest import baseline_study, run_cli

from evalkit import artifacts
from evalkit.study.build import build_study

SETTINGS = ["data.n_items=0", "design.sentinel_policy=lead3", "design.items_per_policy=80", "labelers.count=8", "design.batch_size=30"]


@pytest.fixture(scope="module")
def study_cfg(tmp_path_factory):
    return baseline_study(tmp_path_factory.mktemp("study"), *SETTINGS)[0]


@pytest.fixture(scope="module")
def built(study_cfg):
    return build_study(study_cfg)


def test_same_spec_and_seed_give_identical_tables(study_cfg, built):
    first = (built["out_dir"] / "tasks.parquet").read_bytes()
    again = build_study(study_cfg)
    assert (again["out_dir"] / "tasks.parquet").read_bytes() == first
    other = build_study(dataclasses.replace(study_cfg, study=dataclasses.replace(study_cfg.study, seed=1)))
    assert (other["out_dir"] / "tasks.parquet").read_bytes() != first
    build_study(study_cfg)  # leave the module's folder as built


def test_policies_are_balanced_and_swaps_recorded(built):
    tasks, gens = built["tasks"], built["generations"]
    artifacts.validate(tasks, "tasks")
    policy_of = gens.set_index("gen_id")["policy_id"]
    main = tasks[tasks["role"].isin(["main", "overlap"])].drop_duplicates("unit_id")
    pairs = main.assign(left=main["gen_id_left"].map(policy_of), right=main["gen_id_right"].map(policy_of))
    pairs["policy"] = pairs["left"].where(pairs["right"] == "ref", pairs["right"])
    items = pairs.groupby("policy")["item_id"].apply(set)
    assert set(items.index) == {"openai-ppo-1.3b", "lead3"} and items["openai-ppo-1.3b"] == items["lead3"]
    assert len(items["lead3"]) == 80
    # not swapped: the policy on the left and the baseline on the right; swapped: the reverse
    assert ((pairs["left"] == "ref") == pairs["is_swapped"]).all()
    assert 0.35 < pairs["is_swapped"].mean() < 0.65


def test_overlap_units_go_to_three_labelers(built):
    tasks = built["tasks"]
    overlap = tasks[tasks["role"] == "overlap"]
    per_unit = overlap.groupby("unit_id")["labeler_id"].nunique()
    assert (per_unit == 3).all()
    n_main_units = tasks[tasks["role"].isin(["main", "overlap"])]["unit_id"].nunique()
    assert per_unit.size == round(0.15 * n_main_units)


def test_gold_and_attention_answers_are_known(built):
    tasks, gens = built["tasks"], built["generations"].set_index("gen_id")
    qc = tasks[tasks["role"].isin(["gold", "attention"])]
    assert set(qc["role"]) == {"gold", "attention"}
    for t in qc.itertuples():
        right = t.gen_id_left if t.expected == "left" else t.gen_id_right
        wrong = t.gen_id_right if t.expected == "left" else t.gen_id_left
        assert gens.loc[right, "policy_id"] == "ref" and gens.loc[right, "item_id"] == t.item_id
        assert gens.loc[wrong, "policy_id"] == ("qc-other-post" if t.role == "gold" else "qc-shuffled-words")
        if t.role == "attention":
            assert sorted(gens.loc[wrong, "text"].split()) == sorted(gens.loc[right, "text"].split())
    assert set(qc["expected"]) == {"left", "right"}


def test_sentinels_in_every_batch(built):
    tasks = built["tasks"]
    batches = tasks.groupby(["labeler_id", "batch"])["role"].apply(lambda r: (r == "sentinel").sum())
    assert (batches == 2).all() and len(batches) >= 8


def test_nothing_labeler_facing_names_a_policy(built):
    tasks = built["tasks"]
    for policy in ("openai", "lead3", "ref", "ppo"):
        for col in ("task_id", "gen_id_left", "gen_id_right", "item_id", "unit_id"):
            assert not tasks[col].dropna().str.contains(policy).any(), (policy, col)


def test_bad_specs_exit_2(study_cfg, tmp_path):
    out = study_cfg.out_dir
    for settings, message in ((["design.policies=sup4_9b"], "unknown policy 'sup4_9b'; known: lead3, openai-ppo-1.3b, ref"),
                              (["design.overlap_fraction=1.5"], "expected a fraction"),
                              (["labelers.count=2"], "overlap needs 3 labelers")):
        proc = run_cli("study", "build", "studies/default", "--set", f"study.out_dir={out}", *[x for s in settings for x in ("--set", s)])
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    proc = run_cli("study", "build", "studies/default", "--set", f"study.out_dir={tmp_path}")
    assert proc.returncode == 2 and "no generations at" in proc.stderr


# ------------------------------------------------------------------------------------------------- crowd exchange

def answers_for(tasks, rng_seed=0):
    """A made-up crowd's answers: pairwise confidence and Likert ratings per task."""
    import numpy as np

    rng = np.random.default_rng(rng_seed)
    out = []
    for t in tasks.itertuples():
        conf = int(rng.choice([1, 2, 3, 4, 6, 7, 8, 9]))
        out.append({"task_id": t.task_id, "labeler_id": t.labeler_id, "confidence": conf, "note": f"n{conf}"})
    return out


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "labelstudio"])
def test_export_is_blind_and_import_round_trips(built, study_cfg, tmp_path, fmt):
    import csv as csvmod
    import json

    from evalkit.study.exchange import CONFIDENCE_LABELS, export_tasks, import_answers

    folder = built["out_dir"]
    (folder / "judgments.parquet").unlink(missing_ok=True)
    path = export_tasks(folder, fmt, tmp_path / f"tasks.{ 'json' if fmt == 'labelstudio' else fmt}")
    text = path.read_text()
    for secret in ("openai", "lead3", "qc-", "gen-"):
        assert secret not in text, secret
    tasks = built["tasks"]
    answers = answers_for(tasks)
    if fmt == "csv":
        rows = list(csvmod.DictReader(path.open()))
        assert {r["task_id"] for r in rows} == set(tasks["task_id"])
        out = tmp_path / "answers.csv"
        with out.open("w", newline="") as fh:
            w = csvmod.DictWriter(fh, fieldnames=["task_id", "labeler_id", "confidence", "note"])
            w.writeheader()
            w.writerows(answers)
    elif fmt == "jsonl":
        out = tmp_path / "answers.jsonl"
        out.write_text("".join(json.dumps(a) + "\n" for a in answers))
    else:
        exported = json.loads(text)
        assert (tmp_path / "tasks.config.json").is_file()
        by_task = {a["task_id"]: a for a in answers}
        for task in exported:
            a = by_task[task["data"]["task_id"]]
            task["annotations"] = [{"completed_by": a["labeler_id"], "lead_time": 12.5, "created_at": "2026-11-30T10:00:00Z",
                                    "result": [{"from_name": "preference", "value": {"choices": [CONFIDENCE_LABELS[a["confidence"]]]}},
                                               {"from_name": "note", "value": {"text": [a["note"]]}}]}]
        out = tmp_path / "answers.json"
        out.write_text(json.dumps(exported))
    judgments = import_answers(folder, out)
    assert len(judgments) == len(tasks) and set(judgments["labeler_kind"]) == {"human"}
    j = judgments.merge(tasks, on=["task_id", "labeler_id"])
    expected_side = j["confidence"].map(lambda c: "left" if c < 5 else "right")
    assert (j["preferred"] == expected_side).all()
    chosen = j["gen_id_left"].where(j["preferred"] == "left", j["gen_id_right"])
    assert (j["preferred_gen_id"] == chosen).all()  # the swap is undone through the shown sides
    assert (j["note"] == "n" + j["confidence"].astype(str)).all()
    again = import_answers(folder, out)
    assert len(again) == len(judgments)  # re-importing the same file adds nothing


def test_bad_answer_files_exit_2_and_import_nothing(built, study_cfg, tmp_path):
    from evalkit.study.exchange import import_answers

    folder = built["out_dir"]
    (folder / "judgments.parquet").unlink(missing_ok=True)
    good = answers_for(built["tasks"].head(3))
    import_answers(folder, _write(tmp_path / "ok.jsonl", good))
    before = (folder / "judgments.parquet").read_bytes()
    cases = [
        ("missing.csv", "task_id,confidence\nx,3\n", "missing column 'task_id' or 'labeler_id'"),
        ("unknown.jsonl", _lines(good[:1] + [{**good[1], "task_id": "t-nope"}]), ":2: unknown task id 't-nope'"),
        ("study.jsonl", _lines([{**good[0], "study_id": "another"}]), ":1: study 'another' is not this study"),
        ("range.jsonl", _lines([{**good[0], "confidence": 5}]), ":1: confidence is 5"),
        ("empty.csv", "", "empty file"),
    ]
    for name, content, message in cases:
        path = tmp_path / name
        path.write_text(content)
        proc = run_cli("study", "import", "studies/default", path, "--set", f"study.out_dir={study_cfg.out_dir}", *[x for s in SETTINGS for x in ("--set", s)])
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, (name, proc.stderr)
        assert (folder / "judgments.parquet").read_bytes() == before


def _lines(rows):
    import json

    return "".join(json.dumps(r) + "\n" for r in rows)


def _write(path, rows):
    path.write_text(_lines(rows))
    return path
