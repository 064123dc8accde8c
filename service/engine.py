"""The engine: sessions, the request queue and the loop that owns the device.

One dedicated thread runs the engine loop: it drains the inbox (work handed over by the
asyncio gRPC layer), asks the scheduler what runs next, has the runner execute it as one
batch, and hands the results back to the event loop in one call per step. The asyncio
side never touches torch; the engine never touches grpc.

Continuous batching: when the device is idle a request runs at once; while a step is
running, new requests accumulate in the inbox and the next step takes them all (up to
the scheduler's budgets).
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import logging
import math
import re
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from model.checkpoint import Checkpoint
from model.tokenizer import CharTokenizer, UnknownCharacterError
from service.logs import short_id
from service.runner import ModelRunner, RowInput, RowOutput, SamplingParams
from service.sampling import to_signed64
from service.scheduler import ScheduledRow, Scheduler, StepPlan, WorkItem, WorkKind
from service.state_store import JournalEntry, StateStore, StateStoreError, StoredSession, StoreThread

log = logging.getLogger("lstm_serve.engine")

SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{22,128}$")


def session_key(owner: str, session_id: str) -> str:
    """Sessions are keyed per principal, so one principal's ids say nothing about another's
    (creating an id another principal uses succeeds instead of answering ALREADY_EXISTS)."""
    return f"{owner}\x1f{session_id}" if owner else session_id


def public_id(key: str) -> str:
    return key.rsplit("\x1f", 1)[-1]


# ---- errors (the API layer maps each to a gRPC status) ------------------------------------


class EngineError(Exception):
    """A request the engine refuses; the message is meant for the caller."""


class NotFoundError(EngineError):
    pass


class InvalidArgumentError(EngineError):
    pass


class AlreadyExistsError(EngineError):
    pass


class ResourceExhaustedError(EngineError):
    def __init__(self, message: str, retry_after_ms: int = 100) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms  # a hint for the caller's backoff


class PositionConflictError(EngineError):
    def __init__(self, session_id: str, expected: int, current: int) -> None:
        super().__init__(
            f"expected_position {expected} does not match the session's current position {current}; "
            f"the step was not applied"
        )
        self.current_position = current


class UnavailableError(EngineError):
    pass


class FailedPreconditionError(EngineError):
    pass


# Holding a step for returning sessions (see Engine._regroup). Its first part lasts at most
# this share of the previous step or this long per session waited for, whichever is longer,
# and while clients are seen to come back at least the minimum hold. Past it a hold goes on
# only while the traffic is a pure loop (others waiting at most this share of the sessions
# waited for) and they keep coming back, each within REGROUP_QUIET_SECONDS of the last.
# Never more than max_batch_wait_ms. Holds continue only while a moving average (this weight
# per hold) of the share of sessions back within the first part stays at or above the
# minimum return rate; else one step in REGROUP_PROBE_EVERY still holds (first part only).
# The largest response the server sends (gRPC's send limit): a step whose response would be
# larger is refused before it is applied. At the default limits the largest (4096 tokens with
# log-probabilities and the hidden state of a 2x512 model) is ~10 MB.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024

# One session's queued work may take at most this share of the engine queue
# (--max-queued-tokens), and never less than one largest request. A session runs one row per
# step, so a client that queued 64 Generates of 4096 tokens on one session held the whole
# default queue for minutes, and every other client's larger requests got RESOURCE_EXHAUSTED.
# A StreamSteps stream holds the same share (service/server.py).
QUEUE_SHARE = 8

ENGINE_FAILED = "the server's engine failed and the server is restarting; retry shortly"

# Memory for the replay cache (each session's most recent step result, for a retry of it):
# results of more than REPLAY_UNTRACKED_TOKENS tokens, or with log-probabilities or hidden
# states, count against this budget and the oldest are dropped past it (a retry of a dropped
# one gets ABORTED naming the position, as any conflict). Small ones (~1 KB) are not counted.
REPLAY_CACHE_BYTES = 256 * 1024 * 1024
REPLAY_UNTRACKED_TOKENS = 16

# A graceful stop writes every changed session; a failed final write loses acknowledged work in
# snapshot mode, so it is retried (each attempt waits up to SQLite's 5 s for a write lock).
FINAL_SNAPSHOT_ATTEMPTS = 2
FINAL_SNAPSHOT_RETRY_SECONDS = 1.0

REGROUP_SHARE_OF_STEP = 0.5
REGROUP_SECONDS_PER_ANSWER = 0.0002  # ~what the RPC layer on 2 cores needs to answer a session and read it back
REGROUP_MIN_HOLD_SECONDS = 0.020
REGROUP_OTHERS_SHARE = 0.1
REGROUP_QUIET_SECONDS = 0.005
REGROUP_MIN_RETURN_RATE = 0.2
REGROUP_RATE_WEIGHT = 0.2
REGROUP_PROBE_EVERY = 20


# ---- data passed to the API layer ---------------------------------------------------------


@dataclass(frozen=True)
class EngineLimits:
    max_sessions: int = 100_000  # sessions that may exist at once
    max_tokens_per_request: int = 4096  # input tokens in one step or one prompt
    max_generate_tokens: int = 4096  # max_tokens of one Generate
    default_ttl_seconds: int = 1800  # idle time-to-live unless a session asks otherwise
    max_ttl_seconds: int = 7 * 24 * 3600  # largest ttl a session may ask for
    max_batch_sessions: int = 256  # sessions in one engine step
    max_batch_tokens: int = 4096  # tokens in one engine step
    max_chunk_tokens: int = 64  # tokens of one session in one step (longer inputs are split)
    max_queued_tokens: int = 262_144  # tokens waiting in the engine over all sessions
    # How long a step may be held for the sessions the previous step answered to send their
    # next request (0 = never hold). A hold ends sooner when they are all back or stop coming
    # (see Engine._regroup). 100 ms: 256 token-by-token sessions need ~50-60 ms on 2 cores to
    # all come back, 64 sessions in 16-token chunks ~25-40 ms (a 20 ms cap left ~6 of those
    # a whole step behind: p99 210-229 -> ~151 ms at 50).
    max_batch_wait_ms: float = 100.0
    initial_capacity: int = 64  # state slots allocated at start; the slab grows on demand
    # Sessions whose state is on the device; beyond it, idle sessions are evicted to the
    # state store (LRU). 0 = max_sessions (and without a store it is always max_sessions).
    max_resident_sessions: int = 0


@dataclass(frozen=True)
class Durability:
    mode: str = "none"  # none | snapshot | journal
    snapshot_interval_seconds: float = 5.0  # how often dirty sessions are snapshotted
    restore: str = "lazy"  # lazy (on first use) | eager (all at start)


@dataclass(frozen=True)
class SessionInfo:
    session_id: str  # opaque id, >= 128 random bits
    position: int  # tokens consumed so far
    created_at: float  # wall-clock seconds since the epoch
    expires_at: float  # wall-clock seconds since the epoch, if it stays idle
    ttl_seconds: int  # idle time-to-live


@dataclass(frozen=True)
class StepOptions:
    top_k: int = 5  # top next tokens per input token
    want_logprobs: bool = False  # full log-softmax per input token
    want_hidden: bool = False  # top-layer h per input token


@dataclass
class StepResult:
    session_id: str
    position: int  # session position after the step
    tokens: list[int]  # the input tokens, one output each
    top_tokens: np.ndarray | None  # [n, k] int64
    top_logprobs: np.ndarray | None  # [n, k] float32
    logprobs: np.ndarray | None  # [n, vocab] float32
    hidden: np.ndarray | None  # [n, hidden] float32


@dataclass(frozen=True)
class GenerateParams:
    max_tokens: int  # tokens to sample
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # 1 = no limit
    seed: int | None = None  # None = random
    stop: tuple[str, ...] = ()  # stop after the generated text ends with one of these


@dataclass(frozen=True)
class GeneratedToken:
    token: int
    text: str
    logprob: float  # under the model, before temperature and filtering
    position: int  # session position after this token
    finish_reason: str | None  # set on the last token: "length" or "stop"


# ---- internal records ---------------------------------------------------------------------


@dataclass(eq=False)
class _Session:
    session_id: str
    owner: str  # principal that created it; others get NOT_FOUND
    slot: int  # column in the runner's state slabs
    ttl: int  # idle seconds before expiry
    created_at: float  # wall clock
    last_used: float  # monotonic; expiry is last_used + ttl
    position: int = 0
    dirty: bool = False  # state changed since its last snapshot in the store
    # A store write for it failed (journal, reset): its stored state is behind, so it is
    # snapshotted whole before it runs (or is journaled, or answered) again.
    needs_snapshot: bool = False
    snapshot_in_flight: Future[None] | None = None  # its last background snapshot, until written
    # Set for stored sessions of another checkpoint: refused with FAILED_PRECONDITION.
    foreign_checkpoint: str | None = None
    # The most recent step (start position, tokens, result): a retry of it is answered
    # from here instead of being applied twice.
    last_step: tuple[int, tuple[int, ...], StepResult] | None = None
    key: str = field(init=False)  # session_key(owner, session_id), computed once: every step looks it up

    def __post_init__(self) -> None:
        self.key = session_key(self.owner, self.session_id)


@dataclass(eq=False)
class StepGroup:
    """Requests of one stream: once one fails, the engine drops those of them that have not
    started, so what a failed stream applied does not depend on timing."""

    failed: bool = False  # a request of the group failed (set on the engine thread)


@dataclass(eq=False)
class _StepJob:
    future: asyncio.Future[StepResult]
    expected_position: int | None
    options: StepOptions
    group: StepGroup | None = None  # the stream it came on, if any
    session: Any = None  # the _Session it was sent to (not another one created later with its id)
    checked: bool = False  # expected_position and replay checked (on first run)
    start_position: int = -1  # session position before this step
    parts: list[RowOutput] = field(default_factory=list)


@dataclass(eq=False)
class _GenerateJob:
    queue: asyncio.Queue[GeneratedToken | BaseException | None]
    expected_position: int | None
    params: GenerateParams
    seed_bits: int  # the seed as int64 bits
    session: Any = None  # the _Session it was sent to (not another one created later with its id)
    checked: bool = False  # expected_position checked (on first run)
    text: str = ""  # generated so far, for stop strings
    first_token_at: float | None = None
    last_token_at: float | None = None


@dataclass(eq=False)
class _ControlJob:
    apply: Callable[[], Any]  # runs on the engine thread
    future: asyncio.Future[Any]


class Engine:
    def __init__(
        self,
        checkpoint: Checkpoint,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        limits: EngineLimits | None = None,
        metrics: Any = None,
        store: StateStore | None = None,
        durability: Durability | None = None,
        threads: int = 0,
    ) -> None:
        self.checkpoint = checkpoint
        # torch CPU threads of the engine thread, the only one that runs the model's parallel work
        # (see runner.claim_torch_threads; 0 = the caller's torch default).
        self.threads = threads or torch.get_num_threads()
        self.tokenizer: CharTokenizer = checkpoint.tokenizer
        self._vocab_size = len(self.tokenizer)
        self.limits = limits or EngineLimits()
        self.metrics = metrics
        self.device = device
        self.dtype = dtype
        self.store = StoreThread(store) if store is not None else None
        self.durability = durability or Durability()
        if (self.store is None) != (self.durability.mode == "none"):
            raise ValueError("a state store goes with durability snapshot or journal, and only with them")
        resident = self.limits.max_resident_sessions or self.limits.max_sessions
        if self.store is None:
            resident = self.limits.max_sessions
        # One step needs its batch resident, a fork its source and its copy.
        self.max_resident = max(min(resident, self.limits.max_sessions), self.limits.max_batch_sessions, 2)
        if self.store is not None and self.limits.max_resident_sessions and self.max_resident > resident:
            log.warning(
                "max_resident_sessions %d raised to %d: a step needs max_batch_sessions resident, a fork 2",
                resident, self.max_resident,
            )
        self.runner = ModelRunner(
            checkpoint, device, dtype, self.limits.initial_capacity, max_capacity=self.max_resident
        )
        # Resident sessions in least-recently-used order (eviction takes from the front).
        self._resident: OrderedDict[str, None] = OrderedDict()
        self._pinned: set[int] = set()  # slots in use by the step being prepared
        self._last_snapshot = time.monotonic()
        self.scheduler = Scheduler(
            self.limits.max_batch_sessions, self.limits.max_batch_tokens, self.limits.max_chunk_tokens
        )
        self._sessions: dict[str, _Session] = {}
        self._expiry: list[tuple[float, str]] = []  # heap of (deadline, session_id), checked lazily
        self._inbox: deque[Any] = deque()
        # Tokens admitted but still in the inbox (not yet counted by the scheduler), in all and per
        # session key; guarded by _admission.
        self._inbox_tokens = 0
        self._inbox_session_tokens: dict[str, int] = {}
        self._session_queue_limit = max(
            self.limits.max_queued_tokens // QUEUE_SHARE,
            self.limits.max_tokens_per_request + self.limits.max_generate_tokens,
        )
        self._admission = threading.Lock()
        self._wake = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False
        self.steps_run = 0
        # For regrouping (see _regroup): the sessions the last step answered, when it ended
        # and how long it ran.
        self._answered: list[str] = []
        # Sessions read (GetSession, on the event loop) since the last snapshot: their expiry moved.
        self._touched: deque[str] = deque()
        # Replay cache entries counted against REPLAY_CACHE_BYTES, oldest first (engine thread only).
        self._replay_sizes: OrderedDict[str, int] = OrderedDict()
        self._replay_bytes = 0
        self._last_step_end = 0.0
        self._last_step_seconds = 0.0
        self._return_rate = 1.0  # moving average of the share of waited-for sessions that came back
        self._steps_since_hold = 0
        self._unsaved_at_stop = 0  # sessions whose latest state the final snapshot could not store
        self._hurry = threading.Event()  # see hurry()
        # Why the engine thread ended unexpectedly (a bug outside a step): calls then fail at once
        # instead of waiting forever, and on_failure (set by the server, run on the event loop)
        # stops the process so that it can be restarted.
        self.failure: BaseException | None = None
        self.on_failure: Callable[[], None] | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the engine thread; it warms the model up and reads the stored sessions first (an
        error there is raised here)."""
        self._loop = loop
        started: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="lstm-engine", daemon=True)
        self._thread.start()
        started.result()

    def _start_on_thread(self) -> None:
        torch.set_num_threads(self.threads)
        self._warm_up()
        if self.store is not None:
            try:
                self._load_store()
            except sqlite3.Error as e:
                raise StateStoreError(
                    f"the session store cannot be read ({type(e).__name__}: {e}); "
                    "move the damaged file away to start with no stored sessions"
                ) from None

    def _warm_up(self) -> None:
        """One real step so the first request does not pay for lazy initialisation."""
        slot = self.runner.allocate()
        self.runner.execute([RowInput(slot=slot, tokens=[0], position=0, top_k=5)])
        self.runner.execute(
            [RowInput(slot=slot, tokens=[], position=1, sampling=SamplingParams(1.0, 0, 1.0, 0))]
        )
        self.runner.zero(slot)
        self.runner.release(slot)

    def begin_drain(self) -> None:
        """Refuse new work; what is queued still runs."""
        self._draining = True

    async def drain(self, grace_seconds: float) -> None:
        """Refuse new work and wait (at most grace_seconds, or until `hurry()`) for the rest."""
        self.begin_drain()
        deadline = time.monotonic() + grace_seconds
        while (self.scheduler.queued_items or self._inbox) and time.monotonic() < deadline and not self.hurried:
            await asyncio.sleep(0.02)

    def hurry(self) -> None:
        """Stop as soon as possible (a second signal): the drain ends, a failed final snapshot is
        not retried. Safe from any thread."""
        self._hurry.set()

    @property
    def hurried(self) -> bool:
        return self._hurry.is_set()

    def stop(self) -> bool:
        """Stop the engine thread; with a store, write every changed session first.

        False when the store could not take the final write: in snapshot mode the latest
        state of some sessions is then lost (the log says how many).
        """
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self.store is not None:
            self.store.close()
        return self._unsaved_at_stop == 0

    # ---- session operations (called on the event loop) ----------------------------------

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise UnavailableError(ENGINE_FAILED)

    def _check_accepting(self) -> None:
        self._check_alive()
        if self._draining:
            raise UnavailableError("the server is shutting down; retry on another replica")

    def _ttl(self, ttl_seconds: int | None) -> int:
        if ttl_seconds is None:
            return self.limits.default_ttl_seconds
        if not 1 <= ttl_seconds <= self.limits.max_ttl_seconds:
            raise InvalidArgumentError(
                f"ttl_seconds must be between 1 and {self.limits.max_ttl_seconds}, got {ttl_seconds}"
            )
        return ttl_seconds

    def _new_id(self, proposed: str, field_name: str) -> str:
        if not proposed:
            return secrets.token_urlsafe(16)  # 128 random bits
        if not SESSION_ID_RE.match(proposed):
            raise InvalidArgumentError(
                f"{field_name} must be 22-128 URL-safe characters [A-Za-z0-9_-] (>= 128 random bits), "
                f"got {len(proposed)} characters"
            )
        return proposed

    def _lookup(self, owner: str, session_id: str) -> _Session:
        if not session_id:
            raise InvalidArgumentError("session_id is required")
        record = self._sessions.get(session_key(owner, session_id))
        if record is None or record.owner != owner:
            raise NotFoundError(f"session {short_id(session_id)} not found (unknown, deleted or expired)")
        return record

    def _info(self, record: _Session) -> SessionInfo:
        idle = time.monotonic() - record.last_used
        return SessionInfo(
            session_id=record.session_id,
            position=record.position,
            created_at=record.created_at,
            expires_at=time.time() - idle + record.ttl,
            ttl_seconds=record.ttl,
        )

    async def _on_engine(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread (ordered with everything else in the inbox)."""
        assert self._loop is not None
        self._check_alive()
        future: asyncio.Future[Any] = self._loop.create_future()
        self._inbox.append(_ControlJob(fn, future))
        self._notify()
        return await future

    async def _in_session_order(self, key: str, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread after the session's queued work."""
        assert self._loop is not None
        self._check_alive()
        future: asyncio.Future[Any] = self._loop.create_future()
        item = WorkItem(key, WorkKind.CONTROL, payload=_ControlJob(fn, future))
        self._inbox.append(item)
        self._notify()
        try:
            return await future
        finally:
            if not future.done() or future.cancelled():  # the caller gave up: not applied later
                self.scheduler.cancel(item)

    async def create_session(self, owner: str, ttl_seconds: int | None = None, session_id: str = "") -> SessionInfo:
        self._check_accepting()
        ttl = self._ttl(ttl_seconds)
        sid = self._new_id(session_id, "session_id")
        return await self._on_engine(lambda: self._create(owner, ttl, sid))

    def _create(self, owner: str, ttl: int, sid: str, copy_from: _Session | None = None) -> SessionInfo:
        if session_key(owner, sid) in self._sessions:
            raise AlreadyExistsError(f"session_id {short_id(sid)} is already in use")
        if len(self._sessions) >= self.limits.max_sessions:
            raise ResourceExhaustedError(
                f"the server holds its maximum of {self.limits.max_sessions} sessions; "
                "delete idle sessions or retry later",
                retry_after_ms=1000,
            )
        if copy_from is not None:
            self._make_resident(copy_from)
            self._pinned.add(copy_from.slot)
        slot = self._allocate_slot()
        now = time.monotonic()
        record = _Session(sid, owner, slot, ttl, time.time(), now)
        if copy_from is not None:
            self._pinned.discard(copy_from.slot)
            self.runner.copy(copy_from.slot, slot)
            record.position = copy_from.position
        self._sessions[record.key] = record
        self._resident[record.key] = None
        heapq.heappush(self._expiry, (now + ttl, record.key))
        if self.store is not None:  # the session exists durably before anyone hears of it
            try:
                self.store.save_snapshots([self._snapshot_of(record, with_state=copy_from is not None)])
            except Exception as e:  # undone: a session nobody was told of must not linger
                self._sessions.pop(record.key, None)
                self._release_slot(record)
                raise _store_unavailable("record the new session", e) from None
        if self.metrics is not None:
            self.metrics.sessions_created_total.inc()
        self._update_session_gauges()
        return self._info(record)

    async def get_session(self, owner: str, session_id: str) -> SessionInfo:
        record = self._lookup(owner, session_id)
        record.last_used = time.monotonic()
        if self.store is not None:
            self._touched.append(record.key)  # the next snapshot stores the later expiry
        return self._info(record)

    async def delete_session(self, owner: str, session_id: str) -> None:
        """Delete at once, not after the session's queued work: that work (a long Generate, say)
        ends with NOT_FOUND when it next comes up instead of delaying the delete."""
        self._lookup(owner, session_id)

        def delete() -> None:
            record = self._lookup(owner, session_id)
            self._remove(record)
            if self.metrics is not None:
                self.metrics.sessions_deleted_total.inc()

        await self._on_engine(delete)

    def _still(self, submitted: _Session) -> _Session:
        """The session a control was sent to, if it still exists (not another with its id)."""
        if self._sessions.get(submitted.key) is not submitted:
            raise NotFoundError(f"session {short_id(submitted.session_id)} was deleted or expired")
        return submitted

    async def reset_session(self, owner: str, session_id: str) -> SessionInfo:
        self._check_accepting()
        submitted = self._lookup(owner, session_id)

        def reset() -> SessionInfo:
            record = self._still(submitted)
            self._check_model(record)
            if record.slot >= 0:
                self.runner.zero(record.slot)
            record.position = 0
            self._set_last_step(record, None)
            record.last_used = time.monotonic()
            if self.store is not None:
                try:
                    self.store.save_snapshots([self._snapshot_of(record, with_state=False)])
                except Exception as e:  # reset in memory only: store it whole before it runs again
                    record.needs_snapshot = record.dirty = True
                    raise _store_unavailable("record the reset (it is applied; a retry is safe)", e) from None
                record.dirty = record.needs_snapshot = False
            return self._info(record)

        result: SessionInfo = await self._in_session_order(session_key(owner, session_id), reset)
        return result

    async def fork_session(
        self, owner: str, session_id: str, ttl_seconds: int | None = None, new_session_id: str = ""
    ) -> SessionInfo:
        self._check_accepting()
        submitted = self._lookup(owner, session_id)
        ttl = self._ttl(ttl_seconds)
        new_id = self._new_id(new_session_id, "new_session_id")

        def fork() -> SessionInfo:
            source = self._still(submitted)
            self._check_model(source)
            source.last_used = time.monotonic()
            return self._create(owner, ttl, new_id, copy_from=source)

        result: SessionInfo = await self._in_session_order(session_key(owner, session_id), fork)
        return result

    def _set_last_step(self, record: _Session, entry: tuple[int, tuple[int, ...], StepResult] | None) -> None:
        """Set a session's replay entry, within REPLAY_CACHE_BYTES (engine thread)."""
        old = self._replay_sizes.pop(record.key, 0)
        self._replay_bytes -= old
        record.last_step = entry
        if entry is None:
            return
        result = entry[2]
        if len(entry[1]) <= REPLAY_UNTRACKED_TOKENS and result.logprobs is None and result.hidden is None:
            return
        arrays = (result.top_tokens, result.top_logprobs, result.logprobs, result.hidden)
        size = 16 * len(entry[1]) + sum(a.nbytes for a in arrays if a is not None)
        self._replay_sizes[record.key] = size
        self._replay_bytes += size
        while self._replay_bytes > REPLAY_CACHE_BYTES:
            key, dropped = self._replay_sizes.popitem(last=False)
            self._replay_bytes -= dropped
            victim = self._sessions.get(key)
            if victim is not None:
                victim.last_step = None

    def response_bytes(self, n_tokens: int, options: StepOptions) -> int:
        """About how large the response to a step of n_tokens with these options is."""
        per_token = 16 + 9 * options.top_k  # token, framing, top-k ids and log-probabilities
        if options.want_logprobs:
            per_token += 4 * self._vocab_size + 6
        if options.want_hidden:
            per_token += 4 * self.runner.config.hidden_size + 6
        return n_tokens * per_token

    def _remove(self, record: _Session) -> None:
        if record.key in self._sessions:
            if self.store is not None:  # first: if it fails the session stays as it was
                try:
                    self.store.delete([record.key])
                except Exception as e:
                    raise _store_unavailable("delete the session", e) from None
            del self._sessions[record.key]
            self._set_last_step(record, None)
            if record.slot >= 0:
                self._release_slot(record)
            if len(self._expiry) > 2 * len(self._sessions) + 1024:  # drop entries of removed sessions
                self._expiry = [(d, sid) for d, sid in self._expiry if sid in self._sessions]
                heapq.heapify(self._expiry)
            self._update_session_gauges()

    # ---- residency: which sessions have their state on the device (engine thread) -------

    def _check_model(self, record: _Session) -> None:
        if record.foreign_checkpoint is not None:
            raise FailedPreconditionError(
                f"session {short_id(record.session_id)} holds state of checkpoint "
                f"{record.foreign_checkpoint[:12]}…, but this server serves {self.checkpoint.sha256[:12]}…; "
                "its state cannot be fed to another model (delete it or serve its checkpoint)"
            )

    def _allocate_slot(self) -> int:
        """A zeroed slot; evicts the least recently used idle session if the slab is full."""
        if self.runner.stats().used >= self.max_resident:
            self._evict_one()
        return self.runner.allocate()

    def _release_slot(self, record: _Session) -> None:
        self.runner.zero(record.slot)
        self.runner.release(record.slot)
        self._resident.pop(record.key, None)
        record.slot = -1

    def _evict_one(self) -> None:
        if self.store is None:
            raise ResourceExhaustedError("no free state slot", retry_after_ms=1000)
        for sid in self._resident:
            record = self._sessions[sid]
            if record.slot in self._pinned:
                continue
            pending = record.snapshot_in_flight
            # A background snapshot not yet written (or failed) does not count as written.
            if record.dirty or (pending is not None and (not pending.done() or pending.exception() is not None)):
                try:
                    self.store.save_snapshots([self._snapshot_of(record, with_state=True)])
                except Exception as e:
                    raise _store_unavailable("save a session to make room", e) from None
                record.dirty = record.needs_snapshot = False
                record.snapshot_in_flight = None
            self._release_slot(record)
            if self.metrics is not None:
                self.metrics.sessions_evicted_total.inc()
            return
        raise ResourceExhaustedError("every resident session is in use; retry shortly", retry_after_ms=100)

    def _make_resident(self, record: _Session) -> None:
        """Bring a stored session's state onto the device: snapshot + journal replay."""
        if record.slot >= 0:
            self._resident.move_to_end(record.key)
            return
        self._check_model(record)
        assert self.store is not None
        loaded = self.store.load(record.key)
        if loaded is None:
            raise NotFoundError(f"session {short_id(record.session_id)} is missing from the state store")
        stored, journal = loaded
        slot = self._allocate_slot()
        record.slot = slot
        self._resident[record.key] = None
        if stored.state is not None:
            try:
                self.runner.write_state(slot, stored.state)
            except ValueError as e:  # a damaged or edited store: refuse this session, not the step
                self._release_slot(record)
                raise FailedPreconditionError(
                    f"session {short_id(record.session_id)}'s stored state does not fit the model ({e}); delete it"
                ) from None
        position = stored.position
        for entry in journal:
            if entry.start_position != position:
                log.warning("journal gap in session %s at %d", short_id(record.session_id), position)
                break
            tokens = entry.tokens
            for i in range(0, len(tokens), self.limits.max_chunk_tokens):
                chunk = tokens[i : i + self.limits.max_chunk_tokens]
                self.runner.execute([RowInput(slot=slot, tokens=chunk, position=position)])
                position += len(chunk)
        record.position = position
        record.dirty = bool(journal)
        if self.metrics is not None:
            self.metrics.sessions_restored_total.inc()

    def _snapshot_of(self, record: _Session, with_state: bool, state: list[np.ndarray] | None = None) -> StoredSession:
        idle = time.monotonic() - record.last_used
        if state is None and with_state and record.slot >= 0:
            state = self.runner.read_state(record.slot)
        return StoredSession(
            session_id=record.key,  # the store keys sessions per principal too
            owner=record.owner,
            created_at=record.created_at,
            ttl=record.ttl,
            expires_at=time.time() - idle + record.ttl,
            checkpoint_sha256=self.checkpoint.sha256,
            position=record.position,
            state=state,
        )

    def _snapshot_dirty(self) -> None:
        assert self.store is not None
        dirty = [r for sid in self._resident if (r := self._sessions[sid]).dirty]
        touched: set[str] = set()
        while self._touched:  # (appended to on the event loop; only this thread takes from it)
            touched.add(self._touched.popleft())
        if touched:  # read, not changed: only their expiry is written
            touched.difference_update(r.key for r in dirty)
            read = [record for key in touched if (record := self._sessions.get(key)) is not None]
            if read:
                wall, now = time.time(), time.monotonic()
                expiries = [(r.key, wall - (now - r.last_used) + r.ttl) for r in read]
                self.store.touch_later(expiries).add_done_callback(_touch_failed)
        if dirty:
            # One gather for all of them: per-session reads paused the engine ~40-70 ms at 256
            # sessions (the p99 of a 256-session load every snapshot interval).
            states = self.runner.read_states([r.slot for r in dirty])
            # Written on the store's thread while steps go on: these states are copies, and a
            # later store call (delete, eviction, journal) runs after this write, not before.
            written = self.store.save_snapshots_later(
                [self._snapshot_of(r, True, state) for r, state in zip(dirty, states)]
            )
            for r in dirty:
                r.dirty = False
                r.snapshot_in_flight = written
            written.add_done_callback(functools.partial(_snapshot_failed, sessions=dirty))
        self._last_snapshot = time.monotonic()

    def _load_store(self) -> None:
        """Register the stored sessions (lazy) or restore them all (eager); purge expired ones."""
        assert self.store is not None
        purged = self.store.purge_expired(time.time())
        now_wall, now = time.time(), time.monotonic()
        for stored in self.store.sessions():
            record = _Session(
                public_id(stored.session_id), stored.owner, -1, stored.ttl, stored.created_at,
                last_used=now - max(0.0, stored.ttl - (stored.expires_at - now_wall)),
                position=stored.position,
            )
            if stored.checkpoint_sha256 != self.checkpoint.sha256:
                record.foreign_checkpoint = stored.checkpoint_sha256
            self._sessions[record.key] = record
            heapq.heappush(self._expiry, (record.last_used + record.ttl, record.key))
        if self.durability.restore == "eager":
            for record in list(self._sessions.values())[: self.max_resident]:
                if record.foreign_checkpoint is None:
                    self._make_resident(record)
        log.info("state store: %d sessions known, %d expired ones purged", len(self._sessions), len(purged))
        self._update_session_gauges()

    def _update_session_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.sessions_active.set(len(self._sessions))
            self.metrics.state_memory_bytes.set(self.runner.stats().bytes)

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    # ---- steps and generation (called on the event loop) ---------------------------------

    def validate_tokens(self, tokens: list[int], field_name: str) -> None:
        vocab = self._vocab_size
        if len(tokens) > self.limits.max_tokens_per_request:
            raise InvalidArgumentError(
                f"{field_name} has {len(tokens)} tokens; at most {self.limits.max_tokens_per_request} per request"
            )
        if tokens and (min(tokens) < 0 or max(tokens) >= vocab):  # min/max in C; the loop only to name the bad one
            for i, t in enumerate(tokens):
                if not 0 <= t < vocab:
                    raise InvalidArgumentError(f"{field_name}[{i}] = {t} is out of range; token ids are 0..{vocab - 1}")

    def _admit(self, n_tokens: int, key: str) -> None:
        """Count n_tokens of session `key` against max_queued_tokens and the session's share of it;
        the caller then puts its item in the inbox."""
        self._check_accepting()
        if n_tokens > self.limits.max_queued_tokens:  # could never be admitted: not worth a retry
            raise InvalidArgumentError(
                f"this request needs {n_tokens} tokens of the engine queue, which holds at most "
                f"{self.limits.max_queued_tokens}; send fewer tokens (or a smaller max_tokens)"
            )
        with self._admission:
            waiting = self.scheduler.queued_tokens + self._inbox_tokens
            if waiting + n_tokens > self.limits.max_queued_tokens:
                raise ResourceExhaustedError(
                    f"the engine queue is full ({waiting} tokens waiting, limit "
                    f"{self.limits.max_queued_tokens}); retry after a short backoff",
                    retry_after_ms=50,
                )
            inbox = self._inbox_session_tokens
            mine = self.scheduler.session_tokens(key) + inbox.get(key, 0)
            if mine + n_tokens > self._session_queue_limit:
                raise ResourceExhaustedError(
                    f"session {short_id(public_id(key))} already has {mine} tokens queued, and one session may "
                    f"queue at most {self._session_queue_limit}; wait for its earlier requests to finish",
                    retry_after_ms=100,
                )
            self._inbox_tokens += n_tokens
            inbox[key] = inbox.get(key, 0) + n_tokens

    def submit_step(
        self,
        owner: str,
        session_id: str,
        tokens: list[int],
        expected_position: int | None = None,
        options: StepOptions = StepOptions(),
        group: StepGroup | None = None,
    ) -> tuple[asyncio.Future[StepResult], WorkItem]:
        """Queue a step; await the future for its result, `scheduler.cancel` the item if you
        give up on it."""
        assert self._loop is not None
        if not tokens:
            raise InvalidArgumentError("input is empty: set tokens or text to at least one token")
        self.validate_tokens(tokens, "tokens")
        if options.top_k < 0 or options.top_k > self._vocab_size:
            raise InvalidArgumentError(f"top_k must be between 0 and {self._vocab_size}, got {options.top_k}")
        if expected_position is not None and expected_position < 0:
            raise InvalidArgumentError(f"expected_position must be >= 0, got {expected_position}")
        if options.want_logprobs or options.want_hidden:
            self._check_response_size(len(tokens), options)
        record = self._lookup(owner, session_id)
        self._admit(len(tokens), record.key)
        future: asyncio.Future[StepResult] = self._loop.create_future()
        job = _StepJob(future, expected_position, options, group, session=record)
        item = WorkItem(record.key, WorkKind.STEP, list(tokens), payload=job, enqueued_at=time.monotonic())
        self._inbox.append(item)
        self._notify()
        return future, item

    def _notify(self) -> None:
        """Wake the engine thread for work just put in the inbox.

        Event.set takes the event's lock even when it is already set, once per request on the
        RPC thread; a set event is left alone. Safe because the engine clears the event before it
        drains the inbox: work appended before this check is drained after that clear.
        """
        if not self._wake.is_set():
            self._wake.set()
        if self.failure is not None:  # no engine thread to take it (appended after the failure was handled)
            self._fail_all_queued()

    async def step(
        self,
        owner: str,
        session_id: str,
        tokens: list[int],
        expected_position: int | None = None,
        options: StepOptions = StepOptions(),
    ) -> StepResult:
        future, item = self.submit_step(owner, session_id, tokens, expected_position, options)
        try:
            return await future
        finally:
            if not future.done() or future.cancelled():  # a cancelled await cancels the future too
                self.scheduler.cancel(item)

    def _check_response_size(self, n_tokens: int, options: StepOptions) -> None:
        """Refuse, before it is applied, a step whose response could not be sent."""
        size = self.response_bytes(n_tokens, options)
        if size > MAX_RESPONSE_BYTES:
            per_token = size // n_tokens
            raise InvalidArgumentError(
                f"the response to {n_tokens} tokens with return_logprobs/return_hidden would be about "
                f"{size / 2**20:.0f} MiB, over the {MAX_RESPONSE_BYTES // 2**20} MiB the server sends; "
                f"send at most {MAX_RESPONSE_BYTES // per_token} tokens per request with these options"
            )

    def validate_generate(self, params: GenerateParams) -> None:
        if not 1 <= params.max_tokens <= self.limits.max_generate_tokens:
            raise InvalidArgumentError(
                f"max_tokens must be between 1 and {self.limits.max_generate_tokens}, got {params.max_tokens}"
            )
        if not math.isfinite(params.temperature) or not 0 <= params.temperature <= 100:
            raise InvalidArgumentError(f"temperature must be a finite number in [0, 100], got {params.temperature}")
        if not 0 <= params.top_k <= len(self.tokenizer):
            raise InvalidArgumentError(f"top_k must be between 0 and {len(self.tokenizer)}, got {params.top_k}")
        if not math.isfinite(params.top_p) or not 0 < params.top_p <= 1:
            raise InvalidArgumentError(f"top_p must be in (0, 1], got {params.top_p}")
        if len(params.stop) > 16 or any(not s or len(s) > 256 for s in params.stop):
            raise InvalidArgumentError("stop takes at most 16 non-empty strings of at most 256 characters")
        for i, stop in enumerate(params.stop):  # the model can never write such a string: it would never match
            try:
                self.tokenizer.encode(stop)
            except UnknownCharacterError as e:
                raise InvalidArgumentError(f"stop[{i}] can never occur in generated text: {e}") from None

    async def generate(
        self,
        owner: str,
        session_id: str,
        prompt: list[int],
        params: GenerateParams,
        expected_position: int | None = None,
    ) -> AsyncIterator[GeneratedToken]:
        assert self._loop is not None
        self.validate_tokens(prompt, "prompt_tokens")
        self.validate_generate(params)
        if expected_position is not None and expected_position < 0:
            raise InvalidArgumentError(f"expected_position must be >= 0, got {expected_position}")
        record = self._lookup(owner, session_id)
        self._admit(len(prompt) + params.max_tokens, record.key)
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        queue: asyncio.Queue[GeneratedToken | BaseException | None] = asyncio.Queue()
        job = _GenerateJob(queue, expected_position, params, to_signed64(seed), session=record)
        item = WorkItem(
            session_key(owner, session_id),
            WorkKind.GENERATE,
            tokens=list(prompt),
            generate_tokens=params.max_tokens,
            payload=job,
            enqueued_at=time.monotonic(),
        )
        self._inbox.append(item)
        self._notify()
        try:
            while True:
                event = await queue.get()
                if event is None:
                    return
                if isinstance(event, BaseException):
                    raise event
                yield event
        finally:
            self.scheduler.cancel(item)

    # ---- the engine thread ----------------------------------------------------------------

    def _run(self, started: Future[None]) -> None:
        try:
            self._start_on_thread()
        except BaseException as e:
            started.set_exception(e)
            return
        started.set_result(None)
        try:
            self._serve()
        except BaseException as e:  # a bug outside a step (those are caught per step): fail loudly, not hang
            self.failure = e
            log.critical("the engine thread failed; stopping the server so that it can be restarted", exc_info=e)
            self._hurry.set()
            self._fail_all_queued()
            if self.store is not None:
                try:
                    self._final_snapshot()
                except BaseException:
                    log.exception("final snapshot after the engine failure failed")
            if self.on_failure is not None and self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self.on_failure)

    def _fail_all_queued(self) -> None:
        """After an engine failure: every request waiting in the inbox or the scheduler ends UNAVAILABLE."""
        error = UnavailableError(ENGINE_FAILED)
        deliveries: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        try:
            with self._admission:
                items = list(self._inbox)
                self._inbox.clear()
            items += self.scheduler.queued()
            for item in items:
                job = item.payload if isinstance(item, WorkItem) else item
                if isinstance(job, _ControlJob):  # a session operation, in the inbox or in session order
                    deliveries.append((_set_exception, (job.future, error)))
                else:
                    self._fail_item(item, error, deliveries)
            self.scheduler.cancel_all()
        finally:
            self._deliver(deliveries)

    def _serve(self) -> None:
        torch.set_grad_enabled(False)
        next_expiry_check = 0.0
        while not self._stopping:
            self._wake.clear()
            self._drain_inbox()
            now = time.monotonic()
            if now >= next_expiry_check:
                self._expire(now)
                next_expiry_check = now + 1.0
            if self.store is not None and now - self._last_snapshot >= self.durability.snapshot_interval_seconds:
                self._snapshot_dirty()
            self._regroup()
            plan = self.scheduler.schedule()
            if not plan:
                if self.metrics is not None:
                    self.metrics.queue_depth.set(self.scheduler.queued_items)
                self._wake.wait(timeout=1.0)
                continue
            self._execute_safely(plan)
        # What has started runs its input to the end, as a cancelled request's does (applied wholly
        # or not at all: a retry after the restart finds it whole); everything else is dropped.
        self.scheduler.cancel_all()
        while plan := self.scheduler.schedule():
            self._execute_safely(plan)
        if self.store is not None:
            self._final_snapshot()  # graceful stop: nothing applied is lost

    def _execute_safely(self, plan: StepPlan) -> None:
        try:
            self._execute(plan)
        except Exception:  # never let one bad step take the engine down
            log.exception("engine step failed")
            self._pinned.clear()
            self._fail_plan(plan, EngineError("internal error while running the model step"))

    def _final_snapshot(self) -> None:
        """Write every changed session before the engine stops, retrying a failed write."""
        assert self.store is not None
        self._snapshot_dirty()  # (expiries of read sessions, and the changed ones, in the background)
        for attempt in range(1, FINAL_SNAPSHOT_ATTEMPTS + 1):
            # A call through the store thread runs after every write queued before it, and a failed
            # background write has marked its sessions dirty again by the time this returns.
            self.store.flush()
            dirty = [r for key in self._resident if (r := self._sessions[key]).dirty]
            if not dirty:
                return
            try:
                states = self.runner.read_states([r.slot for r in dirty])
                self.store.save_snapshots([self._snapshot_of(r, True, st) for r, st in zip(dirty, states)])
            except Exception as e:
                log.error("final snapshot of %d sessions failed (attempt %d of %d): %s",
                          len(dirty), attempt, FINAL_SNAPSHOT_ATTEMPTS, e)
                if attempt < FINAL_SNAPSHOT_ATTEMPTS and not self.hurried:
                    time.sleep(FINAL_SNAPSHOT_RETRY_SECONDS)
                    continue
                if self.durability.mode == "snapshot":
                    log.error("%d sessions could not be stored at shutdown: their changes since the last "
                              "snapshot are lost", len(dirty))
                    self._unsaved_at_stop = len(dirty)
                else:  # nothing acknowledged is lost
                    log.error("%d sessions could not be stored at shutdown: their journal still holds every "
                              "acknowledged step", len(dirty))
                return
            for r in dirty:
                r.dirty = False
            return

    def _drain_inbox(self) -> list[str]:
        """Move submitted work to the scheduler; the session keys of the work items moved."""
        deliveries: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        added: list[str] = []
        inbox, scheduler, per_session = self._inbox, self.scheduler, self._inbox_session_tokens
        while inbox:
            with self._admission:  # from the inbox's counts to the scheduler's, atomically
                while inbox and isinstance(inbox[0], WorkItem):  # (only this thread pops)
                    item = inbox.popleft()
                    n, key = item.pending_tokens, item.session_key
                    if n:  # (a session operation was never admitted: no tokens)
                        self._inbox_tokens -= n
                        if (left := per_session[key] - n) > 0:
                            per_session[key] = left
                        else:
                            del per_session[key]
                    scheduler.add(item)
                    added.append(item.session_key)
            if inbox:  # a control job, run outside the lock
                self._run_control(inbox.popleft(), deliveries)
        self._deliver(deliveries)
        return added

    def _regroup(self) -> None:
        """Hold the next step briefly for the sessions the last step answered.

        A client in a loop sends its next request as soon as it has its answer. Stepping at
        once would run only the sessions that arrived during the last step, and those
        answered meanwhile a step later: the batch splits into cohorts that alternate, each
        step runs a fraction of the sessions, and the other cohort's RPC work competes with
        the model for the CPU while it runs (on 2 cores that slowed 64x16-token steps by
        half). Waiting for the answered sessions keeps them in one batch, and where the RPC
        work and the model share the cores it lets them take turns instead of contending.

        The first part of a hold ends when they are all back or the batch is full, and lasts
        at most half the last step (so idle time stays a small share of the work) or
        REGROUP_SECONDS_PER_ANSWER per session waited for, whichever is longer. While clients
        are seen to come back it lasts at least REGROUP_MIN_HOLD_SECONDS even after a short
        step: half of a ~17 ms step (64 sessions, one token each) is less than the ~25 ms the
        RPC layer on 2 cores needs to answer them all and read their next requests (A/B, 3
        pairs: p99 59-68 -> 44-50 ms, tokens/s +7-16 %).

        Past the first part the hold goes on while the traffic is a pure loop (hardly anyone
        but the sessions waited for is queued) and they keep coming back, each within
        REGROUP_QUIET_SECONDS of the last. At 256 token-by-token sessions the RPC layer needs
        ~50 ms to answer ~250 sessions and read their next requests and the step ~30 ms:
        half a step let ~40 % of them back, the rest waited a whole step more, and the two
        cohorts' steps each ran beside the other's RPC work, so a step of ~150 took as long
        as one of all ~250 now does (A/B in docs/performance.md: +5-11 % tokens/s, p99 -15 ms).
        With open-loop traffic near capacity the answered sessions come back too (their next
        requests are already waiting at the client); there longer holds only added latency,
        hence the pure-loop condition. max_batch_wait_ms caps it all.

        Clients that do not answer back at once (independent arrivals) only pay for a hold:
        it measured p99 128 -> 174 ms at 256 sessions in open loop. So holds continue only
        while a moving average of the share of waited-for sessions back within the first part
        stays at REGROUP_MIN_RETURN_RATE or more (measured: 0.7-1.0 for 256 sessions in a
        closed loop, ~0.005 in that open loop); otherwise one step in REGROUP_PROBE_EVERY holds, to
        notice when the traffic turns into loops again. Only the first part is judged:
        within a long hold, independent clients come back too.
        """
        answered, self._answered = self._answered, []
        cap = self.limits.max_batch_wait_ms / 1000.0
        if not answered or cap <= 0:
            return
        self._steps_since_hold += 1
        looping = self._return_rate >= REGROUP_MIN_RETURN_RATE
        if not looping and self._steps_since_hold < REGROUP_PROBE_EVERY:
            return
        scheduler = self.scheduler
        missing = {key for key in answered if not scheduler.pending(key)}
        if not missing:
            return
        waited_for = len(missing)
        budget = max(REGROUP_SHARE_OF_STEP * self._last_step_seconds, REGROUP_SECONDS_PER_ANSWER * waited_for)
        if looping:
            budget = max(budget, REGROUP_MIN_HOLD_SECONDS)
        # The return rate is judged at `deadline`; past it a hold goes on only while clients
        # loop and keep coming back (each return moves `quiet_until`), up to the cap.
        deadline = self._last_step_end + min(budget, cap)
        extended = self._last_step_end + cap if looping else deadline
        quiet_until = -math.inf
        returned: float | None = None
        held_from = time.monotonic()
        self._steps_since_hold = 0
        batch_full = False
        while missing and not self._stopping:
            if (
                scheduler.queued_sessions >= self.limits.max_batch_sessions
                or scheduler.queued_tokens >= self.limits.max_batch_tokens
            ):
                batch_full = True
                break
            now = time.monotonic()
            if now >= deadline and returned is None:
                back = waited_for - len(missing)
                returned = back / waited_for
                if scheduler.queued_sessions - back > REGROUP_OTHERS_SHARE * waited_for:
                    extended = deadline  # not a pure loop: others wait too (open-loop traffic)
            remaining = (deadline if now < deadline else min(extended, quiet_until)) - now
            if remaining <= 0:
                break
            self._wake.wait(timeout=remaining)
            self._wake.clear()
            still_missing = len(missing)
            missing.difference_update(self._drain_inbox())
            if len(missing) < still_missing:
                quiet_until = time.monotonic() + REGROUP_QUIET_SECONDS
        if not batch_full:  # a hold cut short by a full batch says nothing about the clients
            if returned is None:  # all back (or stopping) before the deadline
                returned = (waited_for - len(missing)) / waited_for
            self._return_rate += REGROUP_RATE_WEIGHT * (returned - self._return_rate)
        if self.metrics is not None:
            self.metrics.batch_hold_seconds.observe(time.monotonic() - held_from)

    def _run_control(self, job: _ControlJob, deliveries: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> None:
        try:
            result = job.apply()
        except EngineError as e:
            deliveries.append((_set_exception, (job.future, e)))
        except Exception as e:  # a bug in one control must not stop the engine
            log.exception("session operation failed")
            deliveries.append((_set_exception, (job.future, EngineError(f"internal error: {type(e).__name__}"))))
        else:
            deliveries.append((_set_result, (job.future, result)))

    def _expire(self, now: float) -> None:
        expired = 0
        while self._expiry and self._expiry[0][0] <= now:
            _, sid = heapq.heappop(self._expiry)
            record = self._sessions.get(sid)
            if record is None:
                continue
            deadline = record.last_used + record.ttl
            if deadline > now or self.scheduler.pending(sid):
                heapq.heappush(self._expiry, (max(deadline, now + 1.0), sid))
                continue
            try:
                self._remove(record)
            except UnavailableError:
                log.exception("expiring session %s failed; retried in a minute", short_id(record.session_id))
                heapq.heappush(self._expiry, (now + 60.0, sid))
                continue
            expired += 1
        if expired and self.metrics is not None:
            self.metrics.sessions_expired_total.inc(expired)

    def _fail_plan(self, plan: StepPlan, error: BaseException) -> None:
        deliveries: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        for row in plan.rows:
            self._fail_item(row.item, error, deliveries)
        self.scheduler.complete(plan)
        self._deliver(deliveries)

    def _fail_item(
        self, item: WorkItem, error: BaseException, deliveries: list[tuple[Callable[..., Any], tuple[Any, ...]]]
    ) -> None:
        self.scheduler.close(item)
        job = item.payload
        if isinstance(job, _StepJob):
            if job.group is not None:
                job.group.failed = True
            deliveries.append((_set_exception, (job.future, error)))
        elif isinstance(job, _GenerateJob):
            deliveries.append((job.queue.put_nowait, (error,)))

    def _admit_row(
        self,
        row: ScheduledRow,
        now: float,
        deliveries: list[tuple[Callable[..., Any], tuple[Any, ...]]],
        waits: list[float],
    ) -> _Session | None:
        """The session of a scheduled row, after first-run checks; None if the row must not run.
        A request's first run appends its time in the queue to `waits`."""
        item = row.item
        job = item.payload
        try:
            record = self._sessions.get(item.session_key)
            if record is None or record is not job.session:  # (deleted, perhaps created anew with its id)
                raise NotFoundError(f"session {short_id(public_id(item.session_key))} was deleted or expired")
            self._make_resident(record)
            self._pinned.add(record.slot)
            if record.needs_snapshot:
                assert self.store is not None
                try:
                    self.store.save_snapshots([self._snapshot_of(record, with_state=True)])
                except Exception as e:
                    raise _store_unavailable("record this session's state", e) from None
                record.needs_snapshot = record.dirty = False
            if not job.checked:  # first time this request runs
                if isinstance(job, _StepJob) and job.group is not None and job.group.failed:
                    self.scheduler.close(item)  # an earlier request of its stream failed: the stream is ending
                    deliveries.append((_cancel, (job.future,)))
                    return None
                job.checked = True
                waits.append(now - item.enqueued_at)
                expected = job.expected_position
                if isinstance(job, _StepJob):
                    last = record.last_step
                    if (
                        expected is not None
                        and last is not None
                        and expected == last[0]
                        and tuple(item.tokens) == last[1]
                        and record.position == last[0] + len(last[1])
                    ):
                        deliveries.append((_set_result, (job.future, last[2])))  # replay of a lost response
                        self.scheduler.close(item)
                        return None
                    job.start_position = record.position
                if expected is not None and expected != record.position:
                    raise PositionConflictError(record.session_id, expected, record.position)
        except EngineError as e:
            self._fail_item(item, e, deliveries)
            return None
        return record

    def _execute(self, plan: StepPlan) -> None:
        started = time.monotonic()
        deliveries: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        for control in plan.controls:
            self._run_control(control.payload, deliveries)

        rows: list[RowInput] = []
        running: list[tuple[ScheduledRow, _Session]] = []
        waits: list[float] = []
        for row in plan.rows:
            if row.item.closed:
                continue
            record = self._admit_row(row, started, deliveries, waits)
            if record is None:
                continue
            item, job = row.item, row.item.payload
            if row.sample:
                rows.append(
                    RowInput(
                        slot=record.slot,
                        tokens=[],
                        position=record.position,
                        sampling=SamplingParams(
                            job.params.temperature, job.params.top_k, job.params.top_p, job.seed_bits
                        ),
                    )
                )
            else:
                chunk = item.tokens[item.done : item.done + row.num_tokens]
                if isinstance(job, _StepJob):
                    opts = job.options
                    rows.append(
                        RowInput(record.slot, chunk, record.position, opts.top_k, opts.want_logprobs, opts.want_hidden)
                    )
                else:  # a Generate's prompt: no outputs
                    rows.append(RowInput(record.slot, chunk, record.position))
            running.append((row, record))
        if waits and self.metrics is not None:
            self.metrics.queue_wait_seconds.observe_many(waits)

        self._pinned.clear()
        outputs = self.runner.execute(rows) if rows else []
        finished_at = time.monotonic()
        answers_from = len(deliveries)  # this step's answers: withheld if the journal cannot record them
        journal: list[JournalEntry] = []
        input_tokens = generated = 0
        journaling = self.store is not None and self.durability.mode == "journal"
        for (row, record), out in zip(running, outputs):
            item, job = row.item, row.item.payload
            record.last_used = finished_at
            record.dirty = True  # (its place in the LRU order was renewed by _make_resident)
            if journaling:
                applied = [out.sampled_token] if row.sample else item.tokens[item.done : item.done + row.num_tokens]
                journal.append(JournalEntry(record.key, record.position, applied))
            if row.sample:
                record.position += 1
                if record.last_step is not None:
                    self._set_last_step(record, None)
                generated += 1
                self._emit_token(item, job, record, out, finished_at, deliveries)
                continue
            record.position += row.num_tokens
            input_tokens += row.num_tokens
            if isinstance(job, _StepJob):
                job.parts.append(out)
                if item.done + row.num_tokens == len(item.tokens):
                    result = _join_step(record.session_id, record.position, item.tokens, job.parts)
                    job.parts = []  # (joined: an unread answer must not hold its parts as well)
                    entry = (job.start_position, tuple(item.tokens), result)
                    if (  # the common small result, not yet counted: no bookkeeping (once per row per step)
                        len(item.tokens) <= REPLAY_UNTRACKED_TOKENS and result.logprobs is None
                        and result.hidden is None and record.key not in self._replay_sizes
                    ):
                        record.last_step = entry
                    else:
                        self._set_last_step(record, entry)
                    deliveries.append((_set_result, (job.future, result)))
            elif record.last_step is not None:
                self._set_last_step(record, None)

        if journal:
            assert self.store is not None
            try:
                self.store.append_journal(journal)  # durable before any response of this step leaves
            except Exception as e:
                # Applied but not recorded: answer none of it (a retry of a step is replayed once
                # its session's state is stored whole, which happens before it runs again).
                log.exception("journal write failed; %d sessions are stored whole before they run again", len(running))
                del deliveries[answers_from:]
                error = _store_unavailable("record this step", e)
                for row, record in running:
                    record.needs_snapshot = record.dirty = True
                    self._fail_item(row.item, error, deliveries)
        finished = self.scheduler.complete(plan)
        # Counted before the answers leave, so a client that has its answer sees the step counted.
        self._answered = [item.session_key for item in finished if item.kind is not WorkKind.CONTROL]
        self.steps_run += 1
        m = self.metrics
        if m is not None and rows:
            m.step_duration_seconds.observe(finished_at - started)
            m.batch_sessions.observe(len(rows))
            m.batch_tokens.observe(sum(max(len(r.tokens), 1) for r in rows))
            m.queue_depth.set(self.scheduler.queued_items)
            if input_tokens:
                m.tokens_total.labels(kind="input").inc(input_tokens)
            if generated:
                m.tokens_total.labels(kind="generated").inc(generated)
        self._last_step_end = time.monotonic()
        self._last_step_seconds = self._last_step_end - started
        self._deliver(deliveries)

    def _emit_token(
        self,
        item: WorkItem,
        job: _GenerateJob,
        record: _Session,
        out: RowOutput,
        now: float,
        deliveries: list[tuple[Callable[..., Any], tuple[Any, ...]]],
    ) -> None:
        text = self.tokenizer.vocab[out.sampled_token]
        job.text += text
        finish: str | None = None
        if any(job.text.endswith(s) for s in job.params.stop):
            finish = "stop"
        elif item.generate_tokens == 1:
            finish = "length"
        m = self.metrics
        if m is not None:
            if job.first_token_at is None:
                m.time_to_first_token_seconds.observe(now - item.enqueued_at)
            elif job.last_token_at is not None:
                m.inter_token_latency_seconds.observe(now - job.last_token_at)
        if job.first_token_at is None:
            job.first_token_at = now
        job.last_token_at = now
        token = GeneratedToken(out.sampled_token, text, out.sampled_logprob, record.position, finish)
        deliveries.append((job.queue.put_nowait, (token,)))
        if finish is not None:
            deliveries.append((job.queue.put_nowait, (None,)))
            if finish == "stop":
                self.scheduler.close(item)

    def _deliver(self, deliveries: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> None:
        if deliveries and self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(_run_deliveries, deliveries)
            except RuntimeError:  # the loop closed while we were running
                pass


def _store_unavailable(what: str, error: BaseException) -> UnavailableError:
    return UnavailableError(f"the state store failed to {what} ({type(error).__name__}: {error}); retry later")


def _touch_failed(done: Future[None]) -> None:
    error = done.exception()
    if error is not None:  # only expiry times; the sessions are written whole at their next snapshot
        log.error("storing the expiry of read sessions failed: %s", error)


def _snapshot_failed(done: Future[None], sessions: list[_Session]) -> None:
    """A background snapshot write failed: log it and mark its sessions for the next one."""
    error = done.exception()
    if error is None:
        return
    log.error("snapshot of %d sessions failed: %s", len(sessions), error, exc_info=error)
    for record in sessions:
        record.dirty = True  # a plain flag: the next interval retries (a deleted session is skipped)


def _run_deliveries(deliveries: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> None:
    for fn, args in deliveries:
        fn(*args)


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _cancel(future: asyncio.Future[Any]) -> None:
    future.cancel()


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _join_step(session_id: str, position: int, tokens: list[int], parts: list[RowOutput]) -> StepResult:
    if len(parts) == 1:  # the common case (an input of at most max_chunk_tokens), once per session per step
        p = parts[0]
        return StepResult(session_id, position, tokens, p.top_tokens, p.top_logprobs, p.logprobs, p.hidden)

    def cat(name: str) -> np.ndarray | None:
        arrays = [getattr(p, name) for p in parts]
        if any(a is None for a in arrays):
            return None
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    return StepResult(
        session_id=session_id,
        position=position,
        tokens=tokens,
        top_tokens=cat("top_tokens"),
        top_logprobs=cat("top_logprobs"),
        logprobs=cat("logprobs"),
        hidden=cat("hidden"),
    )
