"""Reliability and security (issue 12): a user's own data file, rebuilds that never mix stale tasks with labels,
and the labeling app under abuse (odd tokens, forged times, changed answers, guessed links, idle sockets)."""

import io
import json
import os
import re
import socket
import sqlite3
import stat
import time
from urllib.parse import urlencode

import pandas as pd
import pytest
from conftest import ROOT, baseline_study, run_cli

from evalkit.errors import EvalkitError


def test_a_study_runs_on_the_users_own_data_file(tmp_path):
    from evalkit.config import load_study
    from evalkit.data.bundled import TLDR_CSV, bundled_path
    from evalkit.pipeline import study_items_of

    own = tmp_path / "my_posts.csv"
    pd.read_csv(bundled_path(TLDR_CSV)).head(60).to_csv(own, index=False)
    spec = tmp_path / "study.toml"
    spec.write_text(f'[study]\nid = "mine"\n[data]\ndataset = "tldr"\nsplit = "train"\npath = "{own}"\n')
    cfg = load_study(spec)
    assert cfg.data.path == str(own)
    items = study_items_of(cfg)
    assert 0 < len(items) <= 60 and set(items["split"]) == {"train"}
    cfg = load_study(ROOT / "studies/default", [f"data.path={own}", "data.split=train"])
    assert len(study_items_of(cfg)) == len(items)


def _answers(tasks, path):
    rows = [{"task_id": t, "labeler_id": lab, "confidence": 3} for t, lab in zip(tasks["task_id"], tasks["labeler_id"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rebuilding_a_labelled_study_is_refused_unless_archived(tmp_path):
    from evalkit.study.build import build_study
    from evalkit.study.exchange import import_answers

    settings = ["data.n_items=30", "design.items_per_policy=12", "labelers.count=3"]
    cfg, built = baseline_study(tmp_path, *settings)
    folder = cfg.out_dir / "study"
    import_answers(folder, _answers(built["tasks"], tmp_path / "answers.jsonl"))
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    proc = run_cli("study", "build", "studies/default", "--set", f"study.out_dir={tmp_path}", "--set", "study.seed=7",
                   *[x for s in settings for x in ("--set", s)])
    assert proc.returncode == 2 and "already holds" in proc.stderr and "--archive" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before  # nothing touched
    import dataclasses

    rebuilt = build_study(dataclasses.replace(cfg, study=dataclasses.replace(cfg.study, seed=7)), archive=True)
    archived = [p for p in tmp_path.iterdir() if p.name.startswith("study.archived-")]
    assert len(archived) == 1
    kept = pd.read_parquet(archived[0] / "judgments.parquet")
    assert len(kept) == len(built["tasks"]) and set(kept["labeler_kind"]) == {"human"}
    assert not (folder / "judgments.parquet").exists() and len(rebuilt["tasks"]) > 0


def _call(app, method, path, form=None, addr="10.0.0.1", forwarded=None):
    body = urlencode(form).encode() if form is not None else b""
    env = {"REQUEST_METHOD": method, "PATH_INFO": path, "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body),
           "REMOTE_ADDR": addr, **({"HTTP_X_FORWARDED_FOR": forwarded} if forwarded else {})}
    seen = {}

    def start_response(status, headers):
        seen["status"], seen["headers"] = status, dict(headers)

    out = b"".join(app(env, start_response)).decode()
    return int(seen["status"].split()[0]), seen["headers"], out


@pytest.fixture(scope="module")
def app_study(tmp_path_factory):
    from evalkit.study.serve import LabelingApp, init_db

    out = tmp_path_factory.mktemp("app")
    cfg, _ = baseline_study(out, "data.n_items=20", "design.items_per_policy=8", "labelers.count=3", "design.overlap_fraction=0")
    db = init_db(out / "study")
    return LabelingApp(out / "study"), db


def _token(db, labeler=None):
    import sqlite3

    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT labeler_id, token FROM labelers ORDER BY labeler_id").fetchall()[0 if labeler is None else labeler]


def test_app_headers_file_modes_and_odd_tokens(app_study):
    app, db = app_study
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    _, token = _token(db)
    status, headers, _ = _call(app, "GET", f"/l/{token}")
    assert status == 200 and headers["Cache-Control"] == "no-store"
    csp = headers["Content-Security-Policy"]
    assert "unsafe-inline" not in csp and "script-src 'sha256-" in csp and "default-src 'none'" in csp
    for bad in ("/l/ünïcødé", "/admin/ünïcødé", "/l/%00", "/l/" + "x" * 5000):
        status, _, body = _call(app, "GET", bad, addr="10.0.0.2")
        assert status == 404, (bad, status)
    status, headers, _ = _call(app, "GET", f"/l/{token}/next")
    task_path = headers["Location"]
    status, _, _ = _call(app, "POST", task_path, {"csrf": "ünïcødé", "confidence": "2"})
    assert status == 403


def test_app_forged_times_and_changed_answers(app_study):
    import re
    import sqlite3

    app, db = app_study
    _, token = _token(db, 1)
    _, headers, _ = _call(app, "GET", f"/l/{token}/next")
    path = headers["Location"]
    _, _, page = _call(app, "GET", path)
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
    status, _, _ = _call(app, "POST", path, {"csrf": csrf, "confidence": "2", "shown_at": "-inf"})
    assert status == 303
    task_id = path.rsplit("/", 1)[1]
    with sqlite3.connect(db) as conn:
        confidence, duration = conn.execute("SELECT confidence, duration_s FROM judgments WHERE task_id=?", (task_id,)).fetchone()
    assert confidence == 2 and duration is None  # a time the server never wrote is not stored as a duration
    assert _call(app, "POST", path, {"csrf": csrf, "confidence": "2"})[0] == 303  # the same answer again: idempotent
    status, _, body = _call(app, "POST", path, {"csrf": csrf, "confidence": "8"})
    assert status == 409 and "first answer" in body
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT confidence FROM judgments WHERE task_id=?", (task_id,)).fetchone()[0] == 2
    from evalkit.study.serve import answer_duration

    now = time.time()
    assert answer_duration(f"{now - 12:.3f}", now) == pytest.approx(12, abs=0.01)
    for forged in ("nan", "inf", "abc", "", f"{now + 3600}", f"{now - 10 * 86400}"):
        assert answer_duration(forged, now) is None, forged


def test_guessing_links_is_rate_limited(app_study):
    app, db = app_study
    for k in range(30):
        assert _call(app, "GET", f"/l/guess{k}", addr="10.9.9.9")[0] == 404
    status, headers, _ = _call(app, "GET", "/l/guess-more", addr="10.9.9.9")
    assert status == 429 and headers["Retry-After"] == "60"
    _, token = _token(db)
    assert _call(app, "GET", f"/l/{token}", addr="10.1.1.1")[0] == 200  # other addresses are served
    # and so is a valid link from the guessing address itself: only wrong links are refused
    assert _call(app, "GET", f"/l/{token}", addr="10.9.9.9")[0] == 200
    assert _call(app, "GET", "/l/guess-again", addr="10.9.9.9")[0] == 429


def test_behind_a_proxy_each_client_is_throttled_alone(app_study):
    from evalkit.study.serve import LabelingApp

    _, db = app_study
    proxy = "10.0.0.254"
    app = LabelingApp(db.parent, trusted_proxies=(proxy,))
    for k in range(30):  # one client behind the proxy guesses (and writes a fake address to the left of its own)
        assert _call(app, "GET", f"/l/guess{k}", addr=proxy, forwarded=f"10.7.7.{k}, 10.5.5.5")[0] == 404
    assert _call(app, "GET", "/l/guess", addr=proxy, forwarded="10.7.7.99, 10.5.5.5")[0] == 429
    assert _call(app, "GET", "/l/typo", addr=proxy, forwarded="10.6.6.6")[0] == 404  # another client is not blocked
    # a client not behind the proxy cannot choose its address by writing the header
    for k in range(30):
        _call(app, "GET", f"/l/g{k}", addr="10.8.8.8", forwarded=f"10.3.3.{k}")
    assert _call(app, "GET", "/l/g", addr="10.8.8.8", forwarded="10.3.3.200")[0] == 429


def test_answers_are_ascii_digits(app_study):
    app, db = app_study
    labeler, token = _token(db)
    _, headers, _ = _call(app, "GET", f"/l/{token}/next")
    path = headers["Location"]
    _, _, page = _call(app, "GET", path)
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
    for lookalike in ("\u0667", "\uff17", " 7", "7.0", "+7"):  # Arabic-Indic and full-width 7, padded, float, signed
        assert _call(app, "POST", path, {"csrf": csrf, "confidence": lookalike})[0] == 400, lookalike
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM judgments WHERE task_id=?", (path.rsplit("/", 1)[1],)).fetchone()[0] == 0


def test_a_restart_does_not_rewrite_the_tasks(app_study, monkeypatch):
    from evalkit.study import serve

    _, db = app_study

    def unread(*_):
        raise AssertionError("the study's tables were read again")

    monkeypatch.setattr(serve, "load_study_tables", unread)
    assert serve.init_db(db.parent) == db  # the tasks' hash matches: nothing is read or written


def test_labelers_are_served_while_300_idle_connections_are_open(tmp_path):
    from conftest import free_port
    from test_study_serve import Server, make_study, request

    settings = ["data.n_items=20", "design.items_per_policy=8", "labelers.count=3"]
    cfg, db = make_study(tmp_path, *settings)
    _, token = _token(db)
    port = free_port()
    srv = Server(tmp_path, settings, port).start()
    idle = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        status, headers, _ = request(port, "GET", f"/l/{token}/next")
        assert status == 303
        import re

        _, _, page = request(port, "GET", headers["Location"])
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
        assert request(port, "POST", headers["Location"], {"csrf": csrf, "confidence": "7"})[0] == 303
    finally:
        for s in idle:
            s.close()
        srv.kill()


def test_labelers_are_served_past_950_slow_connections(tmp_path):
    """950 connections that send a byte now and then (never a whole request) once made every real request wait."""
    import http.client
    import resource
    import threading

    from conftest import free_port
    from test_study_serve import Server, make_study

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if min(soft, hard) < 2200:
        pytest.skip(f"this machine allows {soft} open files; the test needs ~2,200")
    settings = ["data.n_items=20", "design.items_per_policy=8", "labelers.count=3"]
    cfg, db = make_study(tmp_path, *settings)
    _, token = _token(db)
    srv = Server(tmp_path, settings, free_port()).start()
    slow, stop = [], threading.Event()

    def trickle():  # a byte on every slow connection each 2 s: never idle long enough for the 10 s idle timeout
        while not stop.wait(2):
            for s in slow:
                try:
                    s.sendall(b"a")
                except OSError:
                    pass

    feeder = threading.Thread(target=trickle, daemon=True)
    try:
        for _ in range(950):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            s.sendall(b"GET /l/")
            slow.append(s)
        feeder.start()
        time.sleep(12)  # past the 10 s header timeout: the slow connections, not the labelers, are the ones dropped
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=15)
        conn.request("GET", f"/l/{token}/next")
        resp = conn.getresponse()
        assert resp.status == 303 and "/task/" in resp.getheader("Location")
        conn.close()
    finally:
        stop.set()
        for s in slow:
            s.close()
        srv.kill()


def test_a_hostile_client_neither_fills_the_disk_nor_locks_labelers_out(tmp_path):
    """A 400 MB POST is refused from its headers (nothing spooled), and a client flooding wrong links from the same
    address as a labeler leaves the labeler served."""
    from conftest import free_port
    from test_study_serve import Server, make_study, request

    settings = ["data.n_items=20", "design.items_per_policy=8", "labelers.count=3"]
    cfg, db = make_study(tmp_path, *settings)
    _, token = _token(db)
    srv = Server(tmp_path, settings, free_port()).start()
    try:
        _, headers, _ = request(srv.port, "GET", f"/l/{token}/next")
        task = headers["Location"]
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as huge:
            huge.sendall(f"POST {task} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                         f"Content-Length: {400 * 1024 * 1024}\r\n\r\n".encode() + b"confidence=7&" * 1000)
            reply = huge.recv(4096).decode("latin-1")
        assert reply.startswith("HTTP/1.1 413"), reply[:80]
        assert not any(p.stat().st_size > 10 * 1024 * 1024 for p in (tmp_path / "study").iterdir())
        for k in range(60):  # all from 127.0.0.1, as the labeler
            request(srv.port, "GET", f"/l/wrong-{k}")
        assert request(srv.port, "GET", "/l/wrong-again")[0] == 429
        _, _, page = request(srv.port, "GET", task)
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
        assert request(srv.port, "POST", task, {"csrf": csrf, "confidence": "7"})[0] == 303
    finally:
        srv.kill()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT confidence FROM judgments WHERE task_id=?", (task.rsplit("/", 1)[1],)).fetchone() == (7,)


def test_serve_refuses_busy_ports_bad_hosts_and_corrupt_databases(tmp_path):
    from conftest import free_port

    baseline_study(tmp_path, "data.n_items=12", "design.items_per_policy=6", "labelers.count=3")
    args = ["study", "serve", "studies/default", "--set", f"study.out_dir={tmp_path}", "--set", "data.n_items=12",
            "--set", "design.items_per_policy=6", "--set", "labelers.count=3"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli(*args, "--port", port)
    assert proc.returncode == 2 and f"--port {port}" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli(*args, "--host", "no.such.host.invalid")
    assert proc.returncode == 2 and "--host 'no.such.host.invalid'" in proc.stderr
    (tmp_path / "study" / "labels.sqlite").write_bytes(b"this is not a database" * 100)
    proc = run_cli(*args, "--port", free_port(), in_process=False)
    assert proc.returncode == 2 and "not a usable labels database" in proc.stderr and "Traceback" not in proc.stderr


def test_a_corrupt_labels_database_is_a_clear_error(tmp_path):
    from evalkit.study.serve import init_db

    baseline_study(tmp_path, "data.n_items=12", "design.items_per_policy=6", "labelers.count=3")
    (tmp_path / "study" / "labels.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(EvalkitError, match="not a usable labels database"):
        init_db(tmp_path / "study")
    with pytest.raises(EvalkitError, match="not a readable labels database"):
        from evalkit.study.build import collected_labels

        collected_labels(tmp_path / "study")


def test_truncated_stage_outputs_are_made_again(tmp_path, monkeypatch):
    """A truncated generations table, part file or judgments table: the re-run re-makes them (the damaged judgments
    kept aside), and the tables equal those of the first run; --force works too."""
    from click.testing import CliRunner

    from evalkit.cli import cli
    from evalkit.generate import PARTS_DIR

    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "study.toml"
    spec.write_text(f'[study]\nid = "heal"\nsimulate = true\nout_dir = "{tmp_path / "run"}"\n[data]\nn_items = 12\n'
                    '[released]\ncomparisons = []\n[generate]\nbaselines = ["ref", "openai-ppo-1.3b", "lead3"]\n'
                    '[design]\nitems_per_policy = 12\n[labelers]\ncount = 3\n[report]\nn_boot = 50\n')

    def run(*extra):
        result = CliRunner().invoke(cli, ["run", str(spec), *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    run()
    run_dir = tmp_path / "run"
    tables = {n: pd.read_parquet(run_dir / p) for n, p in (("gens", "generations/generations.parquet"), ("judg", "study/judgments.parquet"))}
    for path in (run_dir / "generations/generations.parquet", run_dir / "study/judgments.parquet"):
        path.write_bytes(path.read_bytes()[:100])
    out = run()
    assert "[generate] running" in out and "[labels] running" in out
    assert (run_dir / "study/judgments.parquet.corrupt").is_file()
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "generations/generations.parquet"), tables["gens"])
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "study/judgments.parquet"), tables["judg"])
    assert "[generate] up to date" in run() and "running" not in run()
    out = run("--force")
    assert "[generate] running" in out and "[report] running" in out
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "study/judgments.parquet"), tables["judg"])
    assert not list((run_dir / "generations" / PARTS_DIR).glob("*.corrupt"))


def test_same_spec_and_seed_give_byte_identical_tasks_judgments_and_fits(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from evalkit.cli import cli

    outputs = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.chdir(folder)
        spec = folder / "study.toml"
        spec.write_text('[study]\nid = "same"\nseed = 5\nsimulate = true\n[data]\nn_items = 16\n[released]\ncomparisons = []\n'
                        '[generate]\nbaselines = ["ref", "openai-ppo-1.3b", "lead3"]\n[design]\nitems_per_policy = 16\n'
                        '[labelers]\ncount = 3\n[report]\nn_boot = 50\n')
        result = CliRunner().invoke(cli, ["run", str(spec)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outputs.append({p: (folder / p).read_bytes() for p in ("runs/same/study/tasks.parquet", "runs/same/study/judgments.parquet",
                                                               "reports/same/fits.parquet", "runs/same/generations/generations.parquet")})
    assert outputs[0] == outputs[1]
