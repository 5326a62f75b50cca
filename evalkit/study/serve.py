"""``evalkit study serve``: the labeling web app (WSGI, served by granian) with judgments in SQLite.

- Each labeler has a personal link with a secret token and sees only their own tasks (another token, or a task that
  is not theirs, is a 404). Instructions come first; then pairwise pages (the post and two summaries, a 9-point scale
  from "definitely left" to "definitely right", optional note) or Likert pages (four 1–7 scales). Keys 1–9 pick a
  pairwise answer, Enter submits; progress is shown.
- A submission is written in a SQLite transaction in WAL mode with ``synchronous=FULL``: the page is acknowledged
  (303 to the next task) only after the commit is on disk. Submissions that arrive together share one transaction
  (group commit: one fsync acknowledges all of them), which is what lets many labelers submit at once without queueing
  behind each other's fsyncs. ``(task_id)`` is unique, so a double submit is idempotent. The server can be killed and
  restarted: each labeler continues at their first unanswered task.
- Texts are escaped (Reddit posts contain markup); every form carries a CSRF token (an HMAC of the labeler's token and
  the task id under a per-study secret); pages name no policy and no generation id.
- An admin page (its own token) shows progress per labeler; ``collect_judgments`` writes ``judgments.parquet`` with
  the swap undone.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import hmac
import html
import logging
import math
import os
import pickle
import re
import secrets
import signal
import sqlite3
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs

import pandas as pd
from granian.constants import HTTPModes, Interfaces
from granian.http import HTTP1Settings
from granian.log import LogLevels
from granian.server import Server

from evalkit import artifacts
from evalkit.analysis.agreement import pair_key
from evalkit.analysis.quality import excluded_reasons, researcher_pairs
from evalkit.config import CrowdConfig, QualityConfig
from evalkit.errors import EvalkitError
from evalkit.study import crowd
from evalkit.study.crowd import COMPLETE, EXPIRED, SCREENED_OUT, Crowd, EnrolmentRefused, fill_code, participant_of
from evalkit.study.exchange import CONFIDENCE_LABELS, LIKERT_AXES, load_study_tables
from evalkit.study.monitor import MONITOR_SCRIPT, REFRESH_S, researcher_labels, stats_csv, stats_json, study_stats, web_judgments
from evalkit.vocab import confidence_side

log = logging.getLogger(__name__)

DB_FILE = "labels.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS labelers (labeler_id TEXT PRIMARY KEY, token TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY, labeler_id TEXT NOT NULL, position INTEGER NOT NULL, kind TEXT NOT NULL,
    subreddit TEXT, title TEXT, body TEXT NOT NULL, left_text TEXT NOT NULL, right_text TEXT,
    gen_id_left TEXT NOT NULL, gen_id_right TEXT);
CREATE INDEX IF NOT EXISTS tasks_by_labeler ON tasks (labeler_id, position);
CREATE TABLE IF NOT EXISTS judgments (
    task_id TEXT PRIMARY KEY REFERENCES tasks(task_id), labeler_id TEXT NOT NULL, confidence INTEGER,
    overall INTEGER, accuracy INTEGER, coverage INTEGER, coherence INTEGER, note TEXT,
    submitted_at TEXT NOT NULL, duration_s REAL);
CREATE TABLE IF NOT EXISTS screening (labeler_id TEXT PRIMARY KEY, attempts INTEGER NOT NULL, passed INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS researcher (
    item_id TEXT NOT NULL, pair TEXT NOT NULL, gen_id_left TEXT NOT NULL, gen_id_right TEXT NOT NULL, confidence INTEGER NOT NULL,
    note TEXT, submitted_at TEXT NOT NULL, PRIMARY KEY (item_id, pair));
"""

INSTRUCTIONS_FALLBACK = ("You will read Reddit posts (or news articles) and summaries of them. For each pair, say which "
                         "summary is better and how sure you are. Judge how well the summary tells someone what the "
                         "post is about: accuracy first, then coverage, then clarity.")


def connect(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class GroupCommit:
    """Durable writes of answers, batched: a request's row joins the next transaction, and one commit (one fsync)
    acknowledges every row in it. Whoever finds no commit running becomes the leader and writes everything queued;
    the others wait for it (or lead the next batch). Nothing is acknowledged before its commit returns; a failed
    commit fails every request in its batch (none acknowledged, none stored)."""

    def __init__(self, connection):
        self.connection = connection  # the calling thread's SQLite connection
        self.cond = threading.Condition()
        self.queue: list[dict] = []
        self.busy = False

    def write(self, task_id: str, row: tuple) -> tuple | None:
        """Insert ``row`` into judgments unless ``task_id`` is answered; return the stored answer found, or None."""
        entry = {"task_id": task_id, "row": row, "done": False}
        with self.cond:
            self.queue.append(entry)
            while not entry["done"] and self.busy:
                self.cond.wait()
            if entry["done"]:
                return self._result(entry)
            self.busy, batch, self.queue = True, self.queue, []
        try:
            results = self._commit(batch)
        except BaseException as exc:  # noqa: BLE001 - every waiting request must hear of it
            results = [exc] * len(batch)
        with self.cond:
            for e, r in zip(batch, results):
                e["result"], e["done"] = r, True
            self.busy = False
            self.cond.notify_all()
        return self._result(entry)

    @staticmethod
    def _result(entry):
        if isinstance(entry["result"], BaseException):
            raise entry["result"]
        return entry["result"]

    def _commit(self, batch: list[dict]) -> list:
        conn = self.connection()
        results = []
        with crowd.write_transaction(conn):  # rolled back whole on any error: no row of the batch is stored
            for e in batch:  # a task answered twice in one batch: the second sees the first (same transaction)
                prev = conn.execute("SELECT confidence, overall, accuracy, coverage, coherence FROM judgments WHERE task_id=?",
                                    (e["task_id"],)).fetchone()
                if prev is None:
                    conn.execute("INSERT INTO judgments VALUES (?,?,?,?,?,?,?,?,?,?)", e["row"])
                results.append(None if prev is None else tuple(prev))
        return results


def init_db(study_dir: str | Path) -> Path:
    """Create (or reuse) the study's SQLite database with its tasks and one secret token per labeler. The tasks are
    written once per content of ``tasks.parquet`` (its hash is kept in the database): a restart reads nothing more."""
    study_dir = Path(study_dir)
    db = study_dir / DB_FILE
    db.touch(mode=0o600)  # every labeler's token and the CSRF secret live here: owner-only
    os.chmod(db, 0o600)
    try:
        conn = connect(db)
        conn.executescript(SCHEMA + crowd.SCHEMA)
    except sqlite3.DatabaseError as exc:
        raise EvalkitError(f"{db}: not a usable labels database ({exc}); move it aside (its answers may be recoverable "
                           "with the sqlite3 tool) or rebuild the study") from None
    try:
        conn.execute("BEGIN IMMEDIATE")
        for key in ("secret", "admin_token", "study_link", "researcher_token"):
            conn.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, secrets.token_urlsafe(24)))
        tasks_file = study_dir / "tasks.parquet"
        fingerprint = artifacts.sha256_file(tasks_file) if tasks_file.is_file() else None
        if fingerprint and conn.execute("SELECT value FROM meta WHERE key='tasks_sha256'").fetchone() == (fingerprint,):
            conn.execute("COMMIT")
            return db
        tables = load_study_tables(study_dir)
        text = tables["generations"].set_index("gen_id")["text"]
        items = tables["items"].set_index("item_id")
        tasks = tables["tasks"]
        for labeler in sorted(tasks["labeler_id"].unique()):
            conn.execute("INSERT OR IGNORE INTO labelers VALUES (?, ?)", (labeler, secrets.token_urlsafe(18)))
        for position, t in enumerate(tasks.itertuples()):
            item = items.loc[t.item_id]
            right = t.gen_id_right if isinstance(t.gen_id_right, str) else None
            conn.execute(
                "INSERT OR IGNORE INTO tasks VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (t.task_id, t.labeler_id, position, t.kind, item["subreddit"] if isinstance(item["subreddit"], str) else None,
                 item["title"] if isinstance(item["title"], str) else None, item["body"], text[t.gen_id_left],
                 text[right] if right else None, t.gen_id_left, right))
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('tasks_sha256', ?)", (fingerprint,))
        conn.execute("COMMIT")
    finally:
        conn.close()
    return db


def links(db: Path, base_url: str, crowd: bool = False) -> dict[str, str]:
    """Each labeler's personal link and the admin link; with ``crowd``, the public study link instead of the
    labelers' (participants get their own links when they enrol)."""
    conn = connect(db)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        if crowd:
            out = {"study": f"{base_url}/s/{meta['study_link']}"}
        else:
            out = {lab: f"{base_url}/l/{tok}" for lab, tok in conn.execute(
                "SELECT labeler_id, token FROM labelers WHERE labeler_id NOT IN (SELECT labeler_id FROM participants) ORDER BY labeler_id")}
        out["researcher"] = f"{base_url}/r/{meta['researcher_token']}"
        out["admin"] = f"{base_url}/admin/{meta['admin_token']}"
        return out
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------------------------ pages

PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:sans-serif;max-width:60rem;margin:1rem auto;padding:0 1rem;line-height:1.45}}
.post{{white-space:pre-wrap;background:#f6f6f6;padding:1rem;border-radius:6px}}
.pair{{display:grid;grid-template-columns:1fr 1fr;gap:1rem}} .summary{{border:1px solid #aaa;padding:.8rem;border-radius:6px;white-space:pre-wrap}}
.scale label{{display:inline-block;margin:.2rem .4rem}} .progress{{color:#555}} button{{font-size:1.1rem;padding:.4rem 1.2rem}}
.wide{{overflow-x:auto}} table{{border-collapse:collapse}} td,th{{padding:.15rem .5rem;border-bottom:1px solid #ddd}} tr.flagged{{background:#fde8e8}}</style>
</head><body>{body}</body></html>"""

PAIRWISE_FORM = """
<div class="pair"><div><h3>Left</h3><div class="summary" id="summary-left">{left}</div></div>
<div><h3>Right</h3><div class="summary" id="summary-right">{right}</div></div></div>
<form method="post" id="answer"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="shown_at" value="{shown_at}">
<p>Which summary is better?</p><div class="scale">{scale}</div>
<p><label>Note (optional)<br><textarea name="note" rows="2" cols="60"></textarea></label></p>
<button type="submit" id="submit">Submit (Enter)</button></form>
<script>document.addEventListener('keydown',function(e){{if(e.target.tagName==='TEXTAREA')return;
var r=document.getElementById('c'+e.key);if(r){{r.checked=true;}}
if(e.key==='Enter'){{e.preventDefault();document.getElementById('answer').requestSubmit();}}}});</script>"""

LIKERT_FORM = """
<div class="summary" id="summary-left">{left}</div>
<form method="post" id="answer"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="shown_at" value="{shown_at}">
{scales}<p><label>Note (optional)<br><textarea name="note" rows="2" cols="60"></textarea></label></p>
<button type="submit" id="submit">Submit (Enter)</button></form>
<script>document.addEventListener('keydown',function(e){{if(e.target.tagName==='TEXTAREA')return;
if(e.key==='Enter'){{e.preventDefault();document.getElementById('answer').requestSubmit();}}}});</script>"""


def _inline_hash(block: str, tag: str) -> str:
    content = re.search(rf"<{tag}>(.*?)</{tag}>", block, re.S).group(1)
    return "'sha256-" + base64.b64encode(hashlib.sha256(content.encode()).digest()).decode() + "'"


# a strict policy: no inline code runs but the pages' own two scripts and style block, named by their hashes
CSP = ("default-src 'none'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'; connect-src 'self'; "
       f"style-src {_inline_hash(PAGE.format(title='', body=''), 'style')}; "
       f"script-src {_inline_hash(PAIRWISE_FORM.format(left='', right='', csrf='', shown_at='', scale=''), 'script')} "
       f"{_inline_hash(LIKERT_FORM.format(left='', csrf='', shown_at='', scales=''), 'script')} {_inline_hash(MONITOR_SCRIPT, 'script')}")
FAILED_TOKEN_LIMIT = 30
MAX_FORM_BYTES = 1 << 16  # an answer form (a 4,000-character note at most) is far smaller
MAX_DURATION_S = 24 * 3600.0


def content_length(environ) -> int:
    """The request's declared body size (0 when absent or not a number)."""
    try:
        return max(0, int(environ.get("CONTENT_LENGTH") or 0))
    except ValueError:
        return 0


def same(a: str, b: str) -> bool:
    """Constant-time comparison of two strings of any characters (``hmac.compare_digest`` on str rejects non-ASCII)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def scale_value(text: str, points) -> int:
    """A point of the scale ``points`` as the form sends it: one ASCII digit (``int`` would also take "٧" or "７"
    for 7); ValueError for anything else."""
    if not re.fullmatch(r"[0-9]", text) or int(text) not in points:
        raise ValueError(text)
    return int(text)


def answer_duration(shown_at: str, now: float) -> float | None:
    """Seconds from showing the task to the answer, from the page's ``shown_at``; None when it is not a time this
    server could have written (not a number, not finite, in the future, or more than a day ago)."""
    try:
        shown = float(shown_at)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(shown) or shown > now + 1 or now - shown > MAX_DURATION_S:
        return None
    return max(0.0, now - shown)


def _esc(text) -> str:
    return html.escape(text or "", quote=True)


class LabelingApp:
    """The WSGI application; one SQLite connection per server thread, kept open (WAL lets readers and a writer
    proceed together); answers go through :class:`GroupCommit`.

    What the server never changes — labelers' tokens, each labeler's tasks in order — is read once at start, and the
    set of answered tasks is read at start and kept up to date by this process's commits, so a submission's only SQL
    is its write (the token, task and next-task queries per submission cost a third of the throughput;
    benchmarks/serve_load.py measures it). One server per study database: a second one would not see the first's answers until restarted (it could
    only show a task already answered, whose second answer is then refused or ignored, never stored twice).
    """

    def __init__(self, study_dir: str | Path, instructions: str | None = None, crowd_config: CrowdConfig | None = None,
                 clock=time.time, trusted_proxies: tuple[str, ...] = (), quality: QualityConfig | None = None, baseline: str = "ref"):
        self.study_dir = Path(study_dir)
        self.db = self.study_dir / DB_FILE
        if not self.db.is_file():
            init_db(self.study_dir)
        self.config = crowd_config or CrowdConfig()
        self.trusted_proxies = frozenset(trusted_proxies)
        self.local = threading.local()
        conn = self.connection()
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        self.secret, self.admin_token, self.study_link = meta["secret"].encode(), meta["admin_token"], meta["study_link"]
        self.researcher_token, self.quality, self.baseline = meta["researcher_token"], quality or QualityConfig(), baseline
        tasks = self.tasks = pd.read_parquet(self.study_dir / "tasks.parquet")
        self.check_of = {t: (role, exp) for t, role, exp in zip(tasks["task_id"], tasks["role"], tasks["expected"])
                         if role in ("gold", "attention")}  # the answer known in advance, for a labeler's feedback
        self.researcher_queue = researcher_pairs(tasks, self.quality.researcher_tasks)
        self.researched = {(i, p) for i, p in conn.execute("SELECT item_id, pair FROM researcher")}
        self.labeler_of = dict(conn.execute("SELECT token, labeler_id FROM labelers").fetchall())
        self.order: dict[str, list[str]] = {lab: [] for lab in self.labeler_of.values()}
        self.task_meta: dict[str, tuple[str, str]] = {}  # task id -> (labeler id, kind)
        for task_id, labeler, kind in conn.execute("SELECT task_id, labeler_id, kind FROM tasks ORDER BY labeler_id, position"):
            self.order.setdefault(labeler, []).append(task_id)
            self.task_meta[task_id] = (labeler, kind)
        self.answered = {r[0] for r in conn.execute("SELECT task_id FROM judgments")}
        self.screening = {lab: (n, bool(ok)) for lab, n, ok in conn.execute("SELECT labeler_id, attempts, passed FROM screening")}
        self.crowd, self._study_tables = None, None
        if self.config.enrol:  # the public study link enrols participants; the slots' own links are not served
            batch = tasks.set_index("task_id")["batch"]
            units: dict[str, list[str]] = {}
            for slot in sorted({lab for lab, _ in self.task_meta.values()}):
                for task_id in self.order[slot]:
                    units.setdefault(f"{slot}/{int(batch[task_id])}", []).append(task_id)
            self.crowd = Crowd(conn, units, self.config, clock)
            self.labeler_of = {p.token: lab for lab, p in self.crowd.people.items()}
            for lab, p in self.crowd.people.items():
                self.order[lab] = units[p.unit] if p.unit else []
        self.next_index = {lab: 0 for lab in self.order}  # no task before it is unanswered (answers only accumulate)
        self.instructions = instructions or INSTRUCTIONS_FALLBACK
        self.writer = GroupCommit(self.connection)
        self.failures: dict[str, list[float]] = {}

    def connection(self) -> sqlite3.Connection:
        """This thread's connection to the database (opened on first use; the server's threads live as long as it)."""
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = connect(self.db)
        return conn

    # -- plumbing
    def __call__(self, environ, start_response):
        try:
            status, headers, body = self.route(environ)
        except Exception:  # noqa: BLE001 - a server must answer
            log.exception("request failed")
            status, headers, body = "500 Internal Server Error", [], self.page("Error", "<p>Something went wrong.</p>")
        data = body.encode("utf-8")
        if not any(k == "Content-Type" for k, _ in headers):
            headers = [("Content-Type", "text/html; charset=utf-8"), *headers]
        headers = [("Content-Length", str(len(data))),
                   ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
                   ("Cache-Control", "no-store"),  # pages carry the labeler's secret link and CSRF tokens
                   ("Content-Security-Policy", CSP), *headers]
        start_response(status, headers)
        return [data]

    def page(self, title: str, body: str) -> str:
        return PAGE.format(title=_esc(title), body=body)

    def client(self, environ) -> str:
        """The client's address: the connection's, or — only when that is a configured proxy — the last address in
        X-Forwarded-For that is not one of the proxies (a client can write anything to the left of it)."""
        addr = environ.get("REMOTE_ADDR", "")
        if addr not in self.trusted_proxies:
            return addr
        hops = [h.strip() for h in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]
        return next((h for h in reversed(hops) if h not in self.trusted_proxies), addr)

    def refuse_wrong(self, environ):
        """A wrong link: 404, or 429 once the client has sent FAILED_TOKEN_LIMIT wrong links within a minute. Only
        wrong links are refused: a client guessing links never locks a valid link out, its own or anyone's."""
        now, who = time.monotonic(), self.client(environ)
        hits = [t for t in self.failures.get(who, []) if now - t < 60]
        if len(hits) >= FAILED_TOKEN_LIMIT:
            self.failures[who] = hits
            return self.too_many()
        self.failures[who] = [*hits, now]
        if len(self.failures) > 10_000:  # many addresses guessing: forget those quiet for a minute
            self.failures = {k: v for k, v in self.failures.items() if v and now - v[-1] < 60}
        return self.not_found()

    def too_many(self):
        return "429 Too Many Requests", [("Retry-After", "60")], self.page("Too many requests", "<p>Too many wrong links; wait a minute.</p>")

    def not_found(self):
        return "404 Not Found", [], self.page("Not found", "<p>Not found.</p>")

    def csrf(self, token: str, task_id: str) -> str:
        return hmac.new(self.secret, f"{token}:{task_id}".encode(), hashlib.sha256).hexdigest()

    def route(self, environ):
        path = environ.get("PATH_INFO", "/").rstrip("/")
        method = environ.get("REQUEST_METHOD", "GET")
        parts = [p for p in path.split("/") if p]
        if content_length(environ) > MAX_FORM_BYTES:  # refused from the headers: the body is never read
            return "413 Content Too Large", [("Connection", "close")], self.page("Too large", "<p>This request is larger than any answer.</p>")
        if len(parts) in (2, 3) and parts[0] == "admin" and method == "GET":
            if not same(parts[1], self.admin_token):
                return self.refuse_wrong(environ)
            return self.admin(parts[1], parts[2] if len(parts) == 3 else "")
        if len(parts) >= 2 and parts[0] == "r":
            if not same(parts[1], self.researcher_token):
                return self.refuse_wrong(environ)
            return self.researcher(environ, method, parts[1], parts[2:])
        if len(parts) == 2 and parts[0] == "s" and method == "GET" and self.crowd is not None:
            return self.enrol(environ) if same(parts[1], self.study_link) else self.refuse_wrong(environ)
        if len(parts) < 2 or parts[0] != "l":
            return self.not_found()
        labeler = self.labeler_of.get(parts[1])  # a hash lookup, as the SQL index it replaces
        if labeler is None:
            return self.refuse_wrong(environ)
        token = parts[1]
        if len(parts) == 2 and method == "GET":
            return self.instructions_page(labeler, token)
        if len(parts) == 3 and parts[2] == "next" and method == "GET":
            return self.next_task(labeler, token)
        if len(parts) == 3 and parts[2] == "feedback" and method == "GET":
            return self.feedback_page(labeler, token)
        if len(parts) == 3 and parts[2] == "check" and self.config.questions:
            return self.check_page(labeler, token) if method == "GET" else self.check_answers(environ, labeler, token)
        if len(parts) == 4 and parts[2] == "task":
            meta = self.task_meta.get(parts[3])
            if meta is None or not self.owns(labeler, parts[3], meta):
                return self.gone() if self.expired(labeler) else self.not_found()
            if self.crowd is not None:
                self.crowd.seen(labeler)
            if method == "GET":
                task = self.connection().execute("SELECT * FROM tasks WHERE task_id=?", (parts[3],)).fetchone()
                return self.task_page(labeler, token, task)
            if method == "POST":
                return self.submit(environ, labeler, token, parts[3], meta[1])
        return self.not_found()

    def owns(self, labeler: str, task_id: str, meta: tuple[str, str]) -> bool:
        """A slot labeler owns their slot's tasks; a participant the tasks of the batch they hold now."""
        return self.crowd.holds(labeler, task_id) if self.crowd is not None else meta[0] == labeler

    def expired(self, labeler: str) -> bool:
        return self.crowd is not None and labeler in self.crowd.people and self.crowd.people[labeler].state == EXPIRED

    def gone(self):
        return "410 Gone", [], self.page("Session expired", "<h1 id='expired'>This session has expired</h1><p>Your batch was "
                                         "inactive for too long and has been given to someone else. Your answers so far are kept.</p>")

    # -- enrolment from a crowd platform
    def enrol(self, environ):
        query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", ""), max_num_fields=32).items()}
        try:
            who = participant_of(query)
            if who is None:
                if query.get("assignmentId") == crowd.MTURK_PREVIEW:
                    return "200 OK", [], self.page("Preview", "<h1 id='preview'>Preview</h1><p>Accept the task to start.</p>"
                                                   f"<div class='post'>{_esc(self.instructions)}</div>")
                raise EnrolmentRefused("400 Bad Request", "This link is missing the participant id your platform adds "
                                                          "(PROLIFIC_PID, workerId or participant).")
            person = self.crowd.enrol(self.connection(), *who)
        except EnrolmentRefused as refused:
            return refused.status, [], self.page("Cannot start", f"<h1 id='refused'>Cannot start</h1><p>{_esc(refused.message)}</p>")
        self.labeler_of[person.token] = person.labeler_id
        self.order.setdefault(person.labeler_id, [])
        return "303 See Other", [("Location", f"/l/{person.token}")], ""

    def completion_page(self, extra: str = ""):
        code, url = self.config.completion_code, self.config.completion_url
        body = "<h1 id='done'>All done — thank you!</h1>" + extra
        if code:
            body += f"<p>Your completion code: <strong id='completion-code'>{_esc(code)}</strong></p>"
        if url:
            body += f"<p><a id='finish' href='{_esc(fill_code(url, code))}'>Finish and return to the platform</a></p>"
        return "200 OK", [], self.page("Done", body)

    def screened_out_page(self):
        code, url = self.config.screened_out_code, self.config.screened_out_url
        body = "<h1 id='screened-out'>Thank you</h1><p>The answers to the questions about the instructions were not right, so this study cannot continue.</p>"
        if code:
            body += f"<p>Your code: <strong id='screened-out-code'>{_esc(code)}</strong></p>"
        if url:
            body += f"<p><a id='finish' href='{_esc(fill_code(url, code))}'>Return to the platform</a></p>"
        return "200 OK", [], self.page("Thank you", body)

    # -- the comprehension check
    def passed(self, labeler: str) -> bool:
        return not self.config.questions or self.screening.get(labeler, (0, False))[1]

    def screened_out(self, labeler: str) -> bool:
        attempts, ok = self.screening.get(labeler, (0, False))
        return bool(self.config.questions) and not ok and attempts >= self.config.attempts

    def check_page(self, labeler, token, note: str = ""):
        if self.screened_out(labeler):
            return self.screened_out_page()
        if self.passed(labeler):
            return "303 See Other", [("Location", f"/l/{token}/next")], ""
        attempts = self.screening.get(labeler, (0, False))[0]
        questions = "".join(
            f"<fieldset id='q{i}'><legend>{_esc(q.question)}</legend>" + "".join(
                f"<label><input type='radio' name='q{i}' value='{k}' required> {_esc(c)}</label><br>" for k, c in enumerate(q.choices))
            + "</fieldset>" for i, q in enumerate(self.config.questions))
        body = (f"<h1>Before you start</h1>{note}<p>Questions about the instructions (attempt {attempts + 1} of "
                f"{self.config.attempts}). <a href='/l/{token}'>Read the instructions again</a></p>"
                f"<form method='post' id='check' action='/l/{token}/check'><input type='hidden' name='csrf' value='{self.csrf(token, 'check')}'>{questions}"
                "<button type='submit' id='submit'>Check my answers</button></form>")
        return "200 OK", [], self.page("Questions", body)

    def check_answers(self, environ, labeler, token):
        form = self.form(environ)
        if not same(form.get("csrf", ""), self.csrf(token, "check")):
            return "403 Forbidden", [], self.page("Forbidden", "<p>Invalid form token.</p>")
        if self.passed(labeler) or self.screened_out(labeler):
            return self.check_page(labeler, token)
        ok = all(form.get(f"q{i}") == str(q.choices.index(q.answer)) for i, q in enumerate(self.config.questions))
        attempts = self.screening.get(labeler, (0, False))[0] + 1
        conn = self.connection()
        with crowd.write_transaction(conn):  # the attempt is on disk before its result is shown
            conn.execute("INSERT OR REPLACE INTO screening VALUES (?,?,?)", (labeler, attempts, int(ok)))
        self.screening[labeler] = (attempts, ok)
        if ok:
            return "303 See Other", [("Location", f"/l/{token}/next")], ""
        if self.screened_out(labeler):
            if self.crowd is not None and labeler in self.crowd.people:
                self.crowd.finish(conn, labeler, SCREENED_OUT)
            return self.screened_out_page()
        return self.check_page(labeler, token, "<p id='retry' class='progress'>Not every answer was right; please read the "
                                               "instructions again and retry.</p>")

    # -- labeler pages
    def progress(self, labeler: str) -> tuple[int, int]:
        tasks = self.order.get(labeler, [])
        return sum(t in self.answered for t in tasks), len(tasks)

    def instructions_page(self, labeler, token):
        done, total = self.progress(labeler)
        body = (f"<h1>Instructions</h1><div id='instructions' class='post'>{_esc(self.instructions)}</div>"
                f"<p class='progress'>{done} of {total} done.</p><p><a id='start' href='/l/{token}/next'>Start</a></p>")
        return "200 OK", [], self.page("Instructions", body)

    def next_task(self, labeler, token):
        if not self.passed(labeler):
            return self.check_page(labeler, token)
        person = self.crowd.people.get(labeler) if self.crowd is not None else None
        if person is not None:
            if person.state == SCREENED_OUT:
                return self.screened_out_page()
            unit = self.crowd.assign(self.connection(), labeler, self.answered)
            if unit is None:
                if person.state == EXPIRED:
                    return self.gone()
                return "200 OK", [], self.page("No batch free", "<h1 id='full'>No batch is free right now</h1><p>Every batch "
                                               "is taken; please try this link again later, or return the study.</p>")
            self.order[labeler] = self.crowd.units[unit]
        tasks, k = self.order.get(labeler, []), self.next_index.get(labeler, 0)
        while k < len(tasks) and tasks[k] in self.answered:
            k += 1
        self.next_index[labeler] = k
        if k == len(tasks):
            if person is not None:
                self.crowd.finish(self.connection(), labeler, COMPLETE)
                return self.completion_page(self.feedback_link(labeler, token))
            return "200 OK", [], self.page("Done", "<h1 id='done'>All done — thank you!</h1>" + self.feedback_link(labeler, token))
        return "303 See Other", [("Location", f"/l/{token}/task/{tasks[k]}")], ""

    def task_page(self, labeler, token, task, progress: tuple[int, int] | None = None, csrf_key: str | None = None):
        (task_id, _, _, kind, subreddit, title, body, left, right, _, _) = task
        done, total = progress or self.progress(labeler)
        head = (f"<p class='progress' id='progress'>Task {done + 1} of {total}</p>"
                + (f"<p>r/{_esc(subreddit)}</p>" if subreddit else "")
                + (f"<h2 id='title'>{_esc(title)}</h2>" if title else "")
                + f"<div class='post' id='post'>{_esc(body)}</div>")
        shown_at = f"{time.time():.3f}"
        if kind == "pairwise":
            scale = "".join(f"<label><input type='radio' name='confidence' value='{v}' id='c{v}' required> {v}. {_esc(label)}</label>"
                            for v, label in CONFIDENCE_LABELS.items())
            form = PAIRWISE_FORM.format(left=_esc(left), right=_esc(right), csrf=self.csrf(token, csrf_key or task_id), shown_at=shown_at, scale=scale)
        else:
            scales = "".join(f"<p>{axis.capitalize()}: " + "".join(
                f"<label><input type='radio' name='{axis}' value='{v}' id='{axis}{v}' required> {v}</label>" for v in range(1, 8)) + "</p>"
                for axis in LIKERT_AXES)
            form = LIKERT_FORM.format(left=_esc(left), csrf=self.csrf(token, task_id), shown_at=shown_at, scales=scales)
        return "200 OK", [], self.page("Task", head + form)

    @staticmethod
    def form(environ) -> dict[str, str]:
        """A posted form's fields (first value of each), read up to MAX_FORM_BYTES."""
        body = environ["wsgi.input"].read(min(content_length(environ), MAX_FORM_BYTES))
        return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), max_num_fields=64).items()}

    def submit(self, environ, labeler, token, task_id, kind):
        form = self.form(environ)
        if not same(form.get("csrf", ""), self.csrf(token, task_id)):
            return "403 Forbidden", [], self.page("Forbidden", "<p>Invalid form token.</p>")
        values = {"confidence": None, **{a: None for a in LIKERT_AXES}}
        try:
            if kind == "pairwise":
                values["confidence"] = scale_value(form["confidence"], CONFIDENCE_LABELS)
            else:
                for axis in LIKERT_AXES:
                    values[axis] = scale_value(form[axis], range(1, 8))
        except (KeyError, ValueError):
            return "400 Bad Request", [], self.page("Incomplete", "<p>Please answer every scale.</p>")
        duration = answer_duration(form.get("shown_at", ""), time.time())
        note = (form.get("note") or "").strip()[:4000] or None
        # one writer at a time inside the process (SQLite's busy handler would otherwise back off in sleeps of up to
        # 100 ms under contention, which is what a labeler's p99 latency would feel), and answers that arrive
        # together committed together
        answer = (values["confidence"], values["overall"], values["accuracy"], values["coverage"], values["coherence"])
        prev = self.writer.write(task_id, (task_id, labeler, *answer, note, datetime.now(timezone.utc).isoformat(), duration))
        self.answered.add(task_id)  # committed (or answered before): only now does it count as done
        if prev is not None and prev != answer:  # a second, different answer is not silently dropped
            return "409 Conflict", [], self.page("Already answered", "<p>This task was already answered; your first answer "
                                                 f"is kept. <a href='/l/{token}/next'>Continue</a></p>")
        # acknowledged only now, after the commit: always a redirect (to the next task, or to the "done" page)
        status, headers, body = self.next_task(labeler, token)
        return ("303 See Other", [("Location", f"/l/{token}/next")], "") if status.startswith("200") else (status, headers, body)

    # -- feedback: where a labeler's answer differs from the known or the researcher's answer
    def disagreements(self, labeler: str) -> list[dict]:
        conn = self.connection()
        mine = conn.execute("SELECT j.task_id, j.confidence, t.title, t.body, t.left_text, t.right_text, t.gen_id_left, t.gen_id_right "
                            "FROM judgments j JOIN tasks t USING (task_id) WHERE j.labeler_id=? AND t.kind='pairwise' ORDER BY t.position",
                            (labeler,)).fetchall()
        truth = {(r[0], r[1]): r for r in conn.execute("SELECT item_id, pair, gen_id_left, gen_id_right, confidence, note FROM researcher")}
        items = self.tasks.set_index("task_id")["item_id"]
        out = []
        for task_id, confidence, title, body, left, right, gl, gr in mine:
            side = confidence_side(confidence)
            expected, note, source = None, "", ""
            if task_id in self.check_of:
                role, expected = self.check_of[task_id]
                source = "a check with a known answer"
                note = ("one summary is of another post" if role == "gold" else "one summary has its words shuffled")
            else:
                r = truth.get((items[task_id], pair_key(gl, gr)))
                if r is not None and confidence_side(r[4]) in ("left", "right"):
                    winner = r[2] if confidence_side(r[4]) == "left" else r[3]
                    expected, note, source = ("left" if winner == gl else "right"), r[5] or "", "the researcher's answer"
            if expected and side != expected:
                out.append({"title": title, "body": body, "left": left, "right": right, "yours": side, "expected": expected,
                            "note": note, "source": source})
        return out

    def feedback_link(self, labeler: str, token: str) -> str:
        n = len(self.disagreements(labeler))
        return (f"<p><a id='feedback' href='/l/{token}/feedback'>Feedback: {n} of your answers differ from the expected answer</a></p>"
                if n else "<p id='feedback-none'>Every answer we can check matched the expected one.</p>")

    def feedback_page(self, labeler, token):
        rows = self.disagreements(labeler)
        body = "<h1>Feedback</h1>" + ("<p>Every answer we can check matched the expected one.</p>" if not rows else "")
        for k, r in enumerate(rows):
            body += (f"<section class='feedback' id='fb{k}'>" + (f"<h2>{_esc(r['title'])}</h2>" if r["title"] else "")
                     + f"<div class='post'>{_esc(r['body'])}</div><div class='pair'><div><h3>Left</h3><div class='summary'>"
                     f"{_esc(r['left'])}</div></div><div><h3>Right</h3><div class='summary'>{_esc(r['right'])}</div></div></div>"
                     f"<p>You chose <strong>{_esc(r['yours'] or 'neither')}</strong>; expected <strong class='expected'>"
                     f"{_esc(r['expected'])}</strong> ({_esc(r['source'])}){': ' + _esc(r['note']) if r['note'] else ''}.</p></section>")
        return "200 OK", [], self.page("Feedback", body + f"<p><a href='/l/{token}/next'>Back</a></p>")

    # -- the researcher's labels: each configured comparison once, in the order first shown
    def researcher(self, environ, method, token, rest):
        queue = self.researcher_queue
        done = sum((i, p) in self.researched for i, p in zip(queue["item_id"], queue["pair"]))
        if not rest and method == "GET":
            body = (f"<h1>Researcher labels</h1><div class='post'>{_esc(self.instructions)}</div><p class='progress'>{done} of "
                    f"{len(queue)} comparisons ({_esc(self.quality.researcher_tasks)}) done.</p><p><a id='start' href='/r/{token}/next'>Start</a></p>")
            return "200 OK", [], self.page("Researcher", body)
        if rest == ["next"] and method == "GET":
            k = next((k for k, (i, p) in enumerate(zip(queue["item_id"], queue["pair"])) if (i, p) not in self.researched), None)
            if k is None:
                return "200 OK", [], self.page("Done", "<h1 id='done'>Every researcher comparison is labelled.</h1>")
            return "303 See Other", [("Location", f"/r/{token}/c/{k}")], ""
        if len(rest) == 2 and rest[0] == "c" and rest[1].isdigit() and int(rest[1]) < len(queue):
            row = queue.iloc[int(rest[1])]
            if method == "GET":
                task = self.connection().execute("SELECT * FROM tasks WHERE task_id=?", (row["task_id"],)).fetchone()
                return self.task_page("researcher", token, task, (done, len(queue)), f"r:{rest[1]}")
            form = self.form(environ)
            if not same(form.get("csrf", ""), self.csrf(token, f"r:{rest[1]}")):
                return "403 Forbidden", [], self.page("Forbidden", "<p>Invalid form token.</p>")
            try:
                confidence = scale_value(form.get("confidence", ""), CONFIDENCE_LABELS)
            except ValueError:
                return "400 Bad Request", [], self.page("Incomplete", "<p>Please answer the scale.</p>")
            conn = self.connection()
            with crowd.write_transaction(conn):  # the first answer is kept, as a labeler's is
                conn.execute("INSERT OR IGNORE INTO researcher VALUES (?,?,?,?,?,?,?)",
                             (row["item_id"], row["pair"], row["gen_id_left"], row["gen_id_right"], confidence,
                              (form.get("note") or "").strip()[:4000] or None, datetime.now(timezone.utc).isoformat()))
            self.researched.add((row["item_id"], row["pair"]))
            return "303 See Other", [("Location", f"/r/{token}/next")], ""
        return self.not_found()

    # -- admin: the live monitoring page
    def study_tables(self) -> dict[str, pd.DataFrame]:
        """The built study's items and generations (read on the first look at the monitor, never at start) and tasks."""
        if self._study_tables is None:
            self._study_tables = {"tasks": self.tasks, **{k: pd.read_parquet(self.study_dir / f"{k}.parquet") for k in ("items", "generations")}}
        return self._study_tables

    def stats(self) -> dict:
        conn = self.connection()
        tables = {**self.study_tables(), "judgments": web_judgments(conn, f"web:{DB_FILE}")}
        if self.crowd is not None:
            assigned = {lab: len(self.crowd.units[p.unit]) for lab, p in self.crowd.people.items() if p.unit}
        else:
            assigned = {lab: len(tasks) for lab, tasks in self.order.items() if tasks}
        return study_stats(tables, self.quality, researcher_labels(conn), assigned, self.baseline)

    def admin(self, token, view: str = ""):
        if view == "stats.json":
            return "200 OK", [("Content-Type", "application/json")], stats_json(self.stats())
        if view == "stats.csv":
            return "200 OK", [("Content-Type", "text/csv; charset=utf-8"),
                              ("Content-Disposition", "attachment; filename=labelers.csv")], stats_csv(self.stats())
        if view:
            return self.not_found()
        stats = self.stats()

        def cell(v):
            return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else _esc(str(v))

        def table(tid, cols, rows):  # the same cells the page's script writes on each refresh
            return (f"<div class='wide'><table id='{tid}'><tr>" + "".join(f"<th>{_esc(c)}</th>" for c in cols) + "</tr>"
                    + "".join(f"<tr class='{'flagged' if r.get('flags') else ''}'>" + "".join(f"<td>{cell(r[c])}</td>" for c in cols)
                              + "</tr>" for r in rows) + "</table></div>")

        crowd_line = ""
        if self.crowd is not None:
            crowd_line = "<p id='crowd'>" + _esc(", ".join(f"{k} {v}" for k, v in self.crowd.counts().items())) + "</p>"
        body = (f"<h1>Monitoring</h1><div id='monitor' data-stats='/admin/{token}/stats.json'></div>"
                f"<p id='summary'>{_esc(stats['summary'])}</p>{crowd_line}<p>Updated <span id='updated'>{_esc(stats['updated'])}</span> "
                f"(every {REFRESH_S} s). <a id='csv' href='/admin/{token}/stats.csv'>Download CSV</a></p>"
                "<h2>Labelers</h2>" + table("labelers", stats["labeler_columns"], stats["labelers"])
                + "<h2>Policies (researcher only)</h2>" + table("policies", stats["policy_columns"], stats["policies"]) + MONITOR_SCRIPT)
        return "200 OK", [], self.page("Monitoring", body)


def collect_judgments(study_dir: str | Path, quality: QualityConfig | None = None) -> pd.DataFrame:
    """Judgments stored by the web app → ``judgments.parquet`` (``labeler_kind="human"``, swap undone), each with
    ``excluded``: its labeler's reason under the ``[quality]`` rules, or empty."""
    study_dir = Path(study_dir)
    db = study_dir / DB_FILE
    if not db.is_file():
        raise EvalkitError(f"no labels database at {db}; run `evalkit study serve` first")
    conn = connect(db)
    try:
        web = web_judgments(conn, f"web:{db.name}")
    finally:
        conn.close()
    target = study_dir / "judgments.parquet"
    if target.is_file():  # keep judgments imported from elsewhere; replace the web app's own, and any file answer of a
        old = artifacts.read_table(target, "judgments")  # task the same labeler also answered in the app (one per task × labeler)
        web = pd.concat([old[(old["source"] != f"web:{db.name}") & ~old["judgment_id"].isin(web["judgment_id"])], web], ignore_index=True)
    tables = {"tasks": pd.read_parquet(study_dir / "tasks.parquet"), "judgments": web}
    web["excluded"] = excluded_reasons(tables, quality or QualityConfig()).to_numpy()
    artifacts.write_table(web, target, "judgments")
    return web


APP_ENV = "EVALKIT_SERVE_APP"  # how serve() hands the app's arguments to granian's worker process


def serve(study_dir: str | Path, host: str = "127.0.0.1", port: int = 8765, threads: int = 8, instructions: str | None = None,
          crowd_config: CrowdConfig | None = None, trusted_proxies: tuple[str, ...] = (), quality: QualityConfig | None = None,
          baseline: str = "ref") -> None:
    """Serve the study with granian (a maintained HTTP server: its I/O in Rust, the WSGI app in ``threads`` Python
    threads) until interrupted.

    One worker process, never more: submissions are group-committed and enrolment is serialised inside the process
    (:class:`GroupCommit`, ``crowd.WRITE_LOCK``). granian has no in-process mode for a WSGI app on a GIL build, so
    the app is built in its worker by :func:`served_app` from the arguments passed in the environment."""
    args = {"study_dir": str(study_dir), "instructions": instructions, "crowd_config": crowd_config, "trusted_proxies": tuple(trusted_proxies),
            "quality": quality, "baseline": baseline, "parent": os.getpid()}
    os.environ[APP_ENV] = base64.b64encode(pickle.dumps(args)).decode("ascii")
    # idle or slow clients cost an open socket, not a thread; a client that has not sent its headers in 10 s is dropped
    server = Server(f"{__name__}:served_app", address=host, port=port, interface=Interfaces.WSGI, workers=1, blocking_threads=threads,
                    http=HTTPModes.http1, http1_settings=HTTP1Settings(header_read_timeout=10_000), factory=True, log_level=LogLevels.warning,
                    backlog=2048, websockets=False)
    print(f"Serving on http://{host}:{port}", flush=True)
    server.serve()


def served_app() -> LabelingApp:
    """The app of :func:`serve`, built in granian's worker process, which dies with the server process (a SIGKILLed
    server must not leave a worker holding the port and the database)."""
    args = pickle.loads(base64.b64decode(os.environ[APP_ENV]))
    parent = args.pop("parent")
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the server died before the line above
        os._exit(1)
    return LabelingApp(args.pop("study_dir"), args.pop("instructions"), args.pop("crowd_config"), **args)


PR_SET_PDEATHSIG = 1  # prctl(2)
