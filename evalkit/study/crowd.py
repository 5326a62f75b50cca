"""Labelers from a crowd platform: one public study link per study that enrols participants by the platform's own
URL parameters and hands each the next free batch.

- A participant is named by the platform's parameters — Prolific's ``PROLIFIC_PID`` (with ``STUDY_ID`` and
  ``SESSION_ID``), MTurk's ``workerId`` (with ``assignmentId`` and ``hitId``), or a generic ``participant`` — as
  ``<platform>:<id>``; an id that is not 1–64 letters, digits, ``.``, ``_`` or ``-`` is refused, never stored.
- The unit handed out is a *batch*: one labeler slot's tasks of one batch number of the built study (slots are the
  study's labeler ids; batches are ``design.batch_size`` tasks with their sentinels). Batches go out in order of
  batch number, then slot, so the overlap between slots completes early. A batch is held by at most one participant
  and a participant holds at most one batch, ever: both are written in one SQLite transaction before the participant
  is sent on, under one lock in the server process.
- A batch whose holder has shown no activity for ``crowd.abandon_minutes`` returns to the pool (its answers so far are
  kept, as that participant's); the next participant continues at its first unanswered task. The participant who
  left is told the session expired — unless they come back before anyone else took the batch, when it is theirs
  again.
- The completion code (and the platform's redirect) is shown only once the participant's batch is complete.
- Enrolment is capped (``crowd.max_participants``) and rate-limited (``crowd.enrolments_per_minute``).
"""

from __future__ import annotations

import collections
import json
import re
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime

from evalkit.config import CrowdConfig

# (platform, the parameter naming the participant, the parameters kept with them)
PARAMETERS = (("prolific", "PROLIFIC_PID", ("STUDY_ID", "SESSION_ID")), ("mturk", "workerId", ("assignmentId", "hitId")),
              ("link", "participant", ()))
MTURK_PREVIEW = "ASSIGNMENT_ID_NOT_AVAILABLE"  # MTurk shows a HIT's page before it is accepted
ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS participants (
    labeler_id TEXT PRIMARY KEY, platform TEXT NOT NULL, external_id TEXT NOT NULL, params TEXT NOT NULL,
    state TEXT NOT NULL, unit TEXT, enrolled_at REAL NOT NULL, assigned_at REAL, finished_at REAL);
CREATE TABLE IF NOT EXISTS units (unit TEXT PRIMARY KEY, slot TEXT NOT NULL, batch INTEGER NOT NULL, labeler_id TEXT);
"""

# a participant's states: enrolled (no batch yet), active (holds one), complete, expired (batch taken back), screened_out
ACTIVE, COMPLETE, ENROLLED, EXPIRED, SCREENED_OUT = "active", "complete", "enrolled", "expired", "screened_out"


class EnrolmentRefused(Exception):
    """Why a request could not enrol anyone: ``status`` (an HTTP status line) and a sentence for the page."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Participant:
    labeler_id: str
    token: str
    state: str
    unit: str | None


def participant_of(query: dict[str, str]) -> tuple[str, str, dict[str, str]] | None:
    """(platform, participant id, kept parameters) from a study link's query; None when it names nobody (or is an
    MTurk preview). Raises EnrolmentRefused for an id or parameter that is not a platform's id."""
    for platform, key, kept in PARAMETERS:
        if key not in query:
            continue
        pid = query[key]
        if not ID.fullmatch(pid):
            raise EnrolmentRefused("400 Bad Request", f"The {key} in this link is not a participant id.")
        extra = {k: query[k] for k in kept if k in query}
        if any(not ID.fullmatch(v) for v in extra.values()):
            raise EnrolmentRefused("400 Bad Request", "This link's study or session parameters are not platform ids.")
        if platform == "mturk" and extra.get("assignmentId") == MTURK_PREVIEW:
            return None
        return platform, pid, extra
    return None


def fill_code(url: str, code: str) -> str:
    return url.replace("{code}", code)


class Crowd:
    """The enrolment state of one served study: batches, who holds which, and every participant, mirrored from (and
    written to) the study's SQLite database. Every change happens under ``lock`` in one transaction."""

    def __init__(self, conn: sqlite3.Connection, units: dict[str, list[str]], config: CrowdConfig, clock):
        self.config, self.clock, self.lock = config, clock, threading.Lock()
        self.units = units  # unit -> its tasks in the order shown
        self.unit_of = {t: u for u, tasks in units.items() for t in tasks}  # the tables: made by serve.init_db
        conn.execute("BEGIN IMMEDIATE")
        for unit in units:
            slot, batch = unit.rsplit("/", 1)
            conn.execute("INSERT OR IGNORE INTO units VALUES (?,?,?,NULL)", (unit, slot, int(batch)))
        conn.execute("COMMIT")
        self.holder: dict[str, str | None] = dict(conn.execute("SELECT unit, labeler_id FROM units").fetchall())
        self.people: dict[str, Participant] = {}
        self.last_seen: dict[str, float] = {}
        for lab, state, unit, token, assigned, latest in conn.execute(
                "SELECT p.labeler_id, p.state, p.unit, l.token, p.assigned_at, (SELECT MAX(submitted_at) FROM judgments j WHERE "
                "j.labeler_id = p.labeler_id) FROM participants p JOIN labelers l USING (labeler_id)"):
            self.people[lab] = Participant(lab, token, state, unit)
            self.last_seen[lab] = max(assigned or 0.0, _epoch(latest))
        self.enrolled_at: collections.deque[float] = collections.deque()
        self.cap = config.max_participants or 2 * len(units)

    # -- enrolment
    def enrol(self, conn: sqlite3.Connection, platform: str, pid: str, params: dict[str, str]) -> Participant:
        """The participant named, created with a secret token on first sight (capped, rate-limited)."""
        labeler_id = f"{platform}:{pid}"
        with self.lock:
            if labeler_id in self.people:
                return self.people[labeler_id]
            now = self.clock()
            while self.enrolled_at and now - self.enrolled_at[0] > 60:
                self.enrolled_at.popleft()
            if len(self.enrolled_at) >= self.config.enrolments_per_minute:
                raise EnrolmentRefused("429 Too Many Requests", "Too many people are joining at once; please try again in a minute.")
            if len(self.people) >= self.cap:
                raise EnrolmentRefused("200 OK", "This study is full; please return it on your platform.")
            token = secrets.token_urlsafe(18)
            with write_transaction(conn):
                conn.execute("INSERT INTO labelers VALUES (?, ?)", (labeler_id, token))
                conn.execute("INSERT INTO participants VALUES (?,?,?,?,?,NULL,?,NULL,NULL)",
                             (labeler_id, platform, pid, json.dumps(params, sort_keys=True), ENROLLED, now))
            self.enrolled_at.append(now)
            self.people[labeler_id] = person = Participant(labeler_id, token, ENROLLED, None)
            self.last_seen[labeler_id] = now
            return person

    def assign(self, conn: sqlite3.Connection, labeler_id: str, answered: set[str]) -> str | None:
        """The participant's batch: the one they hold, the one they held if nobody took it meanwhile, or (the first
        time) the next free batch with a task left; None when there is none for them."""
        with self.lock:
            person = self.people[labeler_id]
            now = self.clock()
            self._reclaim(conn, answered, now)
            if person.state in (ACTIVE, COMPLETE):
                return person.unit
            if person.state == SCREENED_OUT:
                return None
            if person.state == EXPIRED:
                unit = person.unit if self.holder.get(person.unit) is None and not self._done(person.unit, answered) else None
            else:
                unit = next((u for u in self._order() if self.holder[u] is None and not self._done(u, answered)), None)
            if unit is None:
                return None
            with write_transaction(conn):
                taken = conn.execute("UPDATE units SET labeler_id=? WHERE unit=? AND labeler_id IS NULL", (labeler_id, unit)).rowcount
                if taken != 1:  # never: the lock serialises every change in this process; one server per database
                    raise RuntimeError(f"batch {unit} is held in the database but free in memory")
                conn.execute("UPDATE participants SET state=?, unit=?, assigned_at=? WHERE labeler_id=?", (ACTIVE, unit, now, labeler_id))
            self.holder[unit], person.state, person.unit = labeler_id, ACTIVE, unit
            self.last_seen[labeler_id] = now
            return unit

    def holds(self, labeler_id: str, task_id: str) -> bool:
        unit = self.unit_of.get(task_id)
        return unit is not None and self.holder.get(unit) == labeler_id

    def seen(self, labeler_id: str) -> None:
        self.last_seen[labeler_id] = self.clock()

    def finish(self, conn: sqlite3.Connection, labeler_id: str, state: str) -> None:
        """Mark the participant complete (their batch done) or screened out (the check failed); both are final."""
        with self.lock:
            person = self.people[labeler_id]
            if person.state in (COMPLETE, SCREENED_OUT):
                return
            with write_transaction(conn):
                conn.execute("UPDATE participants SET state=?, finished_at=? WHERE labeler_id=?", (state, self.clock(), labeler_id))
            person.state = state

    # -- the pool
    def _order(self) -> list[str]:
        return sorted(self.units, key=lambda u: (int(u.rsplit("/", 1)[1]), u))

    def _done(self, unit: str, answered: set[str]) -> bool:
        return all(t in answered for t in self.units[unit])

    def _reclaim(self, conn, answered: set[str], now: float) -> None:
        """Batches whose holder has been idle past the limit, unfinished, go back to the pool."""
        limit = self.config.abandon_minutes * 60
        stale = [p for p in self.people.values() if p.state == ACTIVE and now - self.last_seen.get(p.labeler_id, now) > limit
                 and not self._done(p.unit, answered)]
        if not stale:
            return
        with write_transaction(conn):
            for p in stale:
                conn.execute("UPDATE units SET labeler_id=NULL WHERE unit=? AND labeler_id=?", (p.unit, p.labeler_id))
                conn.execute("UPDATE participants SET state=? WHERE labeler_id=?", (EXPIRED, p.labeler_id))
        for p in stale:
            self.holder[p.unit], p.state = None, EXPIRED

    def counts(self) -> dict[str, int]:
        c = collections.Counter(p.state for p in self.people.values())
        return {"participants": len(self.people), "batches": len(self.units), "held": sum(h is not None for h in self.holder.values()), **c}


# One writer at a time in the server process: each thread has its own SQLite connection, and two of them asking for
# the write lock at once would meet SQLite's busy handler, which backs off in sleeps of up to 100 ms (what a
# labeler's p99 latency would feel). Answers (GroupCommit), enrolments, check attempts and researcher labels all
# write under this lock.
WRITE_LOCK = threading.Lock()


class write_transaction:
    """``with write_transaction(conn):`` BEGIN IMMEDIATE … COMMIT under ``WRITE_LOCK``, rolled back on any error."""

    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        WRITE_LOCK.acquire()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            WRITE_LOCK.release()
            raise

    def __exit__(self, kind, *_):
        try:
            self.conn.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            WRITE_LOCK.release()
        return False


def _epoch(iso: str | None) -> float:
    return datetime.fromisoformat(iso).timestamp() if iso else 0.0
