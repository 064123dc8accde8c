"""The scheduler alone: budgets, fairness, ordering, cancellation (no torch, no grpc)."""

from __future__ import annotations

import pytest

from service.scheduler import Scheduler, WorkItem, WorkKind


def step(session: str, n: int) -> WorkItem:
    return WorkItem(session, WorkKind.STEP, tokens=list(range(n)))


def run_all(s: Scheduler, max_steps: int = 1000) -> list[list[tuple[str, int]]]:
    """Schedule and complete until empty; return per step the (session, tokens) rows."""
    history = []
    for _ in range(max_steps):
        plan = s.schedule()
        if not plan:
            break
        history.append([(r.item.session_key, r.num_tokens) for r in plan.rows])
        s.complete(plan)
    return history


def test_budgets_sessions_and_tokens_per_step() -> None:
    s = Scheduler(max_batch_sessions=3, max_batch_tokens=10, max_chunk_tokens=100)
    for i in range(5):
        s.add(step(f"s{i}", 4))
    plan = s.schedule()
    # 3 sessions at most; tokens 4 + 4 + 2 = 10 (the third is cut to the budget).
    assert [(r.item.session_key, r.num_tokens) for r in plan.rows] == [("s0", 4), ("s1", 4), ("s2", 2)]
    assert plan.num_tokens == 10


def test_a_session_never_runs_twice_in_one_step_and_requests_keep_order() -> None:
    s = Scheduler(max_batch_sessions=8, max_batch_tokens=100, max_chunk_tokens=100)
    first, second = step("a", 2), step("a", 3)
    s.add(first)
    s.add(second)
    s.add(step("b", 1))
    plan = s.schedule()
    keys = [r.item.session_key for r in plan.rows]
    assert keys.count("a") == 1 and plan.rows[0].item is first
    finished = s.complete(plan)
    assert first in finished and second not in finished
    plan = s.schedule()
    assert [r.item for r in plan.rows] == [second]


def test_long_chunks_are_split_and_do_not_starve_others() -> None:
    s = Scheduler(max_batch_sessions=2, max_batch_tokens=1000, max_chunk_tokens=16)
    s.add(step("long", 100))
    for i in range(4):
        s.add(step(f"short{i}", 1))
    history = run_all(s)
    # Every short request ran within the first three steps despite the long one ahead of them.
    served_by_step = {k: i for i, rows in enumerate(history) for k, _ in rows}
    assert all(served_by_step[f"short{i}"] <= 2 for i in range(4))
    long_chunks = [n for rows in history for k, n in rows if k == "long"]
    assert sum(long_chunks) == 100 and max(long_chunks) == 16


def test_round_robin_fairness_between_sessions() -> None:
    s = Scheduler(max_batch_sessions=2, max_batch_tokens=1000, max_chunk_tokens=1)
    for key in "abcd":
        s.add(step(key, 3))
    history = run_all(s)
    # With two slots per step, four equally long sessions alternate pairwise.
    assert history[:4] == [[("a", 1), ("b", 1)], [("c", 1), ("d", 1)], [("a", 1), ("b", 1)], [("c", 1), ("d", 1)]]
    assert len(history) == 6


def test_fifo_first_service_for_new_sessions() -> None:
    s = Scheduler(max_batch_sessions=1, max_batch_tokens=1000, max_chunk_tokens=1000)
    for key in ["x", "y", "z"]:
        s.add(step(key, 1))
    assert [rows[0][0] for rows in run_all(s)] == ["x", "y", "z"]


def test_cancellation_removes_queued_work_that_has_not_run() -> None:
    s = Scheduler(max_batch_sessions=8, max_batch_tokens=100, max_chunk_tokens=100)
    keep, drop_later, drop_head = step("a", 2), step("a", 5), step("b", 7)
    for item in (keep, drop_later, drop_head):
        s.add(item)
    assert s.queued_tokens == 14
    s.close(drop_later)
    s.close(drop_head)
    history = run_all(s)
    assert history == [[("a", 2)]]
    assert s.queued_tokens == 0 and len(s) == 0


def test_cancel_in_the_middle_of_a_split_request() -> None:
    s = Scheduler(max_batch_sessions=8, max_batch_tokens=100, max_chunk_tokens=4)
    item = step("a", 12)
    s.add(item)
    s.complete(s.schedule())
    assert item.done == 4 and s.queued_tokens == 8
    s.close(item)
    plan = s.schedule()
    assert not plan.rows
    assert s.queued_tokens == 0 and len(s) == 0


def test_a_cancelled_request_runs_wholly_or_not_at_all() -> None:
    """cancel (the caller gave up) drops an item that has not started, but a started one runs
    the rest of its input: a step is never left half applied."""
    s = Scheduler(max_batch_sessions=8, max_batch_tokens=100, max_chunk_tokens=4)
    started, waiting = step("a", 12), step("a", 3)
    s.add(started)
    s.add(waiting)
    s.complete(s.schedule())
    assert started.done == 4
    s.cancel(started)
    s.cancel(waiting)
    assert run_all(s) == [[("a", 4)], [("a", 4)]]
    assert started.done == 12 and waiting.done == 0
    assert s.queued_tokens == 0 and len(s) == 0


def test_a_cancelled_generate_finishes_its_prompt_but_samples_nothing() -> None:
    s = Scheduler(max_batch_sessions=8, max_batch_tokens=100, max_chunk_tokens=2)
    item = WorkItem("g", WorkKind.GENERATE, tokens=[1, 2, 3, 4], generate_tokens=5)
    s.add(item)
    s.complete(s.schedule())
    s.cancel(item)
    history = []
    while plan := s.schedule():
        history.append([(r.num_tokens, r.sample) for r in plan.rows])
        s.complete(plan)
    assert history == [[(2, False)]]
    assert item.done == 4 and s.queued_tokens == 0 and len(s) == 0


def test_a_cancelled_control_is_dropped_until_its_turn_comes() -> None:
    s = Scheduler(max_batch_sessions=8, max_batch_tokens=100, max_chunk_tokens=100)
    first, control = step("a", 2), WorkItem("a", WorkKind.CONTROL)
    s.add(first)
    s.add(control)
    s.complete(s.schedule())  # runs `first`; the control's turn is next
    s.cancel(control)
    assert not s.schedule() and len(s) == 0


def test_generate_items_feed_the_prompt_then_sample_one_token_per_step() -> None:
    s = Scheduler(max_batch_sessions=8, max_batch_tokens=100, max_chunk_tokens=3)
    item = WorkItem("g", WorkKind.GENERATE, tokens=[1, 2, 3, 4], generate_tokens=2)
    s.add(item)
    kinds = []
    for _ in range(10):
        plan = s.schedule()
        if not plan:
            break
        kinds.extend((r.num_tokens, r.sample) for r in plan.rows)
        s.complete(plan)
    assert kinds == [(3, False), (1, False), (0, True), (0, True)]
    assert item.finished


def test_controls_wait_for_the_sessions_earlier_work() -> None:
    s = Scheduler(max_batch_sessions=8, max_batch_tokens=100, max_chunk_tokens=2)
    s.add(step("a", 4))
    control = WorkItem("a", WorkKind.CONTROL)
    s.add(control)
    other = WorkItem("b", WorkKind.CONTROL)
    s.add(other)
    plan = s.schedule()
    assert plan.controls == [other]  # b's control has nothing ahead of it
    s.complete(plan)
    plan = s.schedule()
    assert plan.controls == [] and plan.rows[0].num_tokens == 2
    s.complete(plan)
    plan = s.schedule()
    assert plan.controls == [control] and plan.rows == []


def test_budgets_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Scheduler(0, 10, 10)


def test_tokens_queued_per_session_follow_every_way_out_of_the_queue() -> None:
    s = Scheduler(max_batch_sessions=8, max_batch_tokens=100, max_chunk_tokens=4)
    long, short, gen = step("a", 10), step("a", 3), WorkItem("b", WorkKind.GENERATE, tokens=[1, 2], generate_tokens=3)
    closed = step("c", 5)
    for item in (long, short, gen, closed):
        s.add(item)
    assert (s.session_tokens("a"), s.session_tokens("b"), s.session_tokens("c")) == (13, 5, 5)
    s.close(closed)  # dropped when its turn comes, with its 5 tokens
    s.complete(s.schedule())  # a: 4 of the long step; b: its 2-token prompt
    assert (s.session_tokens("a"), s.session_tokens("b"), s.session_tokens("c")) == (9, 3, 0)
    s.cancel(short)  # not started: leaves the queue once the long step is through
    run_all(s)
    assert (s.session_tokens("a"), s.session_tokens("b")) == (0, 0) and s.queued_tokens == 0
    assert s._session_tokens == {}  # no key left behind by a session whose queue emptied
