"""Schemas, validation messages, atomic Parquet writes and manifests."""

import json

import pandas as pd
import pytest

from evalkit import artifacts
from evalkit.errors import EvalkitError


@pytest.fixture
def gens(batch_tables):
    return batch_tables["batch18"]["generations"].copy()


def test_round_trip_is_exact(tmp_path, batch_tables):
    for name in ("items", "generations", "tasks", "judgments"):
        df = batch_tables["batch18"][name]
        artifacts.write_table(df, tmp_path / f"{name}.parquet", name)
        back = artifacts.read_table(tmp_path / f"{name}.parquet", name)
        assert list(back.columns) == [c.name for c in artifacts.SCHEMAS[name]]
        assert len(back) == len(df)
        pd.testing.assert_frame_equal(back.reset_index(drop=True), df[back.columns].reset_index(drop=True), check_dtype=False)


def test_same_input_same_bytes(tmp_path, gens):
    a = artifacts.write_table(gens, tmp_path / "a.parquet", "generations")
    b = artifacts.write_table(gens, tmp_path / "b.parquet", "generations")
    assert a.read_bytes() == b.read_bytes()


def test_missing_column_is_named(gens):
    with pytest.raises(EvalkitError, match="missing column 'policy_kind'"):
        artifacts.validate(gens.drop(columns="policy_kind"), "generations")


def test_mistyped_column_is_named(gens):
    gens["sample_idx"] = "zero"
    with pytest.raises(EvalkitError, match="column 'sample_idx' should hold int values"):
        artifacts.validate(gens, "generations")


def test_bad_enum_and_nulls_and_duplicates(gens):
    with pytest.raises(EvalkitError, match="unknown value 'rlhf'"):
        artifacts.validate(gens.assign(policy_kind="rlhf"), "generations")
    with pytest.raises(EvalkitError, match="'text' has 1 missing values"):
        artifacts.validate(gens.assign(text=[None] + list(gens["text"][1:])), "generations")
    with pytest.raises(EvalkitError, match="duplicate gen_id"):
        artifacts.validate(pd.concat([gens, gens.head(1)]), "generations")


def test_failed_write_keeps_previous_table(tmp_path, gens):
    path = tmp_path / "g.parquet"
    artifacts.write_table(gens, path, "generations")
    before = path.read_bytes()
    with pytest.raises(EvalkitError):
        artifacts.write_table(gens.drop(columns="text"), path, "generations")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["g.parquet"]  # no temp file left behind


def test_interrupted_write_leaves_no_partial_file(tmp_path, gens, monkeypatch):
    path = tmp_path / "g.parquet"
    artifacts.write_table(gens, path, "generations")
    before = path.read_bytes()

    def crash(table, where):
        open(where, "wb").write(b"PAR1 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts.pq, "write_table", crash)
    with pytest.raises(KeyboardInterrupt):
        artifacts.write_table(gens, path, "generations")
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_corrupt_parquet_is_a_clear_error(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(EvalkitError, match="not a readable Parquet file"):
        artifacts.read_table(path)


def test_manifest_and_up_to_date(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("hello")
    config = {"stage": "x", "k": 1}
    manifest = artifacts.build_manifest("demo", config, inputs=[src], seeds={"s": 3})
    out = tmp_path / "out"
    out.mkdir()
    pd.DataFrame({"a": [1]}).to_parquet(out / "t.parquet")
    artifacts.write_manifest(out, manifest)
    m = json.loads((out / "manifest.json").read_text())
    for key in ("artifact", "schema_version", "evalkit_version", "git", "created_at", "config", "seeds", "inputs", "packages"):
        assert key in m
    assert m["inputs"][0]["sha256"] == artifacts.sha256_file(src)
    assert set(m["git"]) == {"commit", "dirty"}
    assert m["packages"]["torch"].startswith("2.13.0")
    assert artifacts.up_to_date(out, config, [src], ["t.parquet"])
    assert not artifacts.up_to_date(out, {**config, "k": 2}, [src], ["t.parquet"])
    assert not artifacts.up_to_date(out, config, [src], ["missing.parquet"])
    (out / "t.parquet").write_bytes((out / "t.parquet").read_bytes()[:20])  # truncated: not up to date
    assert not artifacts.up_to_date(out, config, [src], ["t.parquet"])
    pd.DataFrame({"a": [1]}).to_parquet(out / "t.parquet")
    src.write_text("changed")
    assert not artifacts.up_to_date(out, config, [src], ["t.parquet"])
