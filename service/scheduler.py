"""The scheduler: decides what runs in each engine step. Pure Python: no grpc, no torch.

Every session has a FIFO queue of work items (requests apply in arrival order). Each
step takes at most one item per session (the head of its queue), so a session never
runs twice in one step, under two budgets: sessions per step and tokens per step.
Long inputs are cut into chunks of at most `max_chunk_tokens`, and a session that was
served moves to the back of the round-robin order, so no session starves another.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any


class WorkKind(enum.Enum):
    STEP = "step"  # feed input tokens, return outputs for each
    GENERATE = "generate"  # feed an optional prompt, then sample tokens one per step
    CONTROL = "control"  # a session operation (fork, reset, delete) ordered with the steps


@dataclass(eq=False)
class WorkItem:
    session_key: str  # the session this work belongs to
    kind: WorkKind
    tokens: list[int] = field(default_factory=list)  # input (STEP) or prompt (GENERATE) tokens
    generate_tokens: int = 0  # GENERATE: tokens still to sample
    payload: Any = None  # opaque to the scheduler: the engine's request and result sink
    enqueued_at: float = 0.0  # monotonic time of arrival, for queue-wait metrics
    done: int = 0  # input tokens already run
    started: bool = False  # has been scheduled at least once (set on the engine thread only)
    closed: bool = False  # failed or finished early: drop without running more of it
    cancelled: bool = False  # its caller gave up: see Scheduler.cancel

    @property
    def remaining_input(self) -> int:
        return len(self.tokens) - self.done

    @property
    def pending_tokens(self) -> int:
        """Tokens this item will still put through the model."""
        # (from the fields, not through remaining_input: the scheduler asks for every row of every step)
        return len(self.tokens) - self.done + self.generate_tokens

    @property
    def finished(self) -> bool:
        return self.closed or (self.kind is not WorkKind.CONTROL and self.pending_tokens == 0)


@dataclass
class ScheduledRow:
    item: WorkItem  # whose work this row does
    num_tokens: int  # input tokens fed this step (0 for a sampling row)
    sample: bool  # sample one token from the current state and feed it (GENERATE)


@dataclass
class StepPlan:
    rows: list[ScheduledRow]  # at most one per session, packed into one model call
    controls: list[WorkItem]  # session operations whose turn has come

    @property
    def num_tokens(self) -> int:
        return sum(max(r.num_tokens, 1 if r.sample else 0) for r in self.rows)

    def __bool__(self) -> bool:
        return bool(self.rows or self.controls)


class Scheduler:
    def __init__(self, max_batch_sessions: int, max_batch_tokens: int, max_chunk_tokens: int) -> None:
        if min(max_batch_sessions, max_batch_tokens, max_chunk_tokens) < 1:
            raise ValueError("scheduler budgets must be >= 1")
        self.max_batch_sessions = max_batch_sessions
        self.max_batch_tokens = max_batch_tokens
        self.max_chunk_tokens = max_chunk_tokens
        self._queues: dict[str, deque[WorkItem]] = {}
        # Sessions with queued work, in round-robin order (served ones move to the back).
        self._order: OrderedDict[str, None] = OrderedDict()
        self.queued_tokens = 0  # tokens of all queued items not yet run
        self.queued_items = 0
        self._session_tokens: dict[str, int] = {}  # queued_tokens per session with queued work

    def add(self, item: WorkItem) -> None:
        queue = self._queues.get(item.session_key)
        if queue is None:
            queue = self._queues[item.session_key] = deque()
            self._order[item.session_key] = None
        queue.append(item)
        self.queued_tokens += item.pending_tokens
        self.queued_items += 1
        self._session_tokens[item.session_key] = self._session_tokens.get(item.session_key, 0) + item.pending_tokens

    def session_tokens(self, session_key: str) -> int:
        """Tokens of a session's queued items not yet run. Safe to read from any thread (one dict read)."""
        return self._session_tokens.get(session_key, 0)

    def pending(self, session_key: str) -> int:
        """Items queued for a session (including one in progress)."""
        queue = self._queues.get(session_key)
        return len(queue) if queue else 0

    def __len__(self) -> int:
        return self.queued_items

    @property
    def queued_sessions(self) -> int:
        """Sessions with queued work."""
        return len(self._order)

    def _pop_head(self, key: str) -> None:
        queue = self._queues[key]
        item = queue.popleft()
        self.queued_tokens -= item.pending_tokens
        self.queued_items -= 1
        if not queue:
            del self._queues[key]
            self._order.pop(key, None)
            del self._session_tokens[key]
        else:
            self._session_tokens[key] -= item.pending_tokens

    def schedule(self) -> StepPlan:
        rows: list[ScheduledRow] = []
        controls: list[WorkItem] = []
        tokens_left = self.max_batch_tokens
        for key in list(self._order):
            queue = self._queues[key]
            while queue and (queue[0].closed or (queue[0].cancelled and _cancelled_out(queue[0]))):
                self._pop_head(key)
            if not queue:
                continue
            item = queue[0]
            if item.kind is WorkKind.CONTROL:
                controls.append(item)
                item.started = True
                continue
            if len(rows) >= self.max_batch_sessions or tokens_left <= 0:
                continue
            remaining = item.remaining_input
            if remaining > 0:
                n = min(remaining, self.max_chunk_tokens, tokens_left)
                rows.append(ScheduledRow(item, n, False))
                tokens_left -= n
            else:
                rows.append(ScheduledRow(item, 0, True))
                tokens_left -= 1
            item.started = True
        return StepPlan(rows, controls)

    def complete(self, plan: StepPlan) -> list[WorkItem]:
        """Account for a step that ran; return the items that are now finished (and dequeued)."""
        finished: list[WorkItem] = []
        for row in plan.rows:
            item = row.item
            consumed = row.num_tokens + (1 if row.sample else 0)
            if not item.closed:
                item.done += row.num_tokens
                if row.sample:
                    item.generate_tokens -= 1
                self.queued_tokens -= consumed
                self._session_tokens[item.session_key] -= consumed
            key = item.session_key
            if item.finished:
                finished.append(item)
                self._pop_head(key)
            if key in self._order:
                self._order.move_to_end(key)
        for item in plan.controls:
            finished.append(item)
            self._pop_head(item.session_key)
        return finished

    def close(self, item: WorkItem) -> None:
        """Mark an item to be dropped (failed, stopped early). Safe from any thread: it only sets
        a flag; the item leaves the queue when it next comes up."""
        item.closed = True

    def cancel(self, item: WorkItem) -> None:
        """Its caller gave up (cancelled, deadline passed, stream ended). Safe from any thread.

        An item that has not started is dropped. One that has started still runs the rest of
        its input, so a request's input is applied wholly or not at all (a retry of the step
        then gets its response replayed); a Generate stops sampling once its prompt is in.
        Decided on the engine thread, which alone sets `started`, so there is no race."""
        item.cancelled = True

    def queued(self) -> list[WorkItem]:
        """Every queued item, session by session."""
        return [item for queue in list(self._queues.values()) for item in queue]

    def cancel_all(self) -> None:
        """Cancel everything queued (the engine is stopping); see `cancel`."""
        for item in self.queued():
            item.cancelled = True


def _cancelled_out(item: WorkItem) -> bool:
    """A cancelled item leaves the queue: it has not started, or its input has all run."""
    return not item.started or item.remaining_input == 0
