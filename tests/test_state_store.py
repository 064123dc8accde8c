"""StoreThread: store calls run on one thread, in order; snapshots can be queued without waiting."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from types import SimpleNamespace

import numpy as np
import pytest

from service.engine import _snapshot_failed
from service.state_store import JournalEntry, SqliteStateStore, StoredSession, StoreThread


def stored(sid: str, position: int) -> StoredSession:
    state = [np.full((2, 4), position, dtype=np.float32)]
    return StoredSession(sid, "owner", 0.0, 60, 1e12, "sha", position, state)


class GatedStore:
    """A fake store that records what ran on which thread; save_snapshots waits for `gate`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object, str]] = []
        self.gate = threading.Event()
        self.fail_next_save = False

    def _record(self, name: str, arg: object) -> None:
        self.calls.append((name, arg, threading.current_thread().name))

    def save_snapshots(self, snapshots: list[StoredSession]) -> None:
        assert self.gate.wait(timeout=10)
        if self.fail_next_save:
            self.fail_next_save = False
            raise OSError("disk full")
        self._record("save", [s.session_id for s in snapshots])

    def delete(self, session_ids: list[str]) -> None:
        self._record("delete", session_ids)

    def append_journal(self, entries: list[JournalEntry]) -> None:
        self._record("journal", [e.session_id for e in entries])

    def close(self) -> None:
        self._record("close", None)


def test_queued_snapshot_returns_at_once_and_later_calls_wait_behind_it() -> None:
    fake = GatedStore()
    store = StoreThread(fake)  # type: ignore[arg-type]
    written = store.save_snapshots_later([stored("a", 5), stored("b", 7)])
    assert not written.done()  # the caller did not wait for the write

    deleted = threading.Thread(target=store.delete, args=(["a"],))
    deleted.start()
    deleted.join(timeout=0.3)
    assert deleted.is_alive() and fake.calls == []  # the delete waits behind the snapshot

    fake.gate.set()
    deleted.join(timeout=10)
    written.result(timeout=10)
    store.append_journal([JournalEntry("b", 7, [1, 2])])
    store.close()
    assert [(name, arg) for name, arg, _ in fake.calls] == [
        ("save", ["a", "b"]), ("delete", ["a"]), ("journal", ["b"]), ("close", None)
    ]
    threads = {thread for _, _, thread in fake.calls}
    assert len(threads) == 1 and threads != {threading.current_thread().name}


def test_close_writes_what_is_queued(tmp_path) -> None:
    store = StoreThread(SqliteStateStore(tmp_path, durable=False))
    store.save_snapshots([stored("a", 1)])
    store.save_snapshots_later([stored("a", 9), stored("b", 3)])
    store.close()

    reopened = SqliteStateStore(tmp_path, durable=False)
    try:
        loaded_a, loaded_b = reopened.load("a"), reopened.load("b")
        assert loaded_a is not None and loaded_b is not None
        assert loaded_a[0].position == 9 and loaded_b[0].position == 3
        assert loaded_a[0].state is not None and float(loaded_a[0].state[0][0, 0]) == 9.0
    finally:
        reopened.close()


def test_a_failed_queued_write_is_reported_and_the_store_goes_on() -> None:
    fake = GatedStore()
    fake.fail_next_save = True
    fake.gate.set()
    store = StoreThread(fake)  # type: ignore[arg-type]
    failed = store.save_snapshots_later([stored("a", 1)])
    with pytest.raises(OSError, match="disk full"):
        failed.result(timeout=10)
    store.save_snapshots([stored("a", 2)])  # the next write goes through
    store.close()
    assert [name for name, _, _ in fake.calls] == ["save", "close"]


def test_sessions_of_a_failed_snapshot_are_marked_for_the_next_one() -> None:
    sessions = [SimpleNamespace(dirty=False), SimpleNamespace(dirty=False)]
    ok: Future[None] = Future()
    ok.set_result(None)
    _snapshot_failed(ok, sessions)  # type: ignore[arg-type]
    assert not any(s.dirty for s in sessions)

    failed: Future[None] = Future()
    failed.set_exception(OSError("disk full"))
    _snapshot_failed(failed, sessions)  # type: ignore[arg-type]
    assert all(s.dirty for s in sessions)
