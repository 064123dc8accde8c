"""Sessions survive restarts and crashes; outputs continue exactly as an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from lstmserve_client.proto import lstm_service_pb2 as pb
from lstmserve_client.proto import lstm_service_pb2_grpc as pb_grpc

from model.checkpoint import load_checkpoint
from service.state_store import SqliteStateStore, StateStoreLockedError
from tests.conftest import corpus_text, logprobs_of, make_checkpoint, offline_logprobs, run_server

TOL = 1e-5


def session_texts(n: int, length: int, seed: int) -> list[str]:
    corpus, rng = corpus_text(), random.Random(seed)
    starts = [rng.randrange(0, len(corpus) - length) for _ in range(n)]
    return [corpus[s : s + length] for s in starts]


class ServerProcess:
    """lstm-serve as a child process on port 0 with a given state directory."""

    def __init__(self, checkpoint: Path, state_dir: Path, tmp: Path, *extra: str) -> None:
        port_file = tmp / f"port-{time.monotonic_ns()}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.server", "--checkpoint", str(checkpoint), "--port", "0",
             "--port-file", str(port_file), "--metrics-port", "-1", "--state-dir", str(state_dir), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"server did not start: {self.proc.stdout.read() if self.proc.stdout else ''}")
            time.sleep(0.05)
        self.target = f"127.0.0.1:{int(port_file.read_text())}"

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def offline(tiny_checkpoint: Path):
    return load_checkpoint(tiny_checkpoint)


def test_graceful_restart_continues_exactly(tiny_checkpoint: Path, offline, tmp_path: Path) -> None:
    tok = offline.tokenizer
    texts = [tok.encode(t) for t in session_texts(6, 240, seed=11)]
    state = tmp_path / "state"
    server = ServerProcess(tiny_checkpoint, state, tmp_path, "--durability", "snapshot",
                           "--snapshot-interval-seconds", "3600")  # only the shutdown snapshot counts
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            ids = [stub.CreateSession(pb.CreateSessionRequest()).session.session_id for _ in texts]
            rng = random.Random(0)
            cut = [rng.randint(20, 200) for _ in texts]
            for sid, tokens, c in zip(ids, texts, cut):
                stub.Step(pb.StepRequest(session_id=sid, tokens=tokens[:c]))
        assert server.stop(signal.SIGTERM) == 0
    finally:
        server.kill()

    server = ServerProcess(tiny_checkpoint, state, tmp_path)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            for sid, tokens, c in zip(ids, texts, cut):
                assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).session.position == c
                r = stub.Step(pb.StepRequest(session_id=sid, tokens=tokens[c:], expected_position=c,
                                             return_logprobs=True))
                assert r.position == len(tokens)
                assert np.abs(logprobs_of([r]) - offline_logprobs(offline, tokens)[c:]).max() <= TOL
    finally:
        server.stop(signal.SIGTERM)
        server.kill()


def feed_until_killed(target: str, ids: list[str], texts: list[list[int]], acked: dict[str, int],
                      log: list[tuple[float, str, int]], stop: threading.Event) -> None:
    """Feed every session over one bidi stream each, chunk by chunk, recording acknowledgements."""

    def run(sid: str, tokens: list[int], seed: int) -> None:
        rng = random.Random(seed)
        chunks, i = [], 0
        while i < len(tokens):
            n = rng.randint(1, 12)
            chunks.append((i, tokens[i : i + n]))
            i += n
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)

            def requests():
                for start, chunk in chunks:
                    if stop.is_set():
                        return
                    yield pb.StepRequest(session_id=sid, tokens=chunk, expected_position=start, top_k=0)
                    time.sleep(0.002)

            try:
                for response in stub.StreamSteps(requests()):
                    acked[sid] = response.position
                    log.append((time.monotonic(), sid, response.position))
            except grpc.RpcError:
                pass  # the server was killed under us

    threads = [
        threading.Thread(target=run, args=(sid, t, i), daemon=True) for i, (sid, t) in enumerate(zip(ids, texts))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)


def chunk_boundaries(tokens: list[int], seed: int) -> set[int]:
    rng, i, out = random.Random(seed), 0, {0}
    while i < len(tokens):
        i += rng.randint(1, 12)
        out.add(min(i, len(tokens)))
    return out


@pytest.mark.parametrize("mode", ["journal", "snapshot"])
def test_crash_kill9_resumes_after_last_acknowledged_token(tiny_checkpoint: Path, offline, tmp_path: Path,
                                                            mode: str) -> None:
    tok = offline.tokenizer
    # Long enough that no session finishes before the kill (~1.5 s after the slowest reached 300).
    texts = [tok.encode(t) for t in session_texts(8, 12000, seed=21)]
    state = tmp_path / "state"
    interval = 1.0
    server = ServerProcess(tiny_checkpoint, state, tmp_path, "--durability", mode,
                           "--snapshot-interval-seconds", str(interval))
    acked: dict[str, int] = {}
    log: list[tuple[float, str, int]] = []
    stop = threading.Event()
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            ids = [stub.CreateSession(pb.CreateSessionRequest()).session.session_id for _ in texts]
        feeder = threading.Thread(target=feed_until_killed, args=(server.target, ids, texts, acked, log, stop))
        feeder.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (len(acked) < len(ids) or min(acked.values()) < 300):
            time.sleep(0.05)
        time.sleep(interval * 1.5)  # let snapshots happen while the streams run
        killed_at = time.monotonic()
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        stop.set()
        feeder.join(timeout=60)
    finally:
        server.kill()
    assert all(0 < acked[sid] < len(t) for sid, t in zip(ids, texts)), "the crash must hit mid-stream"

    server = ServerProcess(tiny_checkpoint, state, tmp_path, "--durability", mode)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            for i, (sid, tokens) in enumerate(zip(ids, texts)):
                position = stub.GetSession(pb.GetSessionRequest(session_id=sid)).session.position
                if mode == "journal":
                    # No acknowledged token is lost: at most steps whose answer was cut off are extra.
                    assert position >= acked[sid]
                else:
                    # Snapshot mode loses at most one interval (+ the time a snapshot takes).
                    bound = max([p for t, s, p in log if s == sid and t <= killed_at - interval - 0.5], default=0)
                    assert position >= bound
                assert position in chunk_boundaries(tokens, i)  # whole steps only
                rest = tokens[position : position + 200]
                r = stub.Step(pb.StepRequest(session_id=sid, tokens=rest, expected_position=position,
                                             return_logprobs=True))
                want = offline_logprobs(offline, tokens[: position + len(rest)])[position:]
                assert np.abs(logprobs_of([r]) - want).max() <= TOL
    finally:
        server.stop(signal.SIGTERM)
        server.kill()


def test_eviction_more_sessions_than_slab_capacity(tiny_checkpoint: Path, offline, tmp_path: Path) -> None:
    tok = offline.tokenizer
    texts = [tok.encode(t) for t in session_texts(20, 120, seed=31)]
    with run_server(tiny_checkpoint, durability="snapshot", state_dir=str(tmp_path / "s"),
                    max_resident_sessions=4, max_batch_sessions=4) as srv:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            ids = [stub.CreateSession(pb.CreateSessionRequest()).session.session_id for _ in texts]
            responses: dict[str, list] = {sid: [] for sid in ids}
            rng = random.Random(5)
            cursor = dict.fromkeys(ids, 0)
            while any(cursor[s] < len(t) for s, t in zip(ids, texts)):  # round-robin over all 20
                for sid, tokens in zip(ids, texts):
                    if cursor[sid] < len(tokens):
                        n = rng.randint(1, 30)
                        chunk = tokens[cursor[sid] : cursor[sid] + n]
                        responses[sid].append(stub.Step(pb.StepRequest(session_id=sid, tokens=chunk,
                                                                       return_logprobs=True)))
                        cursor[sid] += len(chunk)
            fork = stub.ForkSession(pb.ForkSessionRequest(session_id=ids[0])).session
            assert fork.position == len(texts[0])
        assert srv.engine.runner.stats().used <= 4
    for sid, tokens in zip(ids, texts):
        assert np.abs(logprobs_of(responses[sid]) - offline_logprobs(offline, tokens)).max() <= TOL


def test_sessions_of_another_checkpoint_are_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    other = make_checkpoint(tmp_path / "other", seed=99)
    state = str(tmp_path / "s")
    with run_server(tiny_checkpoint, durability="snapshot", state_dir=state) as srv:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            sid = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
            stub.Step(pb.StepRequest(session_id=sid, text="Some state"))
    with run_server(other, durability="snapshot", state_dir=state) as srv:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).session.position == 10
            for call in (
                lambda: stub.Step(pb.StepRequest(session_id=sid, text="more")),
                lambda: stub.ForkSession(pb.ForkSessionRequest(session_id=sid)),
                lambda: list(stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=2))),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "another model" in err.value.details()
            stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid))


def test_expired_sessions_are_purged_and_eager_restore(tiny_checkpoint: Path, tmp_path: Path) -> None:
    state = str(tmp_path / "s")
    with run_server(tiny_checkpoint, durability="snapshot", state_dir=state) as srv:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            short = stub.CreateSession(pb.CreateSessionRequest(ttl_seconds=1)).session.session_id
            keep = [stub.CreateSession(pb.CreateSessionRequest()).session.session_id for _ in range(3)]
            for sid in keep:
                stub.Step(pb.StepRequest(session_id=sid, text="abc"))
    time.sleep(1.5)
    with run_server(tiny_checkpoint, durability="snapshot", state_dir=state, restore="eager") as srv:
        assert srv.engine.session_count == 3
        assert srv.engine.runner.stats().used == 3  # eager: all on the device at start
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.GetSession(pb.GetSessionRequest(session_id=short))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert all(stub.GetSession(pb.GetSessionRequest(session_id=s)).session.position == 3 for s in keep)


def test_one_server_per_state_directory(tmp_path: Path) -> None:
    first = SqliteStateStore(tmp_path, durable=False)
    try:
        with pytest.raises(StateStoreLockedError, match="in use by another"):
            SqliteStateStore(tmp_path, durable=False)
    finally:
        first.close()
    SqliteStateStore(tmp_path, durable=False).close()  # free again


# --------------------------------------------------------------------------- a failing store
# Failures are real: another connection holds SQLite's write lock (as another process or a
# backup tool would), so the server's writes fail after SQLite's 5 s busy timeout.


class WriteLock:
    """Holds the write lock of a state directory's database until released."""

    def __init__(self, state_dir: Path) -> None:
        import sqlite3

        self.db = sqlite3.connect(state_dir / "sessions.sqlite3", isolation_level=None, check_same_thread=False)
        self.db.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.db.execute("ROLLBACK")
        self.db.close()


def test_a_step_the_journal_could_not_record_is_not_acknowledged_until_it_is_stored(
    tiny_checkpoint: Path, offline, tmp_path: Path
) -> None:
    tok = offline.tokenizer
    state = tmp_path / "state"
    server = ServerProcess(tiny_checkpoint, state, tmp_path, "--durability", "journal")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            sid = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
            stub.Step(pb.StepRequest(session_id=sid, text="To be, or not"))
            lock = WriteLock(state)
            step = pb.StepRequest(session_id=sid, text=" to be", expected_position=13)
            with pytest.raises(grpc.RpcError) as failed:
                stub.Step(step, timeout=60)
            assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "state store" in (failed.value.details() or "")
            lock.release()
            assert stub.Step(step, timeout=60).position == 19  # the retry: answered once it is stored
            acked = stub.Step(pb.StepRequest(session_id=sid, text=", that", expected_position=19)).position
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
    finally:
        server.kill()
    server = ServerProcess(tiny_checkpoint, state, tmp_path, "--durability", "journal")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).session.position == acked == 25
            text = "To be, or not to be, that is"
            r = stub.Step(pb.StepRequest(session_id=sid, text=text[25:], expected_position=25, return_logprobs=True))
            want = offline_logprobs(offline, tok.encode(text))[25:]
            assert np.abs(logprobs_of([r]) - want).max() <= TOL
    finally:
        server.stop(signal.SIGTERM)
        server.kill()


PROPOSED_ID = "not-recorded-0123456789abcdef"


def test_a_session_the_store_could_not_record_does_not_exist(tiny_checkpoint: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with run_server(tiny_checkpoint, durability="snapshot", state_dir=str(state)) as srv:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            stub.CreateSession(pb.CreateSessionRequest())  # the database exists
            lock = WriteLock(state)
            with pytest.raises(grpc.RpcError) as failed:
                stub.CreateSession(pb.CreateSessionRequest(session_id=PROPOSED_ID), timeout=60)
            assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.RpcError) as missing:
                stub.GetSession(pb.GetSessionRequest(session_id=PROPOSED_ID))
            assert missing.value.code() is grpc.StatusCode.NOT_FOUND
            lock.release()
            assert stub.CreateSession(pb.CreateSessionRequest(session_id=PROPOSED_ID)).session.position == 0
            assert srv.engine.session_count == 2


def test_eviction_while_a_snapshot_waits_keeps_the_evicted_state(
    tiny_checkpoint: Path, offline, tmp_path: Path
) -> None:
    """The periodic snapshot is written in the background; a session evicted before it is
    written (here it fails: the database is locked) is written whole first, not dropped."""
    tok = offline.tokenizer
    state = tmp_path / "state"
    with run_server(tiny_checkpoint, durability="snapshot", state_dir=str(state), snapshot_interval_seconds=0.5,
                    max_resident_sessions=2, max_batch_sessions=2) as srv:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            a, b = (stub.CreateSession(pb.CreateSessionRequest()).session.session_id for _ in range(2))
            lock = WriteLock(state)
            history = tok.encode("To be, or not to be")
            stub.Step(pb.StepRequest(session_id=a, tokens=history))
            stub.Step(pb.StepRequest(session_id=b, text="other"))
            time.sleep(2.0)  # (an idle engine looks at the clock every second) the snapshot of a and b
            # is queued and waits for the lock; it fails after SQLite's 5 s, before the lock goes
            threading.Timer(5.0, lock.release).start()
            stub.CreateSession(pb.CreateSessionRequest(), timeout=60)  # evicts a (least recently used)
            evicted = [r for r in srv.engine._sessions.values() if r.session_id == a]
            assert evicted and evicted[0].slot < 0  # the case under test: a is no longer resident
            r = stub.Step(pb.StepRequest(session_id=a, text=",", expected_position=len(history), return_logprobs=True),
                          timeout=60)
            want = offline_logprobs(offline, history + tok.encode(","))[len(history):]
            assert np.abs(logprobs_of([r]) - want).max() <= TOL


def test_reading_a_session_renews_its_stored_expiry(tiny_checkpoint: Path, tmp_path: Path) -> None:
    state = str(tmp_path / "s")
    with run_server(tiny_checkpoint, durability="snapshot", state_dir=state, snapshot_interval_seconds=0.2) as srv:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            sid = stub.CreateSession(pb.CreateSessionRequest(ttl_seconds=6)).session.session_id
            stub.Step(pb.StepRequest(session_id=sid, text="abc"))
            time.sleep(0.6)  # snapshotted, expiry ~6 s from the step
            for _ in range(15):  # kept alive by reads alone, past that expiry
                time.sleep(0.5)
                stub.GetSession(pb.GetSessionRequest(session_id=sid))
            time.sleep(0.5)  # the reads' expiry (~6 s from the last) is stored by the next snapshot
    with run_server(tiny_checkpoint, durability="snapshot", state_dir=state) as srv:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).session.position == 3


def test_journal_appends_renew_the_stored_expiry(tmp_path: Path) -> None:
    from service.state_store import JournalEntry, StoredSession

    store = SqliteStateStore(tmp_path, durable=False)
    try:
        store.save_snapshots([StoredSession("k", "", 0.0, 60, time.time() + 1, "sha", 0, None)])
        before = next(store.sessions()).expires_at
        store.append_journal([JournalEntry("k", 0, [1, 2])])
        after = next(store.sessions()).expires_at
        assert after > before + 50 and abs(after - (time.time() + 60)) < 5
    finally:
        store.close()


@pytest.mark.parametrize("case", ["under a file", "corrupt database"])
def test_an_unusable_state_directory_is_refused_in_one_line(tiny_checkpoint: Path, tmp_path: Path, case: str) -> None:
    if case == "under a file":
        (tmp_path / "afile").write_text("x")
        state = tmp_path / "afile" / "state"
    else:
        state = tmp_path / "state"
        state.mkdir()
        (state / "sessions.sqlite3").write_bytes(b"this is not a database" * 100)
    proc = subprocess.run(
        [sys.executable, "-m", "service.server", "--checkpoint", str(tiny_checkpoint), "--port", "0",
         "--metrics-port", "-1", "--state-dir", str(state), "--durability", "snapshot"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "refusing to start" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout


def test_a_final_snapshot_that_fails_is_retried(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Shutdown in snapshot mode writes the changed sessions once more; a write lock held by
    someone else for a while (the first attempt waits out SQLite's 5 s) does not lose them."""
    state = tmp_path / "state"
    server = ServerProcess(tiny_checkpoint, state, tmp_path, "--durability", "snapshot",
                           "--snapshot-interval-seconds", "3600")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            sid = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
            assert stub.Step(pb.StepRequest(session_id=sid, text="To be, or not")).position == 13
        lock = WriteLock(state)
        threading.Timer(6.5, lock.release).start()  # after the first write gave up (5 s)
        assert server.stop(signal.SIGTERM) == 0
        out = server.proc.stdout.read() if server.proc.stdout else ""
        assert "snapshot of 1 sessions failed: database is locked" in out
    finally:
        server.kill()
    server = ServerProcess(tiny_checkpoint, state, tmp_path, "--durability", "snapshot")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).session.position == 13
    finally:
        server.kill()


@pytest.mark.parametrize(("durability", "hurried", "stored"),
                         [("snapshot", False, False), ("journal", False, True), ("snapshot", True, False)])
def test_a_final_snapshot_that_cannot_be_written_is_reported(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str, hurried: bool,
    stored: bool,
) -> None:
    """stop() says whether everything applied is stored (the command exits 1 when not): in
    snapshot mode a failed final write loses the changes; in journal mode the journal has them.
    After a second signal (engine.hurry()) a failed final write is not retried."""
    import sqlite3

    import service.engine

    monkeypatch.setattr(service.engine, "FINAL_SNAPSHOT_RETRY_SECONDS", 0.01)
    with run_server(tiny_checkpoint, durability=durability, state_dir=str(tmp_path / "state"),
                    snapshot_interval_seconds=3600.0) as running:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            sid = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
            stub.Step(pb.StepRequest(session_id=sid, text="To be"))
        calls = []

        def fail(snapshots: object) -> None:  # the real store, failing as a full disk would
            calls.append(snapshots)
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(running.engine.store.store, "save_snapshots", fail)
        if hurried:
            running.engine.hurry()
        assert running.call(running.server.stop(grace=1.0)) is stored
        # The background write queued at stop, then each attempt (one when hurried).
        attempts = 1 if hurried else service.engine.FINAL_SNAPSHOT_ATTEMPTS
        assert attempts < service.engine.FINAL_SNAPSHOT_ATTEMPTS or not hurried
        assert len(calls) == 1 + attempts


def test_a_fork_works_with_one_resident_session_asked_for(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A fork needs its source and its copy on the device: the resident limit is at least 2 (with 1,
    every fork was RESOURCE_EXHAUSTED 'retry shortly', forever)."""
    with run_server(tiny_checkpoint, durability="snapshot", state_dir=str(tmp_path / "state"),
                    max_resident_sessions=1, max_batch_sessions=1) as running:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            sid = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
            stub.Step(pb.StepRequest(session_id=sid, text="To be"))
            fork = stub.ForkSession(pb.ForkSessionRequest(session_id=sid)).session
            assert fork.position == 5
            other = stub.CreateSession(pb.CreateSessionRequest()).session.session_id  # evicts one of them
            stub.Step(pb.StepRequest(session_id=other, text="x"))
            a = stub.Step(pb.StepRequest(session_id=sid, text=" or", top_k=3))
            b = stub.Step(pb.StepRequest(session_id=fork.session_id, text=" or", top_k=3))
            assert a.outputs[-1].top_tokens == b.outputs[-1].top_tokens and a.position == b.position == 8
