"""Participants from a crowd platform over real HTTP (`evalkit study serve` in its own process): enrolment by the public study
link with Prolific's parameters, the comprehension check, one batch per participant and one participant per batch,
abandoned batches re-served, the completion code only at the end, a restart in the middle — and hostile input."""

import re
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode

import pandas as pd
import pytest
from conftest import ROOT, baseline_study, free_port
from test_study_serve import Server, request

from evalkit.study.serve import collect_judgments, init_db, links

SETTINGS = ["labelers.count=6", "design.items_per_policy=30", "design.batch_size=2", "design.sentinels_per_batch=0"]
CROWD = """
[crowd]
enrol = true
completion_code = "C0DE42"
completion_url = "https://app.prolific.com/submissions/complete?cc={code}"
screened_out_code = "SCREENED7"
abandon_minutes = 0.1
enrolments_per_minute = 1000

[[crowd.questions]]
question = "A summary says something the post does not. What should you do?"
choices = ["Prefer it: it is longer", "Count it against the summary", "Ignore it"]
answer = "Count it against the summary"
"""


class CrowdServer(Server):
    """The default study's spec with a [crowd] section, served from a copy beside the run."""

    def __init__(self, out, port, crowd=CROWD, settings=SETTINGS):
        spec = out / "spec"
        spec.mkdir(exist_ok=True)
        (spec / "study.toml").write_text((ROOT / "studies/default/study.toml").read_text() + crowd)
        (spec / "instructions.md").write_text((ROOT / "studies/default/instructions.md").read_text())
        super().__init__(out, settings, port)
        self.args[self.args.index("studies/default")] = str(spec)


def csrf_of(page):
    return re.search(r"""name=["']csrf["'] value=["']([^"']+)""", page).group(1)


def enrol(port, link, pid, **extra):
    query = urlencode({"PROLIFIC_PID": pid, "STUDY_ID": "study1", "SESSION_ID": f"s-{pid}", **extra})
    return request(port, "GET", f"{link}?{query}")


def pass_check(port, me, right=True):
    status, _, page = request(port, "GET", me + "/next")
    assert status == 200 and "Before you start" in page
    return request(port, "POST", me + "/check", {"csrf": csrf_of(page), "q0": "1" if right else "0"})


def answer(port, task_path):
    status, _, page = request(port, "GET", task_path)
    assert status == 200, (status, page)
    return request(port, "POST", task_path, {"csrf": csrf_of(page), "confidence": "3"})


def label(port, me, stop_after=None):
    """Answer tasks until the batch is done (or ``stop_after`` answers): (task ids answered, the last page)."""
    done = []
    while True:
        status, headers, page = request(port, "GET", me + "/next")
        if status != 303:
            return done, page
        if stop_after is not None and len(done) == stop_after:
            return done, page
        status, _, _ = answer(port, headers["Location"])
        assert status == 303
        done.append(headers["Location"].rsplit("/", 1)[1])


@pytest.fixture(scope="module")
def crowd_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("crowd")
    cfg, _ = baseline_study(out, *SETTINGS)
    return cfg, out


def test_a_simulated_crowd_run(crowd_study, tmp_path):
    cfg, out = crowd_study
    db = init_db(out / "study")
    urls = links(db, "http://x", crowd=True)
    link = urls["study"].removeprefix("http://x")
    assert set(urls) == {"study", "researcher", "admin"}  # no slot links are served to a crowd
    srv = CrowdServer(out, free_port()).start()
    port = srv.port
    tasks = pd.read_parquet(out / "study" / "tasks.parquet")
    unit_of = {t: f"{lab}/{b}" for t, lab, b in zip(tasks["task_id"], tasks["labeler_id"], tasks["batch"])}
    try:
        def participant(i, stop_after=None):
            status, headers, _ = enrol(port, link, f"pid{i:03d}")
            assert status == 303
            me = headers["Location"]
            assert pass_check(port, me)[0] == 303
            done, page = label(port, me, stop_after)
            return me, done, page

        with ThreadPoolExecutor(30) as pool:  # 30 participants at once; 3 of them stop after one answer
            first = list(pool.map(lambda i: participant(i, 1 if i < 3 else None), range(30)))
        units = [{unit_of[t] for t in done} for _, done, _ in first]
        assert all(len(u) == 1 for u in units) and len(set.union(*units)) == 30  # a distinct batch each
        for _, _, page in first[3:]:
            assert "C0DE42" in page and "cc=C0DE42" in page
        for _, _, page in first[:3]:
            assert "C0DE42" not in page  # the code only once the batch is complete
        srv.kill()  # a restart between the two halves: the enrolment state comes back from the database
        srv.start()
        time.sleep(6.5)  # past abandon_minutes: the three idle batches return to the pool
        with ThreadPoolExecutor(3) as pool:
            late = list(pool.map(participant, range(30, 33)))
        abandoned = set.union(*units[:3])
        for _, done, page in late:
            assert {unit_of[t] for t in done} <= abandoned and "C0DE42" in page
        assert set.union(*({unit_of[t] for t in d} for _, d, _ in late)) == abandoned
        # the three who left are told their session expired, and cannot answer their old batch
        for me, done, _ in first[:3]:
            status, _, page = request(port, "GET", me + "/next")
            assert status == 410 and "expired" in page
            assert request(port, "GET", f"{me}/task/{done[0]}")[0] == 410
        # a completed participant coming back sees the same code and is given nothing new
        status, headers, _ = enrol(port, link, "pid010")
        assert status == 303 and "C0DE42" in request(port, "GET", headers["Location"] + "/next")[2]
    finally:
        srv.kill()
    with sqlite3.connect(db) as conn:
        held = conn.execute("SELECT unit, labeler_id FROM units WHERE labeler_id IS NOT NULL").fetchall()
        states = dict(conn.execute("SELECT state, COUNT(*) FROM participants GROUP BY state").fetchall())
        stored = {r[0] for r in conn.execute("SELECT task_id FROM judgments")}
    assert len({u for u, _ in held}) == len(held) and len({p for _, p in held}) == len(held) == 30
    assert states == {"complete": 30, "expired": 3}
    acknowledged = {t for _, done, _ in first + late for t in done}
    assert acknowledged == stored  # every acknowledged answer on disk, nothing else
    judgments = collect_judgments(out / "study")
    assert judgments["labeler_id"].str.startswith("prolific:pid").all() and len(judgments) == len(stored)


def test_hostile_and_mistaken_participants(crowd_study):
    cfg, out = crowd_study
    db = init_db(out / "study")
    link = links(db, "http://x", crowd=True)["study"].removeprefix("http://x")
    srv = CrowdServer(out, free_port(), CROWD.replace("enrolments_per_minute = 1000", "enrolments_per_minute = 40")).start()
    port = srv.port
    try:
        assert request(port, "GET", "/s/not-the-link?PROLIFIC_PID=abc")[0] == 404
        assert request(port, "GET", link)[0] == 400  # no participant id
        for pid in ("<script>alert(1)</script>", "x" * 65, "", "a b", "é"):
            status, _, page = enrol(port, link, pid)
            assert status == 400 and "<script>alert" not in page
        assert enrol(port, link, "okid", SESSION_ID="<b>")[0] == 400
        # MTurk's preview of a HIT enrols nobody
        status, _, page = request(port, "GET", link + "?workerId=W1&assignmentId=ASSIGNMENT_ID_NOT_AVAILABLE&hitId=H1")
        assert status == 200 and "Accept the task" in page
        # failing the comprehension check twice screens out with the platform's code; nothing is stored
        status, headers, _ = enrol(port, link, "wrongtwice")
        me = headers["Location"]
        status, _, page = pass_check(port, me, right=False)
        assert status == 200 and "retry" in page
        status, _, page = request(port, "POST", me + "/check", {"csrf": csrf_of(page), "q0": "2"})  # the second attempt
        assert status == 200 and "SCREENED7" in page
        assert "SCREENED7" in request(port, "GET", me + "/next")[2]
        # a participant never reaches another's task
        _, h1, _ = enrol(port, link, "alice")
        _, h2, _ = enrol(port, link, "bob")
        pass_check(port, h1["Location"])
        pass_check(port, h2["Location"])
        _, t1, _ = request(port, "GET", h1["Location"] + "/next")
        _, t2, _ = request(port, "GET", h2["Location"] + "/next")
        assert t1["Location"].rsplit("/", 1)[1] != t2["Location"].rsplit("/", 1)[1]
        assert request(port, "GET", h2["Location"] + "/task/" + t1["Location"].rsplit("/", 1)[1])[0] == 404
        # an enrolment flood is refused past the per-minute limit; enrolled participants are still served
        codes = [enrol(port, link, f"flood{i}")[0] for i in range(60)]
        assert 429 in codes and codes.count(303) < 40
        assert request(port, "GET", t1["Location"])[0] == 200
    finally:
        srv.kill()
    with sqlite3.connect(db) as conn:
        ids = {r[0] for r in conn.execute("SELECT labeler_id FROM participants")}
        judged = conn.execute("SELECT COUNT(*) FROM judgments WHERE labeler_id='prolific:wrongtwice'").fetchone()[0]
    assert all(re.fullmatch(r"(prolific|mturk|link):[A-Za-z0-9_.-]{1,64}", i) for i in ids) and judged == 0
