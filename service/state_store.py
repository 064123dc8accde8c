"""Durable session state: the StateStore interface and its embedded SQLite implementation.

A session's durable record is a snapshot (its state tensors at some position, plus
identity, owner, times and the checkpoint it belongs to) and a journal of the tokens
applied since that snapshot. Restoring = load the snapshot, replay the journal through
the model. The engine talks to the interface only, so a networked store can replace
SQLite for several replicas.

The engine calls the store through StoreThread: every call runs on one thread of its own,
in the order the engine made them.
"""

from __future__ import annotations

import fcntl
import functools
import json
import sqlite3
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from service import unbind_thread


@dataclass
class StoredSession:
    session_id: str
    owner: str  # principal that created it
    created_at: float  # wall clock, seconds since the epoch
    ttl: int  # idle seconds before expiry
    expires_at: float  # wall clock
    checkpoint_sha256: str  # the model the state belongs to
    position: int  # tokens consumed at the snapshot
    state: list[np.ndarray] | None  # snapshot tensors [layers, hidden] each; None = zeros


@dataclass
class JournalEntry:
    session_id: str
    start_position: int  # session position before these tokens
    tokens: list[int]  # applied tokens (input or generated), in order


class StateStore(Protocol):
    def sessions(self) -> Iterator[StoredSession]:
        """Every stored session, without state tensors (state=None)."""
        ...

    def load(self, session_id: str) -> tuple[StoredSession, list[JournalEntry]] | None:
        """A session's snapshot (with state) and the journal after it, in order."""
        ...

    def save_snapshots(self, snapshots: Iterable[StoredSession]) -> None:
        """Write snapshots (upsert) and drop the journal behind them, in one transaction."""
        ...

    def append_journal(self, entries: Iterable[JournalEntry]) -> None:
        """Append journal entries in one durable transaction (renewing their sessions' expiry)."""
        ...

    def touch(self, expiries: Iterable[tuple[str, float]]) -> None:
        """Set (session_id, expires_at) of sessions used without a change of state."""
        ...

    def delete(self, session_ids: Iterable[str]) -> None: ...

    def purge_expired(self, now: float) -> list[str]:
        """Delete sessions whose expiry passed; return their ids."""
        ...

    def close(self) -> None: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    ttl INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    checkpoint_sha256 TEXT NOT NULL,
    position INTEGER NOT NULL,
    state BLOB,            -- the state tensors, concatenated raw bytes; NULL = zeros
    state_meta TEXT        -- JSON: dtype and shape of each tensor
);
CREATE TABLE IF NOT EXISTS journal (
    session_id TEXT NOT NULL,
    start_position INTEGER NOT NULL,
    tokens BLOB NOT NULL,  -- int32 little-endian
    PRIMARY KEY (session_id, start_position)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_expiry ON sessions (expires_at);
"""


@functools.lru_cache(maxsize=64)
def _state_meta(layout: tuple[tuple[str, tuple[int, ...]], ...]) -> str:
    return json.dumps([{"dtype": dtype, "shape": list(shape)} for dtype, shape in layout])


def _pack_state(state: list[np.ndarray] | None) -> tuple[bytes | None, str | None]:
    if state is None:
        return None, None
    # Every session of a model has the same layout: its JSON is built once (a snapshot
    # writes hundreds of sessions at a time).
    meta = _state_meta(tuple((a.dtype.str, a.shape) for a in state))
    return b"".join(np.ascontiguousarray(a).tobytes() for a in state), meta


def _unpack_state(blob: bytes | None, meta: str | None) -> list[np.ndarray] | None:
    if blob is None or meta is None:
        return None
    arrays, offset = [], 0
    for spec in json.loads(meta):
        dtype = np.dtype(spec["dtype"])
        count = int(np.prod(spec["shape"]))
        arrays.append(np.frombuffer(blob, dtype=dtype, count=count, offset=offset).reshape(spec["shape"]).copy())
        offset += count * dtype.itemsize
    return arrays


def _pack_tokens(tokens: list[int]) -> bytes:
    return array("i", tokens).tobytes()


def _unpack_tokens(blob: bytes) -> list[int]:
    out = array("i")
    out.frombytes(blob)
    return out.tolist()


T = TypeVar("T")


class StoreThread:
    """A StateStore whose calls all run on one thread of its own, in the order they were made.

    A periodic snapshot of 256 sessions is 10-40 ms of SQLite work; on the engine thread it held
    back a whole step of answers once per interval (the p99 of a 256-session load).
    `save_snapshots_later` queues it and returns at once. Every other call waits for its result,
    and because calls run in order, nothing the engine writes or reads later (a delete, an
    eviction's snapshot, a journal append, a load) overtakes a snapshot still in the queue.
    """

    def __init__(self, store: StateStore) -> None:
        self.store = store
        # Its thread starts on the engine thread's first call, so it would inherit the engine's core.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lstm-store", initializer=unbind_thread)

    def _call(self, fn: Callable[..., T], *args: object) -> T:
        return self._thread.submit(fn, *args).result()

    def sessions(self) -> Iterator[StoredSession]:
        return iter(self._call(lambda: list(self.store.sessions())))

    def load(self, session_id: str) -> tuple[StoredSession, list[JournalEntry]] | None:
        return self._call(self.store.load, session_id)

    def save_snapshots(self, snapshots: Iterable[StoredSession]) -> None:
        self._call(self.store.save_snapshots, list(snapshots))

    def save_snapshots_later(self, snapshots: Iterable[StoredSession]) -> Future[None]:
        """Queue snapshots; the future says when (and whether) they were written."""
        return self._thread.submit(self.store.save_snapshots, list(snapshots))

    def append_journal(self, entries: Iterable[JournalEntry]) -> None:
        self._call(self.store.append_journal, list(entries))

    def touch_later(self, expiries: Iterable[tuple[str, float]]) -> Future[None]:
        return self._thread.submit(self.store.touch, list(expiries))

    def delete(self, session_ids: Iterable[str]) -> None:
        self._call(self.store.delete, list(session_ids))

    def purge_expired(self, now: float) -> list[str]:
        return self._call(self.store.purge_expired, now)

    def flush(self) -> None:
        """Wait for every call queued so far (and the callbacks of their futures) to finish."""
        self._call(lambda: None)

    def close(self) -> None:
        """Write what is queued, then close the store."""
        self._call(self.store.close)
        self._thread.shutdown()


class StateStoreError(Exception):
    """The state store cannot be opened or read (the server refuses to start)."""


class StateStoreLockedError(StateStoreError):
    """Another server process uses this state directory."""


class SqliteStateStore:
    """SQLite in WAL mode under `directory`. `durable=True` fsyncs every commit (journal mode)."""

    def __init__(self, directory: Path | str, durable: bool) -> None:
        self.directory = Path(directory)
        self.path = self.directory / "sessions.sqlite3"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # One server per state directory: two would restore each other's sessions.
            self._lock = open(self.directory / "lock", "a+")
        except OSError as e:
            raise StateStoreError(f"{self.directory}: cannot use it as the state directory: {e}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise StateStoreLockedError(
                f"{self.directory}: state directory is in use by another lstm-serve process"
            ) from None
        try:
            # Used by one thread at a time (the engine's StoreThread), never by two at once.
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self.db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as e:
            self._lock.close()
            raise StateStoreError(
                f"{self.path}: cannot open the session store ({type(e).__name__}: {e}); "
                "fix its permissions, or move a damaged file away to start with no stored sessions"
            ) from None

    def _transaction(self) -> _Tx:
        return _Tx(self.db)

    def sessions(self) -> Iterator[StoredSession]:
        # position includes the journal: the session's position once the journal is replayed.
        rows = self.db.execute(
            "SELECT s.session_id, owner, created_at, ttl, expires_at, checkpoint_sha256, "
            "MAX(position, COALESCE(j.end_position, 0)) FROM sessions s LEFT JOIN "
            "(SELECT session_id, MAX(start_position + length(tokens) / 4) AS end_position FROM journal "
            "GROUP BY session_id) j ON j.session_id = s.session_id"
        )
        for row in rows:
            yield StoredSession(*row, state=None)  # type: ignore[misc]  # row: the 7 columns before state

    def load(self, session_id: str) -> tuple[StoredSession, list[JournalEntry]] | None:
        row = self.db.execute(
            "SELECT session_id, owner, created_at, ttl, expires_at, checkpoint_sha256, position, state, state_meta "
            "FROM sessions WHERE session_id = ?",
            (session_id,),
        ).fetchone()
        if row is None:
            return None
        stored = StoredSession(*row[:7], state=_unpack_state(row[7], row[8]))  # type: ignore[misc]
        journal = [
            JournalEntry(session_id, start, _unpack_tokens(blob))
            for start, blob in self.db.execute(
                "SELECT start_position, tokens FROM journal WHERE session_id = ? AND start_position >= ? "
                "ORDER BY start_position",
                (session_id, stored.position),
            )
        ]
        return stored, journal

    def save_snapshots(self, snapshots: Iterable[StoredSession]) -> None:
        rows = []
        for s in snapshots:
            blob, meta = _pack_state(s.state)
            rows.append((s.session_id, s.owner, s.created_at, s.ttl, s.expires_at, s.checkpoint_sha256, s.position,
                         blob, meta))
        with self._transaction():
            self.db.executemany(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(session_id) DO UPDATE SET "
                "expires_at=excluded.expires_at, ttl=excluded.ttl, position=excluded.position, "
                "state=excluded.state, state_meta=excluded.state_meta",
                rows,
            )
            # The snapshots hold every token applied so far: the journal before them is done.
            self.db.executemany("DELETE FROM journal WHERE session_id = ?", [(row[0],) for row in rows])

    def append_journal(self, entries: Iterable[JournalEntry]) -> None:
        entries = list(entries)
        now = time.time()
        with self._transaction():
            self.db.executemany(
                "INSERT OR REPLACE INTO journal VALUES (?, ?, ?)",
                [(e.session_id, e.start_position, _pack_tokens(e.tokens)) for e in entries],
            )
            # A use renews a session's time to live: a crash must not purge one still in use.
            self.db.executemany(
                "UPDATE sessions SET expires_at = ? + ttl WHERE session_id = ?", [(now, e.session_id) for e in entries]
            )

    def touch(self, expiries: Iterable[tuple[str, float]]) -> None:
        with self._transaction():
            self.db.executemany(
                "UPDATE sessions SET expires_at = ? WHERE session_id = ?", [(exp, sid) for sid, exp in expiries]
            )

    def delete(self, session_ids: Iterable[str]) -> None:
        ids = [(sid,) for sid in session_ids]
        with self._transaction():
            self.db.executemany("DELETE FROM sessions WHERE session_id = ?", ids)
            self.db.executemany("DELETE FROM journal WHERE session_id = ?", ids)

    def purge_expired(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        expired = [r[0] for r in self.db.execute("SELECT session_id FROM sessions WHERE expires_at < ?", (now,))]
        if expired:
            self.delete(expired)
        return expired

    def close(self) -> None:
        self.db.close()
        self._lock.close()


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
