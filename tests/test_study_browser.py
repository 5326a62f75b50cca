"""A labeler in headless Chromium (Debian's, driven by Playwright): instructions, pairwise and Likert tasks answered
with keyboard and mouse, judgments in SQLite and in judgments.parquet with the swap undone, another labeler's token
refused, a post with <script> shown as text."""

import sqlite3
from pathlib import Path

import pandas as pd
import pytest
from conftest import free_port
from test_study_serve import Server, make_study

from evalkit.study.serve import collect_judgments, links

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed (make test installs it)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield b
        b.close()


def serve_study(out, *settings):
    cfg, db = make_study(out, *settings)
    srv = Server(out, list(settings), free_port()).start()
    return cfg, db, srv


def test_pairwise_with_keyboard_and_mouse(tmp_path, browser):
    settings = ("labelers.count=3", "design.items_per_policy=10", "design.sentinel_policy=lead3")
    cfg, db, srv = serve_study(tmp_path, *settings)
    try:
        urls = links(db, f"http://127.0.0.1:{srv.port}")
        page = browser.new_page()
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(urls["labeler-01"])
        assert "accuracy first" in page.inner_text("#instructions")
        page.click("#start")
        first_task = page.url.rsplit("/", 1)[1]
        assert page.inner_text("#progress").startswith("Task 1 of")
        # keyboard: 2 = "very likely left", Enter submits
        page.keyboard.press("2")
        assert page.is_checked("#c2")
        page.keyboard.press("Enter")
        page.wait_for_url(lambda url: not url.endswith(first_task))
        second_task = page.url.rsplit("/", 1)[1]
        assert page.inner_text("#progress").startswith("Task 2 of")
        # a post with markup renders as text
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE tasks SET body=? WHERE task_id=?", ("<script>alert('pwned')</script> <b>hi</b>", second_task))
        page.reload()
        assert "<script>alert('pwned')</script> <b>hi</b>" in page.inner_text("#post")
        # mouse: click "8. Very likely right", then the button
        page.click("#c8")
        page.click("#submit")
        page.wait_for_url(lambda url: not url.endswith(second_task))
        assert dialogs == []
        # another labeler's token cannot see my tasks
        other = urls["labeler-02"]
        response = page.goto(f"{other}/task/{first_task}")
        assert response.status == 404
        with sqlite3.connect(db) as conn:
            stored = dict(conn.execute("SELECT task_id, confidence FROM judgments").fetchall())
        assert stored == {first_task: 2, second_task: 8}
        judgments = collect_judgments(tmp_path / "study")
        tasks = pd.read_parquet(tmp_path / "study" / "tasks.parquet").set_index("task_id")
        for t in (first_task, second_task):
            row = judgments.set_index("task_id").loc[t]
            side = "left" if stored[t] < 5 else "right"
            assert row["preferred"] == side and row["preferred_gen_id"] == tasks.loc[t, f"gen_id_{side}"]
            assert row["duration_s"] >= 0
    finally:
        srv.kill()


def test_likert_with_mouse(tmp_path, browser):
    cfg, db, srv = serve_study(tmp_path, "labelers.count=3", "design.items_per_policy=4", "design.kind=likert")
    try:
        urls = links(db, f"http://127.0.0.1:{srv.port}")
        page = browser.new_page()
        page.goto(urls["labeler-02"] + "/next")
        task = page.url.rsplit("/", 1)[1]
        ratings = {"overall": 6, "accuracy": 5, "coverage": 4, "coherence": 7}
        for axis, value in ratings.items():
            page.click(f"#{axis}{value}")
        page.keyboard.press("Enter")
        page.wait_for_url(lambda url: not url.endswith(task))
        judgments = collect_judgments(tmp_path / "study").set_index("task_id")
        assert {a: int(judgments.loc[task, a]) for a in ratings} == ratings
        assert pd.isna(judgments.loc[task, "preferred"])
    finally:
        srv.kill()


def test_a_prolific_participant_and_the_live_monitor(tmp_path, browser):
    """From a Prolific-style URL: instructions, the comprehension check, a batch answered with the keyboard, feedback
    on the checks answered wrongly, the completion code; the admin page refreshes itself (under the strict CSP) as
    another participant answers, with the figures of collect + analysis."""
    from conftest import baseline_study
    from test_study_crowd import SETTINGS, CrowdServer, enrol, label, pass_check

    from evalkit.analysis.quality import labeler_quality
    from evalkit.config import QualityConfig
    from evalkit.study.serve import init_db

    settings = [s for s in SETTINGS if not s.startswith("design.batch_size")] + ["design.batch_size=4", "design.gold_fraction=0.4"]
    baseline_study(tmp_path, *settings)
    db = init_db(tmp_path / "study")
    urls = links(db, "", crowd=True)
    srv = CrowdServer(tmp_path, free_port(), settings=settings).start()
    base = f"http://127.0.0.1:{srv.port}"
    errors = []
    try:
        page = browser.new_page()
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.goto(f"{base}{urls['study']}?PROLIFIC_PID=5f0c0ffee&STUDY_ID=st1&SESSION_ID=se1")
        assert "accuracy first" in page.inner_text("#instructions")
        page.click("#start")
        assert "Before you start" in page.content()
        page.check("input[name=q0][value='1']")
        page.click("#submit")
        page.wait_for_selector("#progress")  # the first task
        answered = []
        while page.query_selector("#progress"):
            answered.append(page.url.rsplit("/", 1)[1])
            page.keyboard.press("9")
            page.keyboard.press("Enter")
            page.wait_for_url(lambda url, last=answered[-1]: not url.endswith(last))
        assert page.inner_text("#completion-code") == "C0DE42"
        assert "cc=C0DE42" in page.get_attribute("#finish", "href")
        tasks = pd.read_parquet(tmp_path / "study" / "tasks.parquet").set_index("task_id").loc[answered]
        wrong = int((tasks["expected"] == "left").sum())  # "9" is definitely right
        if wrong:
            page.click("#feedback")
            assert len(page.query_selector_all("section.feedback")) == wrong
            assert page.inner_text("section.feedback .expected") == "left"
        else:
            assert page.query_selector("#feedback-none")
        # the admin page, then another participant answers: the table changes without a reload
        admin = browser.new_page()
        admin.on("console", lambda m: m.type == "error" and errors.append(m.text))
        admin.goto(base + urls["admin"])
        assert "prolific:5f0c0ffee" in admin.inner_text("#labelers")
        _, headers, _ = enrol(srv.port, urls["study"], "second")
        me = headers["Location"]
        pass_check(srv.port, me)
        done, _ = label(srv.port, me)
        for _ in range(80):  # the page's own script refreshes the table every few seconds; the test never reloads it
            if "prolific:second" in admin.inner_text("#labelers"):
                break
            admin.wait_for_timeout(250)
        assert "prolific:second" in admin.inner_text("#labelers")
        cells = admin.eval_on_selector_all("#labelers tr", "rows => rows.map(r => Array.from(r.cells).map(c => c.innerText))")
        header, rows = cells[0], {r[0]: dict(zip(cells[0], r)) for r in cells[1:]}
        assert rows["prolific:second"]["done"] == str(len(done)) and header[:3] == ["labeler_id", "done", "assigned"]
        collected = collect_judgments(tmp_path / "study")
        expect = labeler_quality({"tasks": pd.read_parquet(tmp_path / "study" / "tasks.parquet"), "judgments": collected},
                                 QualityConfig()).set_index("labeler_id")
        for who in ("prolific:5f0c0ffee", "prolific:second"):
            for col in ("left_rate", "gold_accuracy", "agreement_with_others"):
                shown, want = rows[who][col], expect.loc[who, col]
                assert (shown == "—") if pd.isna(want) else float(shown) == pytest.approx(want, abs=5e-4), (who, col, shown, want)
    finally:
        srv.kill()
    assert errors == []
