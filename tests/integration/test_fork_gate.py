"""A process forked while another thread is inside a SQLite transaction must still be able to
write (Celery forks replacement pool processes from a main process whose sweeper thread writes
every second). Without the fork gate in ``persistence/dialect.py`` the child inherits SQLite's
in-process lock state and every ``BEGIN IMMEDIATE`` in it waits out the busy timeout."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from persistence.store import Store

pytestmark = pytest.mark.timeout(60)


def test_fork_during_a_sqlite_transaction_leaves_the_child_able_to_write(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fork.db'}"
    store = Store.for_url(url)
    with store.tx() as conn:
        conn.execute(text("CREATE TABLE marks (who TEXT)"))
    inside = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with store.tx() as conn:  # BEGIN IMMEDIATE: this process holds SQLite's write lock
            conn.execute(text("INSERT INTO marks VALUES ('thread')"))
            inside.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(5)
    threading.Timer(0.3, release.set).start()  # the gate makes the fork wait for this
    began = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: a fresh connection (as a pool process opens), one write, a short busy timeout
        code = 1
        try:
            db = sqlite3.connect(tmp_path / "fork.db", timeout=3, isolation_level=None)
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO marks VALUES ('child')")
            db.execute("COMMIT")
            code = 0
        except Exception as exc:
            os.write(2, f"child: {exc!r}\n".encode())
        finally:
            os._exit(code)
    waited = time.monotonic() - began
    holder.join(5)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the forked child could not write"
    assert waited >= 0.2, f"the fork did not wait for the transaction to end ({waited:.3f}s)"
    with store.read() as conn:
        assert sorted(r[0] for r in conn.execute(text("SELECT who FROM marks"))) == ["child", "thread"]
