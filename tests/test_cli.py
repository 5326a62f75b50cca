"""The command line: real output, one-line errors with exit status 2, nothing stored lost on bad input."""

import json

import pandas as pd
from conftest import ROOT, run_cli


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_help_on_every_command():
    for args in ([], ["data"], ["data", "show"], ["data", "import-openai"], ["data", "list"], ["run"]):
        proc = run_cli(*args, "--help")
        assert proc.returncode == 0 and "Usage:" in proc.stdout, args


def test_data_show_prints_two_queries_with_references():
    proc = run_cli("data", "show", "tldr", "--split", "valid2", "-n", "2", check=True)
    assert proc.stdout.count("SUBREDDIT: r/") == 2
    assert proc.stdout.count("\nTL;DR:\n--- reference:\n") == 2
    assert "valid2" in proc.stdout


def test_import_openai_writes_tables_and_counts(tmp_path):
    out = tmp_path / "released"
    proc = run_cli("data", "import-openai", "batch18", "--out", out, check=True)
    assert "sup4_6b " in proc.stdout and "30/85" in proc.stdout
    j = pd.read_parquet(out / "judgments.parquet")
    g = pd.read_parquet(out / "generations.parquet")
    assert len(j) == 674 and set(j["labeler_kind"]) == {"imported"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][0]["path"].endswith("batch18.json") and len(manifest["inputs"][0]["sha256"]) == 64
    assert manifest["outputs"]["generations"] == len(g)
    again = run_cli("data", "import-openai", "batch18", "--out", out, check=True)
    assert "up to date" in again.stdout


def test_bad_inputs_exit_2_and_keep_stored_tables(tmp_path):
    out = tmp_path / "released"
    run_cli("data", "import-openai", "batch18", "--out", out, check=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    good = (ROOT / "evalkit/data/bundled/openai_sff/batch18.json").read_text().splitlines()
    truncated = tmp_path / "truncated.json"
    truncated.write_text("\n".join(good[:3]) + "\n" + good[3][:100] + "\n")
    assert_one_line_error(run_cli("data", "import-openai", truncated, "--out", out), "truncated.json:4", "malformed JSON")

    empty = tmp_path / "empty.json"
    empty.write_text("")
    assert_one_line_error(run_cli("data", "import-openai", empty, "--out", out), "empty file")
    assert_one_line_error(run_cli("data", "import-openai", tmp_path / "nope.json", "--out", out), "nope.json")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    csv = tmp_path / "news.csv"
    csv.write_text("article,id\nhello,1\n")
    assert_one_line_error(run_cli("data", "show", "cnndm", "--path", csv), "missing column 'highlights'")
    assert_one_line_error(run_cli("data", "show", "tldr", "--split", "valid3"), "unknown split 'valid3'", "valid2")
    assert_one_line_error(run_cli("data", "show", "reddit"), "unknown dataset 'reddit'", "tldr")


def test_run_rejects_bad_overrides(tmp_path):
    assert_one_line_error(run_cli("run", "studies/default", "--set", "data.n_items=many"), "data.n_items=many", "expected int")
    assert_one_line_error(run_cli("run", "studies/default", "--set", "data.colour=red"), "unknown key 'colour'")
    assert_one_line_error(run_cli("run", tmp_path), "no study spec")
    bad = tmp_path / "study.toml"
    bad.write_text("[data]\nsplit = 3\n")
    assert_one_line_error(run_cli("run", bad), "data.split", "expected str")
