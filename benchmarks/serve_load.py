"""Load on the labeling web app: 20 concurrent labelers submitting judgments over loopback to `evalkit study serve`
(granian, SQLite WAL, synchronous=FULL), side by side with a baseline — the same number of durable SQLite
commits made directly from 20 threads in one process. Prints judgments/s, p50/p99 latency, the ratio to the baseline,
and checks that no acknowledged judgment is missing.

    .venv/bin/python benchmarks/serve_load.py [--labelers 20] [--per-labeler 50] [--threads 8] [--idle 0]
    .venv/bin/python benchmarks/serve_load.py --labelers 100 --per-labeler 20 --idle 300   # the 100-labeler profile
    .venv/bin/python benchmarks/serve_load.py --labelers 100 --per-labeler 20 --idle 300 --rate 1000

``--idle N`` holds N idle client connections open for the whole run (an abusive or stuck client): the labelers
must still be served.

``--enrol R`` serves the study to a crowd (``[crowd] enrol = true``): the labelers are participants who enrolled
through the study link first, and while they submit, new participants arrive through the study link at R
enrolments/s on a fixed schedule (latency from each scheduled time). Its baseline: the same enrolment writes (a
participant row and a token row in one durable transaction) made directly from as many threads.

    .venv/bin/python benchmarks/serve_load.py --labelers 100 --per-labeler 20 --enrol 100   # the enrolment profile

Without ``--rate`` each labeler submits its next judgment as soon as the last is acknowledged (closed loop: the
server's capacity; latency is then mostly the queue of the other labelers' requests, ~labelers / throughput). With
``--rate R`` the labelers together offer R judgments/s on a fixed schedule (each at R / labelers per second, starts
staggered) and latency is counted from each request's scheduled time, so a server that falls behind pays for its
backlog (no coordinated omission). The CPU time of the server process and of this client process are printed: on a
2-core machine the two share the cores.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_study(out: Path, labelers: int, per_labeler: int) -> tuple[list[str], Path]:
    from evalkit.config import load_study
    from evalkit.generate import generate
    from evalkit.pipeline import study_items_of
    from evalkit.study.build import build_study
    from evalkit.study.serve import init_db

    settings = [f"study.out_dir={out}", "data.n_items=0", f"labelers.count={labelers}", f"design.items_per_policy={labelers * per_labeler // 2 + 1}",
                "design.overlap_fraction=1", "design.overlap_labelers=3", "design.gold_fraction=0", "design.attention_fraction=0", "design.batch_size=100000"]
    cfg = load_study(ROOT / "studies/default", settings)
    generate(study_items_of(cfg), [], out / "generations", baselines=("ref", "openai-ppo-1.3b", "lead3"), progress=False)
    build_study(cfg)
    return settings, init_db(out / "study")


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process and its children (the server's worker) have used, from /proc."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") + sum(server_cpu(int(c)) for c in children)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


CROWD = """
[crowd]
enrol = true
completion_code = "BENCH"
max_participants = 1000000
enrolments_per_minute = 1000000
"""


def enrol(port: int, link: str, pid: str, assign: bool = False) -> tuple[str, str]:
    """Enrol one participant through the study link (and, with ``assign``, take their batch): (labeler id, token)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", f"/s/{link}?participant={pid}")
    resp = conn.getresponse()
    resp.read()
    token = resp.getheader("Location").rsplit("/", 1)[1]
    if assign:
        conn.request("GET", f"/l/{token}/next")
        conn.getresponse().read()
    conn.close()
    return f"link:{pid}", token


def direct_enrolments(path: Path, n: int, threads: int) -> float:
    """The enrolment writes alone (a participant row and a token row, one durable transaction each) from threads."""
    setup = sqlite3.connect(path)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.executescript("CREATE TABLE p (labeler_id TEXT PRIMARY KEY, params TEXT, state TEXT, enrolled_at REAL);"
                        "CREATE TABLE l (labeler_id TEXT PRIMARY KEY, token TEXT UNIQUE)")
    setup.close()
    n = max(n, threads)

    def writer(t: int) -> None:
        conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous=FULL")
        for k in range(t, n, threads):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO l VALUES (?, ?)", (f"p{k}", f"tok{k}"))
            conn.execute("INSERT INTO p VALUES (?, '{}', 'enrolled', ?)", (f"p{k}", time.time()))
            conn.execute("COMMIT")
        conn.close()

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--labelers", type=int, default=20)
    ap.add_argument("--per-labeler", type=int, default=40)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--idle", type=int, default=0, help="idle connections held open during the run")
    ap.add_argument("--rate", type=float, default=0.0, help="judgments/s offered by all labelers together (0: closed loop)")
    ap.add_argument("--enrol", type=float, default=0.0, help="new participants/s arriving through the study link meanwhile (0: no crowd)")
    ap.add_argument("--enrollers", type=int, default=10, help="client threads offering the enrolments")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        settings, db = make_study(out, args.labelers, args.per_labeler)
        spec = ROOT / "studies/default"
        if args.enrol:  # the same study, served to a crowd
            spec = out / "spec"
            spec.mkdir()
            (spec / "study.toml").write_text((ROOT / "studies/default/study.toml").read_text() + CROWD)
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "evalkit", "study", "serve", str(spec), "--port", str(port),
                                 "--threads", str(args.threads), *[x for s in settings for x in ("--set", s)]],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        with sqlite3.connect(db) as conn:
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            secret = meta["secret"].encode()
            labelers = conn.execute("SELECT labeler_id, token FROM labelers").fetchall()
        if args.enrol:  # each labeler enrols through the study link and is given their batch
            labelers = [enrol(port, meta["study_link"], f"lab{k:04d}", assign=True) for k in range(args.labelers)]
        with sqlite3.connect(db) as conn:
            slot = dict(conn.execute("SELECT labeler_id, substr(unit, 1, instr(unit, '/') - 1) FROM units")) if args.enrol else {}
            work = {lab: [r[0] for r in conn.execute("SELECT task_id FROM tasks WHERE labeler_id=? ORDER BY position LIMIT ?",
                                                     (slot.get(lab, lab), args.per_labeler))] for lab, _ in labelers}
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(args.idle)]
        latencies: list[float] = []
        steady: list[float] = []  # each labeler's requests after its first (which also opens its connection)
        acked: list[str] = []
        lock = threading.Lock()

        interval = args.labelers / args.rate if args.rate else 0.0

        def labeler(lab: str, token: str, offset: float) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            for k, task_id in enumerate(work[lab]):
                csrf = hmac.new(secret, f"{token}:{task_id}".encode(), hashlib.sha256).hexdigest()
                body = urlencode({"csrf": csrf, "confidence": "7"})
                t0 = time.perf_counter()
                if interval:  # on schedule; late requests count their lateness
                    t0 = start + offset + k * interval
                    time.sleep(max(0.0, t0 - time.perf_counter()))
                conn.request("POST", f"/l/{token}/task/{task_id}", body=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
                resp = conn.getresponse()
                resp.read()
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    if k:
                        steady.append(dt)
                    if resp.status == 303:
                        acked.append(task_id)
            conn.close()

        threads = [threading.Thread(target=labeler, args=(lab, tok, interval * i / len(labelers))) for i, (lab, tok) in enumerate(labelers)]
        enrolled: list[float] = []
        running = threading.Event()
        running.set()

        def enroller(e: int) -> None:  # new participants on a schedule, while the labelers submit
            gap, k = args.enrollers / args.enrol, 0
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            while running.is_set():
                due = start + gap * (k + e / args.enrollers)
                time.sleep(max(0.0, due - time.perf_counter()))
                conn.request("GET", f"/s/{meta['study_link']}?PROLIFIC_PID=new{e:02d}x{k:06d}&STUDY_ID=bench&SESSION_ID=s{k}")
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 303, resp.status
                with lock:
                    enrolled.append(time.perf_counter() - due)
                k += 1
            conn.close()

        if args.enrol:
            threads += [threading.Thread(target=enroller, args=(e,)) for e in range(args.enrollers)]
        cpu = server_cpu(proc.pid), time.process_time()
        start = t0 = time.perf_counter() + (0.2 if interval else 0.0)  # a schedule starts once every thread runs
        for t in threads:
            t.start()
        for t in threads[:len(labelers)]:
            t.join()
        wall = time.perf_counter() - t0
        running.clear()
        for t in threads[len(labelers):]:
            t.join()
        cpu = server_cpu(proc.pid) - cpu[0], time.process_time() - cpu[1]
        for sock in idle:
            sock.close()
        proc.terminate()
        proc.wait()
        with sqlite3.connect(db) as conn:
            stored = {r[0] for r in conn.execute("SELECT task_id FROM judgments")}

        # the baseline: the same durable commits, directly, from as many threads
        direct = out / "direct.sqlite"
        setup = sqlite3.connect(direct)
        setup.execute("PRAGMA journal_mode=WAL")
        setup.execute("CREATE TABLE j (task_id TEXT PRIMARY KEY, labeler_id TEXT, confidence INTEGER, submitted_at TEXT)")
        setup.close()

        def direct_writer(lab: str) -> None:
            conn = sqlite3.connect(direct, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA synchronous=FULL")
            for task_id in work[lab]:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("INSERT OR IGNORE INTO j VALUES (?,?,?,?)", (task_id, lab, 7, time.time()))
                conn.execute("COMMIT")
            conn.close()

        threads = [threading.Thread(target=direct_writer, args=(lab,)) for lab, _ in labelers]
        t1 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        direct_wall = time.perf_counter() - t1
        enrol_base = direct_enrolments(out / "enrol.sqlite", len(enrolled), args.enrollers) if args.enrol else 0.0

    n = sum(len(v) for v in work.values())
    rate, baseline = n / wall, n / direct_wall
    load = f"offering {args.rate:.0f} judgments/s on a schedule" if args.rate else "closed loop (next as soon as acknowledged)"
    print(f"{args.labelers} labelers x {args.per_labeler} judgments over loopback, {load}, granian with {args.threads} "
          f"threads, {args.idle} idle connections held open")
    print(f"  web app : {rate:7.0f} judgments/s; latency p50 {1000 * percentile(latencies, 0.5):.1f} ms, p99 {1000 * percentile(latencies, 0.99):.1f} ms "
          f"(p99 after each labeler's first request, which opens its connection: {1000 * percentile(steady, 0.99):.1f} ms)")
    print(f"  baseline: {baseline:7.0f} durable SQLite commits/s from {args.labelers} threads in-process (SQLite's own locking)")
    print(f"  ratio web app / baseline: {rate / baseline:.2f}")
    print(f"  acknowledged {len(acked)} of {n}; stored {len(stored)}; lost {len(set(acked) - stored)}")
    if args.enrol:
        print(f"  enrolment: {len(enrolled) / wall:7.1f} enrolments/s offered {args.enrol:.0f}/s while the labelers submit; latency "
              f"p50 {1000 * percentile(enrolled, 0.5):.1f} ms, p99 {1000 * percentile(enrolled, 0.99):.1f} ms ({len(enrolled)} enrolments)")
        print(f"  enrolment baseline: {enrol_base:7.0f} durable participant+token transactions/s from {args.enrollers} threads in-process; "
              f"ratio offered-and-served / baseline capacity: {len(enrolled) / wall / enrol_base:.3f}")
    print(f"  CPU: server {cpu[0]:.2f} s ({1000 * cpu[0] / n:.2f} ms per judgment, {100 * cpu[0] / wall:.0f}% of a core), "
          f"this client {cpu[1]:.2f} s ({100 * cpu[1] / wall:.0f}% of a core)")


if __name__ == "__main__":
    main()
