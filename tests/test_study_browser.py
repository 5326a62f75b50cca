"""A labeler in headless Chromium (Debian's, driven by Playwright): instructions, pairwise and Likert tasks answered
with keyboard and mouse, judgments in SQLite and in judgments.parquet with the swap undone, another labeler's token
refused, a post with <script> shown as text."""

import sqlite3
from pathlib import Path

import pandas as pd
import pytest
from test_study_serve import Server, free_port, make_study

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
