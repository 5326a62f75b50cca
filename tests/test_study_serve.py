"""The labeling web app on a real server (granian) over HTTP: personal links, escaping, CSRF, idempotent submits,
another labeler's token refused, judgments on disk before the acknowledgement — and after a SIGKILL."""

import http.client
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode, urlparse

import pytest
from conftest import ROOT, baseline_study, free_port

from evalkit.study.serve import collect_judgments, init_db, links


def make_study(out, *settings):
    cfg, _ = baseline_study(out, *settings)
    return cfg, init_db(out / "study")


class Server:
    def __init__(self, out, settings, port):
        self.args = [sys.executable, "-m", "evalkit", "study", "serve", "studies/default", "--port", str(port),
                     "--set", f"study.out_dir={out}", *[x for s in settings for x in ("--set", s)]]
        self.port = port
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def kill(self):
        """SIGKILL the server and wait until its port is free (its worker dies with it, closing its socket)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline:
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", self.port))
                    return
                except OSError:
                    time.sleep(0.02)
        raise RuntimeError(f"port {self.port} still taken 10 s after the server was killed")


def request(port, method, path, form=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = urlencode(form) if form is not None else None
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if form is not None else {}
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    out = resp.status, resp.headers, resp.read().decode()
    conn.close()
    return out


SETTINGS = ["labelers.count=3", "design.items_per_policy=20", "design.sentinel_policy=lead3"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve")
    cfg, db = make_study(out, *SETTINGS)
    srv = Server(out, SETTINGS, free_port()).start()
    yield cfg, db, srv
    srv.kill()


def path_of(url):
    return urlparse(url).path


def test_labeler_flow_over_http(server):
    cfg, db, srv = server
    urls = links(db, "http://x")
    me, other = path_of(urls["labeler-01"]), path_of(urls["labeler-02"])
    status, _, page = request(srv.port, "GET", me)
    assert status == 200 and "Instructions" in page and "accuracy first" in page
    status, headers, _ = request(srv.port, "GET", me + "/next")
    assert status == 303
    task_path = headers["Location"]
    status, _, page = request(srv.port, "GET", task_path)
    assert status == 200 and "definitely" in page.lower() and "Task 1 of" in page
    for secret in ("openai", "lead3", "gen-", "qc-"):
        assert secret not in page
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
    assert request(srv.port, "POST", task_path, {"csrf": "0" * 64, "confidence": "2"})[0] == 403
    assert request(srv.port, "POST", task_path, {"csrf": csrf, "confidence": "5"})[0] == 400
    status, headers, _ = request(srv.port, "POST", task_path, {"csrf": csrf, "confidence": "2", "note": "ok"})
    assert status == 303 and headers["Location"] != task_path
    assert request(srv.port, "POST", task_path, {"csrf": csrf, "confidence": "2", "note": "ok"})[0] == 303  # double submit
    assert request(srv.port, "POST", task_path, {"csrf": csrf, "confidence": "8"})[0] == 409  # a changed answer: refused
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT confidence, note FROM judgments WHERE task_id=?", (task_path.rsplit("/", 1)[1],)).fetchall()
    assert rows == [(2, "ok")]  # stored once, the first answer kept
    # another labeler's token cannot read or write this task; unknown tokens and the admin page
    other_task = other + "/task/" + task_path.rsplit("/", 1)[1]
    assert request(srv.port, "GET", other_task)[0] == 404
    assert request(srv.port, "POST", other_task, {"csrf": csrf, "confidence": "2"})[0] == 404
    assert request(srv.port, "GET", "/l/not-a-token")[0] == 404
    status, _, admin = request(srv.port, "GET", path_of(urls["admin"]))
    assert status == 200 and "labeler-01" in admin
    assert request(srv.port, "GET", "/admin/wrong")[0] == 404


def test_markup_in_posts_is_shown_as_text(server):
    cfg, db, srv = server
    urls = links(db, "http://x")
    me = path_of(urls["labeler-03"])
    _, headers, _ = request(srv.port, "GET", me + "/next")
    task_id = headers["Location"].rsplit("/", 1)[1]
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE tasks SET body=? WHERE task_id=?", ("<script>alert('x')</script> & <b>bold</b>", task_id))
    _, _, page = request(srv.port, "GET", headers["Location"])
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert "<script>alert" not in page


def test_collect_undoes_the_swap(server):
    cfg, db, srv = server
    urls = links(db, "http://x")
    me = path_of(urls["labeler-02"])
    for _ in range(6):
        _, headers, _ = request(srv.port, "GET", me + "/next")
        _, _, page = request(srv.port, "GET", headers["Location"])
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
        request(srv.port, "POST", headers["Location"], {"csrf": csrf, "confidence": "9"})
    judgments = collect_judgments(cfg.out_dir / "study")
    import pandas as pd

    tasks = pd.read_parquet(cfg.out_dir / "study" / "tasks.parquet")
    j = judgments.merge(tasks, on="task_id")
    mine = j[j["labeler_id_x"] == "labeler-02"]
    assert len(mine) == 6 and (mine["preferred"] == "right").all()
    assert (mine["preferred_gen_id"] == mine["gen_id_right"]).all()
    assert set(judgments["labeler_kind"]) == {"human"}


def test_sigkill_loses_no_acknowledged_judgment(tmp_path):
    import hashlib
    import hmac
    import threading

    settings = ["labelers.count=1", "data.n_items=0", "design.items_per_policy=250", "design.overlap_fraction=0", "design.gold_fraction=0",
                "design.attention_fraction=0", "design.batch_size=1000"]
    cfg, db = make_study(tmp_path, *settings)
    with sqlite3.connect(db) as conn:
        token = conn.execute("SELECT token FROM labelers").fetchone()[0]
        task_ids = [r[0] for r in conn.execute("SELECT task_id FROM tasks ORDER BY position")][:500]
        secret = conn.execute("SELECT value FROM meta WHERE key='secret'").fetchone()[0]
    assert len(task_ids) == 500
    port = free_port()
    srv = Server(tmp_path, settings, port).start()
    acked, other = [], []

    def client():  # submits 500 judgments one after another, retrying while the server is down
        for task_id in task_ids:
            csrf = hmac.new(secret.encode(), f"{token}:{task_id}".encode(), hashlib.sha256).hexdigest()
            for _ in range(600):
                try:
                    status, _, _ = request(port, "POST", f"/l/{token}/task/{task_id}", {"csrf": csrf, "confidence": "3"})
                except (ConnectionError, http.client.HTTPException, OSError):
                    time.sleep(0.05)
                    continue
                (acked if status == 303 else other).append((task_id, status))
                break

    thread = threading.Thread(target=client)
    thread.start()
    for threshold in (150, 350):  # SIGKILL the server while the client is submitting, then restart it
        while len(acked) < threshold and thread.is_alive():
            time.sleep(0.005)
        srv.kill()
        srv = Server(tmp_path, settings, port).start()
    thread.join(timeout=300)
    srv.kill()
    with sqlite3.connect(db) as conn:
        stored = [r[0] for r in conn.execute("SELECT task_id FROM judgments")]
    assert other == [] and len(acked) == 500
    assert len(stored) == len(set(stored)) == 500  # every acknowledged judgment present, exactly once
    assert {t for t, _ in acked} == set(stored)


def test_group_commit_batches_concurrent_answers_and_fails_them_together(tmp_path):
    """Answers submitted together share a transaction; each is acknowledged only after it, a task answered twice keeps
    its first answer, and a failed commit fails every request of its batch and stores none of them."""
    import threading

    from evalkit.study.serve import SCHEMA, GroupCommit, connect

    db = tmp_path / "g.sqlite"
    with connect(db) as conn:
        conn.executescript(SCHEMA.replace("REFERENCES tasks(task_id)", ""))
    local = threading.local()

    def connection():
        if not hasattr(local, "conn"):
            local.conn = connect(db)
        return local.conn

    writer, commits = GroupCommit(connection), []
    real_commit = writer._commit

    def counted(batch):
        commits.append(len(batch))
        time.sleep(0.01)  # a slow disk: the others queue up behind this commit
        return real_commit(batch)

    writer._commit = counted
    answers = [(f"t{i % 40}", (1 + i // 40,) * 5) for i in range(80)]  # 40 tasks, each answered twice (1, then 2)
    results = {}

    def submit(i):
        task, answer = answers[i]
        results[i] = writer.write(task, (task, "lab", *answer, None, "2026-01-01T00:00:00", None))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(40)]
    threads += [threading.Thread(target=submit, args=(i,)) for i in range(40, 80)]
    for t in threads[:40]:
        t.start()
    for t in threads[:40]:
        t.join()
    for t in threads[40:]:
        t.start()
    for t in threads[40:]:
        t.join()
    assert sum(commits) == 80 and max(commits) > 1 and len(commits) < 80  # batched
    with connect(db) as conn:
        stored = dict(conn.execute("SELECT task_id, confidence FROM judgments").fetchall())
    assert stored == {f"t{i}": 1 for i in range(40)}  # the first answer of each task, once
    assert all(results[i] is None for i in range(40)) and all(results[i] == (1,) * 5 for i in range(40, 80))

    def failing(batch):
        commits.append(len(batch))
        time.sleep(0.01)
        raise sqlite3.OperationalError("disk I/O error")

    writer._commit, errors = failing, []

    def doomed(i):
        try:
            writer.write(f"x{i}", (f"x{i}", "lab", 3, 3, 3, 3, 3, None, "2026-01-01T00:00:00", None))
        except sqlite3.OperationalError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=doomed, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 10  # every request of a failed batch hears of it (none is acknowledged)
    writer._commit = counted  # the writer recovers for the next batch
    assert writer.write("t98", ("t98", "lab", 3, 3, 3, 3, 3, None, "2026-01-01T00:00:00", None)) is None
    with connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM judgments WHERE task_id LIKE 'x%'").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM judgments WHERE task_id='t98'").fetchone()[0] == 1


def test_a_killed_server_leaves_no_worker_behind(tmp_path):
    """granian serves the app from a worker process: SIGKILL of `evalkit study serve` takes the worker with it, so
    nothing keeps answering from (or writing to) the study, and a restart gets the port."""
    settings = ["labelers.count=3", "design.items_per_policy=6", "data.n_items=12"]
    make_study(tmp_path, *settings)
    srv = Server(tmp_path, settings, free_port()).start()
    assert request(srv.port, "GET", "/")[0] == 404  # the worker answers
    workers = [int(t) for t in Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text().split()]
    assert workers
    srv.kill()
    for w in workers:  # gone, or a zombie whose threads have all exited (the port is free: kill() waited for it)
        tasks = Path(f"/proc/{w}/task")
        assert not tasks.exists() or all("Z" in (t / "stat").read_text().rsplit(")", 1)[1][:3] for t in tasks.iterdir() if t.exists()), \
            "the worker outlived the server"
    srv.start()
    assert request(srv.port, "GET", "/")[0] == 404
    srv.kill()
