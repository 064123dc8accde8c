"""Unit tests of the Python client that need no server: the public surface, error mapping,
data classes, input validation, conversion, retries (with a fake RPC) and the CLI's
argument handling."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import inspect
import math
import random
import re
from typing import Any

import grpc
import grpc.aio
import lstmserve_client
import pytest
from lstmserve_client import (
    AlreadyExists,
    AsyncClient,
    AsyncSession,
    Cancelled,
    Client,
    DeadlineExceeded,
    FailedPrecondition,
    GeneratedToken,
    InvalidInput,
    LstmServeError,
    ModelInfo,
    PermissionDenied,
    PositionConflict,
    ResourceExhausted,
    RetryPolicy,
    ServerError,
    ServerLimits,
    Session,
    SessionInfo,
    SessionNotFound,
    StepResult,
    TlsConfig,
    TokenOutput,
    Unauthenticated,
    Unavailable,
    cli,
)
from lstmserve_client import _common as c
from lstmserve_client.errors import from_rpc_error
from lstmserve_client.proto import lstm_service_pb2 as pb
from lstmserve_client.proto import lstm_service_pb2_grpc as pb_grpc

EXPECTED_ALL = [
    "AlreadyExists",
    "AsyncClient",
    "AsyncSession",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GeneratedToken",
    "InvalidInput",
    "LstmServeError",
    "ModelInfo",
    "PermissionDenied",
    "PositionConflict",
    "ResourceExhausted",
    "RetryPolicy",
    "ServerError",
    "ServerLimits",
    "Session",
    "SessionInfo",
    "SessionNotFound",
    "StepMultiplexer",
    "StepResult",
    "TlsConfig",
    "TokenOutput",
    "Unauthenticated",
    "Unavailable",
    "__version__",
]

CLOSED_TARGET = "127.0.0.1:1"  # creating a channel does not connect


class FakeRpcError(grpc.RpcError):  # type: ignore[misc,unused-ignore]
    """What the client sees from gRPC: code(), details(), trailing_metadata()."""

    def __init__(self, code: grpc.StatusCode, details: str = "", trailing: Any = ()) -> None:
        super().__init__(details)
        self._code = code
        self._details = details
        self._trailing = trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailing


# --------------------------------------------------------------------------- public surface


def test_all_is_pinned() -> None:
    assert lstmserve_client.__all__ == EXPECTED_ALL
    for name in EXPECTED_ALL:
        assert hasattr(lstmserve_client, name), name


def test_public_names_are_not_protobuf() -> None:
    for name in EXPECTED_ALL:
        obj = getattr(lstmserve_client, name)
        module = getattr(obj, "__module__", "") or ""
        assert ".proto" not in module, name
        if inspect.isclass(obj):
            assert not issubclass(obj, pb.StepRequest.__mro__[1]), name  # google.protobuf Message


def test_version_and_py_typed() -> None:
    from importlib import resources

    assert re.fullmatch(r"\d+\.\d+\.\d+", lstmserve_client.__version__)
    assert resources.files("lstmserve_client").joinpath("py.typed").is_file()


def test_sync_and_async_have_the_same_methods() -> None:
    def public(cls: type) -> set[str]:
        return {n for n in dir(cls) if not n.startswith("_")}

    # The multiplexer is asyncio only: it exists for many concurrent callers on one stream.
    assert public(Client) == public(AsyncClient) - {"multiplexer"}
    assert public(Session) == public(AsyncSession)
    for name in ("step", "reset", "delete", "fork", "info", "generate_text"):
        assert inspect.iscoroutinefunction(getattr(AsyncSession, name)), name
    # Same keyword arguments, sync and async.
    for cls_pair in ((Client, AsyncClient), (Session, AsyncSession)):
        for name in public(cls_pair[0]):
            a, b = getattr(cls_pair[0], name), getattr(cls_pair[1], name)
            if callable(a) and not isinstance(a, property):
                assert list(inspect.signature(a).parameters) == list(inspect.signature(b).parameters), name


def test_client_api_signatures() -> None:
    sig = inspect.signature(Client.__init__)
    assert sig.parameters["timeout"].default == 30.0
    for name in ("timeout", "token", "tls", "retries"):
        assert sig.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
    step = inspect.signature(Session.step)
    assert step.parameters["top_k"].default is None  # unset: the server's default (5, or a smaller vocabulary)
    assert step.parameters["return_logprobs"].default is False
    assert step.parameters["return_hidden"].default is False
    gen = inspect.signature(Session.generate)
    defaults = {k: v.default for k, v in gen.parameters.items() if k != "self"}
    assert defaults["prompt"] is None
    assert defaults["max_tokens"] == 100
    assert defaults["temperature"] == 1.0
    assert defaults["top_k"] == 0
    assert defaults["top_p"] == 1.0
    assert defaults["seed"] is None
    assert tuple(defaults["stop"]) == ()


# --------------------------------------------------------------------------- errors

CODE_TO_CLASS = [
    (grpc.StatusCode.NOT_FOUND, SessionNotFound),
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidInput),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
    (grpc.StatusCode.ABORTED, PositionConflict),
    (grpc.StatusCode.UNAVAILABLE, Unavailable),
    (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
    (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
    (grpc.StatusCode.ALREADY_EXISTS, AlreadyExists),
    (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
    (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
    (grpc.StatusCode.CANCELLED, Cancelled),
    (grpc.StatusCode.INTERNAL, ServerError),
    (grpc.StatusCode.UNKNOWN, ServerError),
    (grpc.StatusCode.UNIMPLEMENTED, ServerError),
    (grpc.StatusCode.DATA_LOSS, ServerError),
]


@pytest.mark.parametrize("code,cls", CODE_TO_CLASS, ids=[c.name for c, _ in CODE_TO_CLASS])
def test_error_mapping(code: grpc.StatusCode, cls: type[LstmServeError]) -> None:
    err = from_rpc_error(FakeRpcError(code, "the server's message"))
    assert type(err) is cls
    assert isinstance(err, LstmServeError)
    assert not isinstance(err, grpc.RpcError)
    assert err.code == code.name
    assert err.details == "the server's message"
    assert str(err) == f"{code.name}: the server's message"


def test_position_conflict_reads_trailing_position() -> None:
    err = from_rpc_error(FakeRpcError(grpc.StatusCode.ABORTED, "expected 3, at 7", (("lstm-position", "7"),)))
    assert isinstance(err, PositionConflict)
    assert err.current_position == 7
    assert err.metadata["lstm-position"] == "7"
    # Absent or malformed: None.
    assert from_rpc_error(FakeRpcError(grpc.StatusCode.ABORTED, "x")).current_position is None  # type: ignore[attr-defined]
    bad = from_rpc_error(FakeRpcError(grpc.StatusCode.ABORTED, "x", (("lstm-position", "seven"),)))
    assert isinstance(bad, PositionConflict) and bad.current_position is None


def test_resource_exhausted_retry_after() -> None:
    err = from_rpc_error(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", (("retry-after-ms", "250"),)))
    assert isinstance(err, ResourceExhausted)
    assert err.retry_after == pytest.approx(0.25)
    none = from_rpc_error(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy"))
    assert isinstance(none, ResourceExhausted) and none.retry_after is None


def test_error_mapping_metadata_shapes() -> None:
    # Binary values are skipped; keys are case-insensitive; aio Metadata works too.
    md = (("Lstm-Position", "5"), ("x-bin", b"\x00"))
    err = from_rpc_error(FakeRpcError(grpc.StatusCode.ABORTED, "x", md))
    assert isinstance(err, PositionConflict) and err.current_position == 5
    aio_md = grpc.aio.Metadata(("lstm-position", "9"))
    err = from_rpc_error(FakeRpcError(grpc.StatusCode.ABORTED, "x", aio_md))
    assert isinstance(err, PositionConflict) and err.current_position == 9
    err = from_rpc_error(FakeRpcError(grpc.StatusCode.ABORTED, "x", None))
    assert isinstance(err, PositionConflict) and err.current_position is None


def test_error_mapping_real_aio_error() -> None:
    e = grpc.aio.AioRpcError(
        code=grpc.StatusCode.NOT_FOUND,
        initial_metadata=grpc.aio.Metadata(),
        trailing_metadata=grpc.aio.Metadata(("k", "v")),
        details="session x not found",
    )
    err = from_rpc_error(e)
    assert isinstance(err, SessionNotFound)
    assert err.details == "session x not found"
    assert err.metadata == {"k": "v"}


def test_error_mapping_of_odd_objects() -> None:
    err = from_rpc_error(RuntimeError("boom"))
    assert isinstance(err, ServerError) and err.code == "UNKNOWN" and err.details == "boom"
    same = SessionNotFound("gone")
    assert from_rpc_error(same) is same


def test_error_classes() -> None:
    assert issubclass(InvalidInput, ValueError)
    for _, cls in CODE_TO_CLASS:
        assert issubclass(cls, LstmServeError)
        assert cls("m").code == cls.default_code
    e = LstmServeError("m", code="OUT_OF_RANGE")
    assert e.code == "OUT_OF_RANGE" and str(e) == "OUT_OF_RANGE: m"


# --------------------------------------------------------------------------- data classes


def test_dataclasses_are_frozen_plain_data() -> None:
    for cls in (ModelInfo, ServerLimits, SessionInfo, StepResult, TokenOutput, GeneratedToken, TlsConfig, RetryPolicy):
        assert dataclasses.is_dataclass(cls)
        assert getattr(cls, "__dataclass_params__").frozen, cls  # noqa: B009
    out = TokenOutput(token=1, text="a", top_tokens=[2], top_texts=["b"], top_logprobs=[-0.1])
    assert out.logprobs is None and out.hidden is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.token = 3  # type: ignore[misc]
    res = StepResult(session_id="s", position=2, outputs=[out, dataclasses.replace(out, text="b")])
    assert res.text == "ab"
    g = GeneratedToken(token=1, text="a", logprob=-1.0, position=5)
    assert g.finish_reason is None


def test_retry_policy() -> None:
    p = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0, jitter=0.5)
    rng = random.Random(0)
    for retry in range(1, 10):
        base = min(1.0, 0.1 * 2 ** (retry - 1))
        for _ in range(20):
            d = p.backoff(retry, rng)
            assert base * 0.5 - 1e-12 <= d <= base + 1e-12
    no_jitter = RetryPolicy(jitter=0.0, initial_backoff=0.2, max_backoff=10)
    assert [no_jitter.backoff(n) for n in (1, 2, 3)] == pytest.approx([0.2, 0.4, 0.8])
    assert no_jitter.backoff(1000) == 10  # no overflow
    assert RetryPolicy.disabled().max_attempts == 1
    assert RetryPolicy(codes={"unavailable", "RESOURCE_EXHAUSTED"}).codes == {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}
    for bad in (dict(max_attempts=0), dict(jitter=2.0), dict(multiplier=0.5), dict(initial_backoff=-1)):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


# --------------------------------------------------------------------------- validation


def test_session_ids() -> None:
    ids = {c.new_session_id() for _ in range(100)}
    assert len(ids) == 100
    for sid in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", sid)


def test_split_input() -> None:
    assert c.split_input("héllo") == ("héllo", None, 5)
    assert c.split_input([1, 2, 3]) == (None, [1, 2, 3], 3)
    assert c.split_input(x for x in [4]) == (None, [4], 1)
    assert c.split_input([]) == (None, [], 0)  # empty is the server's to reject
    for bad in (b"abc", 3, 2.5, None, [1, "a"], [1.5], [True]):
        with pytest.raises(TypeError):
            c.split_input(bad)
    for bad_range in ([-1], [2**31]):
        with pytest.raises(InvalidInput):
            c.split_input(bad_range)


def test_text_that_protobuf_cannot_send_is_invalid_input_before_any_call() -> None:
    # A lone surrogate is what os.fsdecode / sys.argv make of undecodable bytes.
    with pytest.raises(InvalidInput, match="lone surrogate"):
        c.split_input("ab\udcff")
    with pytest.raises(InvalidInput, match="session_id"):
        c.check_session_id("\udcff")
    with pytest.raises(InvalidInput, match="stop string"):
        _gen(stop="x\udcff")
    assert c.check_text("héllo ☃", "input") == "héllo ☃"


def test_step_request() -> None:
    req, n = c.step_request("s", "abc", expected_position=7, top_k=3, return_logprobs=True, return_hidden=False)
    assert n == 3 and req.text == "abc" and list(req.tokens) == []
    assert req.HasField("expected_position") and req.expected_position == 7
    assert req.HasField("top_k") and req.top_k == 3
    assert req.return_logprobs and not req.return_hidden
    req, n = c.step_request("s", [5, 6], expected_position=0, top_k=0, return_logprobs=False, return_hidden=True)
    assert n == 2 and list(req.tokens) == [5, 6] and req.text == ""
    assert req.HasField("expected_position") and req.expected_position == 0
    assert req.HasField("top_k") and req.top_k == 0
    req, _ = c.step_request("s", "a", expected_position=0, top_k=None, return_logprobs=False, return_hidden=False)
    assert not req.HasField("top_k")  # the server's default


def _gen(**kw: Any) -> pb.GenerateRequest:
    args: dict[str, Any] = dict(
        expected_position=0, max_tokens=10, temperature=1.0, top_k=0, top_p=1.0, seed=None, stop=()
    )
    args.update(kw)
    prompt = args.pop("prompt", None)
    return c.generate_request("s", prompt, **args)


def test_generate_request() -> None:
    req = _gen(prompt="hi", seed=42, stop="\n\n", temperature=0)
    assert req.prompt_text == "hi" and req.seed == 42 and list(req.stop) == ["\n\n"]
    assert req.HasField("temperature") and req.temperature == 0
    assert req.HasField("expected_position")
    assert not _gen().HasField("seed")
    assert list(_gen(prompt=[1, 2]).prompt_tokens) == [1, 2]
    assert _gen(seed=2**64 - 1).seed == 2**64 - 1
    for bad in (
        dict(max_tokens=0),
        dict(temperature=-1.0),
        dict(temperature=math.nan),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(seed=-1),
        dict(seed=2**64),
        dict(stop=[""]),
    ):
        with pytest.raises(InvalidInput):
            _gen(**bad)
    for bad_type in (dict(stop=[1]), dict(temperature="hot"), dict(max_tokens=1.5), dict(prompt=b"x")):
        with pytest.raises(TypeError):
            _gen(**bad_type)


def test_timeouts_and_ttls() -> None:
    assert c.check_timeout(None) is None
    assert c.check_timeout(math.inf) is None
    assert c.check_timeout(2) == 2.0
    for bad in (0, -1, math.nan):
        with pytest.raises(InvalidInput):
            c.check_timeout(bad)
    with pytest.raises(TypeError):
        c.check_timeout("3")  # type: ignore[arg-type]
    assert c.check_ttl(None) is None
    assert c.check_ttl(1.2) == 2
    for bad_ttl in (0, -5, math.inf):
        with pytest.raises(InvalidInput):
            c.check_ttl(bad_ttl)


def test_client_validates_before_any_call() -> None:
    with Client(CLOSED_TARGET, retries=RetryPolicy.disabled()) as client:
        s = Session(client, "x" * 22, 0)
        with pytest.raises(TypeError):
            s.step(b"bytes")
        with pytest.raises(InvalidInput):
            s.step("a", top_k=-1)
        with pytest.raises(InvalidInput):
            s.generate(max_tokens=0)
        with pytest.raises(TypeError):
            s.stream("one text")
        with pytest.raises(InvalidInput):
            s.stream(["a"], top_k=-2)
        with pytest.raises(InvalidInput):
            client.session(ttl=0)
        with pytest.raises(InvalidInput):
            client.attach("")
        with pytest.raises(InvalidInput):
            client.model_info(timeout=-1)
    with pytest.raises(TypeError):
        Client("")
    with pytest.raises(TypeError):
        Client(CLOSED_TARGET, tls="yes")  # type: ignore[arg-type]


def test_closed_client_raises_cancelled() -> None:
    client = Client(CLOSED_TARGET)
    client.close()
    client.close()  # idempotent
    with pytest.raises(Cancelled):
        client.model_info()


def test_call_metadata_and_channel_options() -> None:
    assert c.call_metadata("tok", None, ()) == (("authorization", "Bearer tok"),)
    assert c.call_metadata("tok", TlsConfig(), ()) == ()  # call credentials carry it over TLS
    assert c.call_metadata(None, None, (("X-Trace", "1"),)) == (("x-trace", "1"),)
    opts = dict(c.channel_options(TlsConfig(server_name_override="lstm.test"), [("grpc.foo", 1)]))
    assert opts["grpc.ssl_target_name_override"] == "lstm.test"
    assert opts["grpc.foo"] == 1
    assert c.normalize_tls(True) == TlsConfig()
    assert c.normalize_tls(None) is None and c.normalize_tls(False) is None
    # A TLS channel with a token builds (no connection is made).
    Client(CLOSED_TARGET, tls=TlsConfig(), token="t").close()


# --------------------------------------------------------------------------- conversion


def test_step_result_conversion() -> None:
    vocab = ["a", "b", "c"]
    msg = pb.StepResponse(
        session_id="s",
        position=4,
        outputs=[
            pb.TokenOutput(token=0, top_tokens=[2, 1], top_logprobs=[-0.5, -1.0]),
            pb.TokenOutput(token=1, top_tokens=[], logprobs=[-1.0, -2.0, -3.0], hidden=[0.5, 0.25]),
        ],
    )
    r = c.step_result(msg, vocab)
    assert r.session_id == "s" and r.position == 4 and r.text == "ab"
    o0, o1 = r.outputs
    assert (o0.token, o0.text, o0.top_tokens, o0.top_texts) == (0, "a", [2, 1], ["c", "b"])
    assert o0.top_logprobs == pytest.approx([-0.5, -1.0])
    assert o0.logprobs is None and o0.hidden is None
    assert o1.logprobs == pytest.approx([-1.0, -2.0, -3.0]) and o1.hidden == pytest.approx([0.5, 0.25])
    assert all(type(x) is float for x in o1.logprobs or [])


def test_generated_token_conversion() -> None:
    t = c.generated_token(pb.GenerateResponse(token=3, text="d", logprob=-0.5, position=9))
    assert t == GeneratedToken(token=3, text="d", logprob=-0.5, position=9, finish_reason=None)
    for reason, name in (
        (pb.FINISH_REASON_LENGTH, "length"),
        (pb.FINISH_REASON_STOP, "stop"),
        (pb.FINISH_REASON_CANCELLED, "cancelled"),
    ):
        assert c.generated_token(pb.GenerateResponse(finish_reason=reason)).finish_reason == name


def test_model_and_session_info_conversion() -> None:
    msg = pb.GetModelInfoResponse(
        vocab=["a", "b"],
        cell_type=pb.CELL_TYPE_GRU,
        num_layers=2,
        hidden_size=32,
        embedding_size=16,
        checkpoint_sha256="ab" * 32,
        val_loss=1.5,
        device="cpu",
        dtype="float32",
        limits=pb.ServerLimits(max_sessions=10, max_tokens_per_request=4096),
        server_version="0.1.0",
    )
    info = c.model_info(msg)
    assert info.vocab == ["a", "b"] and info.vocab_size == 2 and info.cell_type == "gru"
    assert info.limits.max_sessions == 10 and info.limits.max_generate_tokens == 0
    assert c.model_info(pb.GetModelInfoResponse(cell_type=pb.CELL_TYPE_LSTM)).cell_type == "lstm"
    s = pb.Session(session_id="x", position=3, ttl_seconds=60)
    s.create_time.FromSeconds(1_700_000_000)
    si = c.session_info(s)
    assert si.position == 3 and si.ttl_seconds == 60 and si.expire_time is None
    assert si.create_time == dt.datetime.fromtimestamp(1_700_000_000, tz=dt.timezone.utc)


# --------------------------------------------------------------------------- retries (fake RPCs)


class FakeRpc:
    """A unary RPC that fails with the given codes first, then returns "ok"."""

    def __init__(self, *codes: grpc.StatusCode) -> None:
        self.codes = list(codes)
        self.calls: list[dict[str, Any]] = []

    def __call__(self, request: Any, *, timeout: float | None, metadata: Any) -> str:
        self.calls.append({"timeout": timeout, "metadata": metadata})
        if self.codes:
            raise FakeRpcError(self.codes.pop(0), "simulated")
        return "ok"


FAST = RetryPolicy(max_attempts=4, initial_backoff=0.001, max_backoff=0.002)


def test_unary_retries_unavailable() -> None:
    with Client(CLOSED_TARGET, retries=FAST, token="t") as client:
        rpc = FakeRpc(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)
        assert client._unary(rpc, None) == "ok"
        assert len(rpc.calls) == 3
        assert rpc.calls[0]["metadata"] == (("authorization", "Bearer t"),)
        # Every attempt has a deadline, shrinking.
        timeouts = [call["timeout"] for call in rpc.calls]
        assert all(t is not None and 0 < t <= 30.0 for t in timeouts)
        assert timeouts == sorted(timeouts, reverse=True)
        # Gives up after max_attempts with the last error.
        rpc = FakeRpc(*[grpc.StatusCode.UNAVAILABLE] * 10)
        with pytest.raises(Unavailable):
            client._unary(rpc, None)
        assert len(rpc.calls) == 4


def test_unary_does_not_retry_other_codes() -> None:
    with Client(CLOSED_TARGET, retries=FAST) as client:
        for code, cls in CODE_TO_CLASS:
            if code is grpc.StatusCode.UNAVAILABLE:
                continue
            rpc = FakeRpc(code)
            with pytest.raises(cls):
                client._unary(rpc, None)
            assert len(rpc.calls) == 1
        rpc = FakeRpc(grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(Unavailable):
            client._unary(rpc, None, retry=False)


def test_accept_on_retry_only_after_a_retry() -> None:
    with Client(CLOSED_TARGET, retries=FAST) as client:
        # ALREADY_EXISTS on the first attempt is a real error...
        with pytest.raises(AlreadyExists):
            client._unary(FakeRpc(grpc.StatusCode.ALREADY_EXISTS), None, accept_on_retry=lambda e: True)
        # ...and on a retry it means an earlier attempt succeeded.
        rpc = FakeRpc(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ALREADY_EXISTS)
        assert client._unary(rpc, None, accept_on_retry=lambda e: e.code == "ALREADY_EXISTS") is None


def test_retry_honours_retry_after_and_deadline() -> None:
    policy = RetryPolicy(initial_backoff=0.001, codes={"UNAVAILABLE", "RESOURCE_EXHAUSTED"})
    with Client(CLOSED_TARGET, retries=policy, timeout=0.2) as client:

        class Busy(FakeRpc):
            def __call__(self, request: Any, *, timeout: float | None, metadata: Any) -> str:
                self.calls.append({"timeout": timeout})
                raise FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", (("retry-after-ms", "5000"),))

        busy = Busy()
        with pytest.raises(ResourceExhausted) as info:
            client._unary(busy, None)
        assert info.value.retry_after == 5.0
        assert len(busy.calls) == 1  # waiting 5 s would pass the 0.2 s deadline: no retry
    with Client(CLOSED_TARGET, retries=RetryPolicy.disabled()) as client:
        rpc = FakeRpc(grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(Unavailable):
            client._unary(rpc, None)
        assert len(rpc.calls) == 1


def test_no_timeout_means_no_deadline() -> None:
    with Client(CLOSED_TARGET, timeout=None) as client:
        rpc = FakeRpc()
        client._unary(rpc, None)
        assert rpc.calls[0]["timeout"] is None
        client._unary(rpc, None, timeout=5)
        assert rpc.calls[1]["timeout"] == pytest.approx(5, abs=0.5)


async def test_async_validates_before_any_call() -> None:
    async with AsyncClient(CLOSED_TARGET, retries=RetryPolicy.disabled()) as client:
        s = AsyncSession(client, "x" * 22, 0)
        with pytest.raises(TypeError):
            s.stream("one text")
        with pytest.raises(InvalidInput):
            s.generate(top_p=0)
        with pytest.raises(InvalidInput):
            await s.step("a", top_k=-1)
        with pytest.raises(InvalidInput):
            client.session(ttl=-1)


async def test_async_unary_retries() -> None:
    async with AsyncClient(CLOSED_TARGET, retries=FAST) as client:

        class AsyncFake(FakeRpc):
            async def __call__(self, request: Any, *, timeout: float | None, metadata: Any) -> str:  # type: ignore[override]
                return FakeRpc.__call__(self, request, timeout=timeout, metadata=metadata)

        rpc = AsyncFake(grpc.StatusCode.UNAVAILABLE)
        assert await client._unary(rpc, None) == "ok"
        assert len(rpc.calls) == 2
        with pytest.raises(PositionConflict):
            await client._unary(AsyncFake(grpc.StatusCode.ABORTED), None)


# --------------------------------------------------------------------------- CLI (no server)


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert cli.main(["generate"]) == 2  # PROMPT missing
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["score", "f", "--chunk-size", "0"]) == 2
    assert cli.main(["--target", "", "info"]) == 2
    err = capsys.readouterr().err
    assert "usage:" in err


def test_cli_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert lstmserve_client.__version__ in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("info", "generate", "chat", "score"):
        assert cmd in out


def test_cli_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LSTM_SERVE_TARGET", raising=False)
    args = cli.build_parser().parse_args(["info"])
    assert args.target == "127.0.0.1:50051" and args.timeout == 30.0
    monkeypatch.setenv("LSTM_SERVE_TARGET", "example:1234")
    args = cli.build_parser().parse_args(["info"])
    assert args.target == "example:1234"
    # Connection options may follow the command.
    args = cli.build_parser().parse_args(["info", "--target", "h:1", "--timeout", "0"])
    assert args.target == "h:1" and args.timeout is None
    args = cli.build_parser().parse_args(["generate", "x", "--stop", r"\n\n"])
    assert args.stop == [r"\n\n"] and cli._unescape(args.stop[0]) == "\n\n"


def test_cli_unreachable_server_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--target", CLOSED_TARGET, "--timeout", "2", "info"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lstm-client: error: UNAVAILABLE: ")
    assert err.count("\n") == 1


def test_cli_unreadable_file(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    assert cli.main(["--target", CLOSED_TARGET, "score", str(tmp_path / "missing.txt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lstm-client: error: cannot read ") and err.count("\n") == 1


def test_check_vocab_message() -> None:
    cli.check_vocab("abc\nab", ["a", "b", "c", "\n"], "x")
    with pytest.raises(cli.CliError, match=r"character 'é' \(U\+00E9\) at line 2, column 3 of f"):
        cli.check_vocab("ab\nabé", ["a", "b", "\n"], "f")


# --------------------------------------------------------------------------- the vocabulary fetch


class SlowModelInfo(pb_grpc.LstmServiceServicer):  # type: ignore[misc]
    """A stand-in server whose GetModelInfo answers only after 20 s (the client layer alone)."""

    async def CreateSession(self, request: Any, context: Any) -> Any:
        return pb.CreateSessionResponse(session=pb.Session(session_id=request.session_id or "s"))

    async def GetModelInfo(self, request: Any, context: Any) -> Any:
        await asyncio.sleep(20)
        return pb.GetModelInfoResponse()


async def test_the_vocabulary_fetch_runs_under_the_calls_timeout() -> None:
    """The first step/stream fetches the vocabulary; a step's timeout covers that fetch too
    (it used to run under the client's default, here none: the step waited the full 20 s)."""
    server = grpc.aio.server()
    pb_grpc.add_LstmServiceServicer_to_server(SlowModelInfo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        def sync_step() -> None:
            with Client(f"127.0.0.1:{port}", timeout=None) as client:
                client.session(keep=True).step("a", timeout=0.5)

        with pytest.raises(DeadlineExceeded):
            await asyncio.to_thread(sync_step)
        async with AsyncClient(f"127.0.0.1:{port}", timeout=None) as aclient:
            session = await aclient.session(keep=True)
            with pytest.raises(DeadlineExceeded):
                await session.step("a", timeout=0.5)
            with pytest.raises(DeadlineExceeded):
                async for _ in session.stream(["a"], timeout=0.5):
                    pass
    finally:
        await server.stop(None)
