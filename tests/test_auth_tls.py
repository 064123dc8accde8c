"""Bearer-token auth, principals owning sessions, TLS and mTLS, refusing bad auth config, and logs that never
hold a full session id (or a token) at info level.

Certificates (a CA, a server certificate for 127.0.0.1/localhost, client certificates from that CA and from
another one) are made at test time with `cryptography`.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lstmserve_client.proto import lstm_service_pb2 as pb
from lstmserve_client.proto import lstm_service_pb2_grpc as pb_grpc

from tests.conftest import run_server
from tests.test_stress import spawn_server

Code = grpc.StatusCode
ALICE_TOKEN = "alice-token-0123456789abcdef"
BOB_TOKEN = "bob-token-0123456789abcdef00"
ROOT = Path(__file__).resolve().parent.parent


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def rpc_code(fn: Any, request: Any, metadata: Any = None, stream: bool = False) -> tuple[Code, str]:
    try:
        result = fn(request, metadata=metadata, timeout=10)
        if stream:
            list(result)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return Code.OK, ""


def every_rpc(stub: pb_grpc.LstmServiceStub, sid: str) -> list[tuple[str, Any, Any, bool]]:
    """(name, method, request, streams) for every LstmService RPC, addressed to session `sid`."""
    return [
        ("GetModelInfo", stub.GetModelInfo, pb.GetModelInfoRequest(), False),
        ("CreateSession", stub.CreateSession, pb.CreateSessionRequest(), False),
        ("GetSession", stub.GetSession, pb.GetSessionRequest(session_id=sid), False),
        ("DeleteSession", stub.DeleteSession, pb.DeleteSessionRequest(session_id=sid), False),
        ("ResetSession", stub.ResetSession, pb.ResetSessionRequest(session_id=sid), False),
        ("ForkSession", stub.ForkSession, pb.ForkSessionRequest(session_id=sid), False),
        ("Step", stub.Step, pb.StepRequest(session_id=sid, text="Hi"), False),
        ("StreamSteps", lambda r, **kw: stub.StreamSteps(iter([r]), **kw), pb.StepRequest(session_id=sid, text="Hi"),
         True),
        ("Generate", stub.Generate, pb.GenerateRequest(session_id=sid, max_tokens=2, seed=1), True),
    ]


# ---- bearer tokens ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["file", "inline"])
def auth_server(request: pytest.FixtureRequest, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    if request.param == "file":
        path = tmp_path_factory.mktemp("auth") / "tokens"
        path.write_text(f"# lstm-serve tokens\n\n{ALICE_TOKEN} alice\n  {BOB_TOKEN}   bob  \n")
        overrides = {"auth_tokens": str(path)}
    else:
        overrides = {"auth_tokens_inline": f"alice:{ALICE_TOKEN}, bob:{BOB_TOKEN}"}
    with run_server(tiny_checkpoint, **overrides) as srv, grpc.insecure_channel(srv.target) as channel:
        yield srv, channel


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        bearer("not-a-known-token-at-all"),
        bearer(""),
        bearer(ALICE_TOKEN[:-1]),
        (("authorization", ALICE_TOKEN),),  # no scheme
        (("authorization", f"Basic {ALICE_TOKEN}"),),
        (("x-api-key", ALICE_TOKEN),),
    ],
    ids=["none", "unknown", "empty", "prefix", "no-scheme", "basic", "other-header"],
)
def test_missing_or_wrong_token_is_unauthenticated_on_every_rpc(auth_server, metadata) -> None:
    srv, channel = auth_server
    stub = pb_grpc.LstmServiceStub(channel)
    sid = stub.CreateSession(pb.CreateSessionRequest(), metadata=bearer(ALICE_TOKEN)).session.session_id
    sessions = srv.engine.session_count
    for name, fn, request, stream in every_rpc(stub, sid):
        code, details = rpc_code(fn, request, metadata, stream)
        assert code == Code.UNAUTHENTICATED, (name, code, details)
        assert "bearer token" in details
    assert srv.engine.session_count == sessions  # nothing was created, forked or deleted
    # The same calls with the token are served.
    assert stub.Step(pb.StepRequest(session_id=sid, text="Hi"), metadata=bearer(ALICE_TOKEN)).position == 2


def test_health_needs_no_token(auth_server) -> None:
    _, channel = auth_server
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "lstmserve.v1.LstmService"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    first = next(iter(health.Watch(health_pb2.HealthCheckRequest(), timeout=10)))
    assert first.status == health_pb2.HealthCheckResponse.SERVING


def test_sessions_belong_to_their_principal(auth_server) -> None:
    """Bob gets NOT_FOUND for Alice's session on every RPC that names one, with the very message an unknown id
    gets (no way to tell "exists, not yours" from "does not exist"); Alice's session is untouched."""
    _, channel = auth_server
    stub = pb_grpc.LstmServiceStub(channel)
    alice, bob = bearer(ALICE_TOKEN), bearer(BOB_TOKEN)
    sid = stub.CreateSession(pb.CreateSessionRequest(), metadata=alice).session.session_id
    stub.Step(pb.StepRequest(session_id=sid, text="To be"), metadata=alice)
    ghost = sid[:8] + ("A" if sid[8] != "A" else "B") + sid[9:]  # same short form, no such session
    for name, fn, request, stream in every_rpc(stub, sid)[2:]:
        code, details = rpc_code(fn, request, bob, stream)
        assert code == Code.NOT_FOUND, (name, code, details)
        assert sid not in details
        ghost_request = type(request)()
        ghost_request.CopyFrom(request)
        ghost_request.session_id = ghost
        assert rpc_code(fn, ghost_request, bob, stream) == (code, details), name
    session = stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=alice).session
    assert session.position == 5
    assert stub.Step(pb.StepRequest(session_id=sid, text=", or", expected_position=5), metadata=alice).position == 9
    # Bob's own sessions work, and Alice cannot see them either.
    mine = stub.CreateSession(pb.CreateSessionRequest(), metadata=bob).session.session_id
    assert stub.ForkSession(pb.ForkSessionRequest(session_id=mine), metadata=bob).session.position == 0
    assert rpc_code(stub.GetSession, pb.GetSessionRequest(session_id=mine), alice)[0] == Code.NOT_FOUND


def test_bad_auth_config_refuses_to_start(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A tokens file that is missing or malformed, or a malformed inline list (flag or environment), makes the
    server exit 2 with a message naming the file and line, and no traceback."""
    short = tmp_path / "short"
    short.write_text(f"{ALICE_TOKEN} alice\ntooshort bob\n")
    three = tmp_path / "three"
    three.write_text(f"# ok\n{ALICE_TOKEN} alice extra\n")
    empty = tmp_path / "empty"  # e.g. a secret mount that was never filled: authentication must not go off
    empty.write_text("# tokens go here\n\n")
    twice = tmp_path / "twice"
    twice.write_text(f"{ALICE_TOKEN} alice\n{ALICE_TOKEN} bob\n")
    cases = {
        "empty": (["--auth-tokens", str(empty)], {}, f"{empty}: no tokens found; authentication would be off"),
        "twice": (["--auth-tokens", str(twice)], {}, f"{twice}:2: this token is already listed (for 'alice')"),
        "missing": (["--auth-tokens", str(tmp_path / "nope")], {}, f"{tmp_path / 'nope'}: cannot read auth tokens"),
        "short": (["--auth-tokens", str(short)], {}, f"{short}:2: token for 'bob' is shorter than 16 characters"),
        "three-fields": (["--auth-tokens", str(three)], {}, f"{three}:2: expected 'TOKEN PRINCIPAL'"),
        "inline-env": ([], {"LSTM_SERVE_AUTH_TOKENS_INLINE": f"alice={ALICE_TOKEN}"},
                       "inline auth tokens must be 'PRINCIPAL:TOKEN,...'"),
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "service.server", "--checkpoint", str(tiny_checkpoint), "--port", "0",
             "--metrics-port", "-1", "--durability", "none", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **env},
        )
        for name, (args, env, _) in cases.items()
    }
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, stderr[-2000:])
        assert "refusing to start" in stderr and cases[name][2] in stderr, (name, stderr[-2000:])
        assert "Traceback" not in stderr, (name, stderr[-2000:])
        assert ALICE_TOKEN not in stderr  # a token is never echoed


# ---- TLS and mTLS --------------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes
    rogue_ca: bytes
    rogue_client_cert: bytes
    rogue_client_key: bytes


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, name: str, server: bool
          ) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                              else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pki, Path]:
    ca_key, ca_cert = _ca("lstm-serve test CA")
    rogue_key, rogue_cert = _ca("someone else's CA")
    server_cert, server_key = _leaf(ca_key, ca_cert, "lstm-serve", server=True)
    client_cert, client_key = _leaf(ca_key, ca_cert, "client", server=False)
    rogue_client_cert, rogue_client_key = _leaf(rogue_key, rogue_cert, "client", server=False)
    p = Pki(ca_cert.public_bytes(serialization.Encoding.PEM), server_cert, server_key, client_cert, client_key,
            rogue_cert.public_bytes(serialization.Encoding.PEM), rogue_client_cert, rogue_client_key)
    directory = tmp_path_factory.mktemp("pki")
    for name in ("ca", "server_cert", "server_key"):
        (directory / f"{name}.pem").write_bytes(getattr(p, name))
    return p, directory


def _check(channel: grpc.Channel) -> Code:
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        pb_grpc.LstmServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    except grpc.RpcError as e:
        return e.code()
    return Code.OK


def _tls(target: str, root: bytes, cert: bytes | None = None, key: bytes | None = None) -> grpc.Channel:
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root, key, cert))


def test_tls_server_refuses_plaintext_and_serves_tls(tiny_checkpoint: Path, pki) -> None:
    p, d = pki
    with run_server(tiny_checkpoint, tls_cert=str(d / "server_cert.pem"), tls_key=str(d / "server_key.pem")) as srv:
        port = srv.port
        with grpc.insecure_channel(srv.target) as plain:
            assert _check(plain) == Code.UNAVAILABLE
        with _tls(f"127.0.0.1:{port}", p.rogue_ca) as untrusted:  # a client that does not trust the server
            assert _check(untrusted) == Code.UNAVAILABLE
        for host in ("127.0.0.1", "localhost"):  # both names are in the certificate
            with _tls(f"{host}:{port}", p.ca) as channel:
                assert _check(channel) == Code.OK
                stub = pb_grpc.LstmServiceStub(channel)
                sid = stub.CreateSession(pb.CreateSessionRequest(), timeout=5).session.session_id
                assert stub.Step(pb.StepRequest(session_id=sid, text="Hello"), timeout=5).position == 5


def test_mtls_requires_a_client_certificate_from_the_ca(tiny_checkpoint: Path, pki) -> None:
    p, d = pki
    with run_server(tiny_checkpoint, tls_cert=str(d / "server_cert.pem"), tls_key=str(d / "server_key.pem"),
                    tls_client_ca=str(d / "ca.pem")) as srv:
        target = f"localhost:{srv.port}"
        with grpc.insecure_channel(srv.target) as plain:
            assert _check(plain) == Code.UNAVAILABLE
        with _tls(target, p.ca) as no_cert:
            assert _check(no_cert) == Code.UNAVAILABLE
        with _tls(target, p.ca, p.rogue_client_cert, p.rogue_client_key) as rogue:
            assert _check(rogue) == Code.UNAVAILABLE
        with _tls(target, p.ca, p.client_cert, p.client_key) as good:
            assert _check(good) == Code.OK
            assert list(pb_grpc.LstmServiceStub(good).GetModelInfo(pb.GetModelInfoRequest(), timeout=5).vocab)


def test_unreadable_tls_files_refuse_to_start(tiny_checkpoint: Path, tmp_path: Path, pki) -> None:
    _, d = pki
    proc = subprocess.run(
        [sys.executable, "-m", "service.server", "--checkpoint", str(tiny_checkpoint), "--port", "0",
         "--metrics-port", "-1", "--durability", "none", "--tls-cert", str(d / "server_cert.pem"),
         "--tls-key", str(tmp_path / "missing.key")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{tmp_path / 'missing.key'}: cannot read" in proc.stderr and "Traceback" not in proc.stderr


def test_tls_files_that_are_not_pem_refuse_to_start_naming_the_file(tiny_checkpoint: Path, tmp_path: Path,
                                                                     pki) -> None:
    _, d = pki
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("this is not a certificate\n")
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    cases = [
        (["--tls-cert", str(not_pem), "--tls-key", str(d / "server_key.pem")], f"{not_pem}: not a PEM file"),
        (["--tls-cert", str(d / "server_cert.pem"), "--tls-key", str(not_pem)], f"{not_pem}: not a PEM file"),
        (["--tls-cert", str(d / "server_cert.pem"), "--tls-key", str(d / "server_key.pem"),
          "--tls-client-ca", str(empty)], f"{empty}: not a PEM file"),
    ]
    for args, message in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "service.server", "--checkpoint", str(tiny_checkpoint), "--port", "0",
             "--metrics-port", "-1", "--durability", "none", *args],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_open_health_calls_cannot_use_up_the_limit_of_authenticated_calls(tiny_checkpoint: Path) -> None:
    from service.malformed import MAX_OPEN_CALLS

    with run_server(tiny_checkpoint, auth_tokens_inline=f"alice:{ALICE_TOKEN}", max_concurrent_rpcs=4) as srv, \
            grpc.insecure_channel(srv.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(min(MAX_OPEN_CALLS, 4))]
        for watch in watches:
            next(watch)  # each is open and answered
        with pytest.raises(grpc.RpcError) as refused:
            health.Check(health_pb2.HealthCheckRequest())  # the open calls' own limit is full
        assert refused.value.code() is Code.RESOURCE_EXHAUSTED
        stub = pb_grpc.LstmServiceStub(channel)
        assert stub.CreateSession(pb.CreateSessionRequest(), metadata=bearer(ALICE_TOKEN)).session.position == 0
        for watch in watches:
            watch.cancel()


# ---- logs ---------------------------------------------------------------------------------------------


def _traffic(target: str, metadata: Any) -> list[str]:
    """Every kind of call, good and bad; returns every session id it used (full)."""
    ids: list[str] = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        sid = stub.CreateSession(pb.CreateSessionRequest(), metadata=metadata).session.session_id
        proposed = "client-proposed-session-id-0123456789"
        stub.CreateSession(pb.CreateSessionRequest(session_id=proposed), metadata=metadata)
        short_lived = stub.CreateSession(pb.CreateSessionRequest(ttl_seconds=1), metadata=metadata).session.session_id
        ids += [sid, proposed, short_lived]
        stub.Step(pb.StepRequest(session_id=sid, text="Hello there"), metadata=metadata)
        fork = stub.ForkSession(pb.ForkSessionRequest(session_id=sid), metadata=metadata).session.session_id
        ids.append(fork)
        list(stub.Generate(pb.GenerateRequest(session_id=fork, max_tokens=5, seed=1), metadata=metadata))
        list(stub.StreamSteps(iter([pb.StepRequest(session_id=sid, text="a")] * 3), metadata=metadata))
        stub.ResetSession(pb.ResetSessionRequest(session_id=fork), metadata=metadata)
        stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=metadata)
        unknown = "unknown-session-id-0123456789abcdef"
        ids.append(unknown)
        for fn, request in [
            (stub.GetSession, pb.GetSessionRequest(session_id=unknown)),
            (stub.Step, pb.StepRequest(session_id=unknown, text="x")),
            (stub.Step, pb.StepRequest(session_id=sid, tokens=[999])),
            (stub.Step, pb.StepRequest(session_id=sid, text="y", expected_position=12345)),
            (stub.CreateSession, pb.CreateSessionRequest(session_id=proposed)),
            (stub.ForkSession, pb.ForkSessionRequest(session_id=sid, new_session_id=proposed)),
            (stub.DeleteSession, pb.DeleteSessionRequest(session_id=unknown)),
        ]:
            with pytest.raises(grpc.RpcError):
                fn(request, metadata=metadata)
        with pytest.raises(grpc.RpcError):
            list(stub.StreamSteps(iter([pb.StepRequest(session_id=sid, text="a"),
                                        pb.StepRequest(session_id=unknown, text="b")]), metadata=metadata))
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=proposed), metadata=metadata)
        time.sleep(2.5)  # the ttl=1 session expires
        with pytest.raises(grpc.RpcError):
            stub.GetSession(pb.GetSessionRequest(session_id=short_lived), metadata=metadata)
    return ids


def test_logs_never_hold_a_full_session_id_or_token_at_info(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Servers at --log-level info (human) and debug (json) take every kind of call; no record at INFO or above
    holds a full session id, and no record at all holds a bearer token."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ALICE_TOKEN} alice\n")
    with spawn_server(tiny_checkpoint, tmp_path, "--log-level", "info", "--auth-tokens", str(tokens)) as info, \
            spawn_server(tiny_checkpoint, tmp_path, "--log-level", "debug", "--log-format", "json",
                         "--auth-tokens", str(tokens)) as debug:
        used = {"info": _traffic(info.target, bearer(ALICE_TOKEN)),
                "debug": _traffic(debug.target, bearer(ALICE_TOKEN))}
        for srv in (info, debug):
            srv.proc.send_signal(signal.SIGTERM)
            assert srv.proc.wait(timeout=30) == 0
    info_log, debug_log = info.log(), debug.log()
    assert "serving" in info_log and "stopped" in info_log
    for sid in used["info"]:
        assert sid not in info_log, f"full session id {sid[:8]}… in the info log"
    records = [json.loads(line) for line in debug_log.splitlines() if line.startswith("{")]
    assert any(r["level"] == "DEBUG" for r in records), "the debug server logged nothing at DEBUG"
    above_debug = "\n".join(json.dumps(r) for r in records if r["level"] != "DEBUG")
    assert "serving" in above_debug
    for sid in used["debug"]:
        assert sid not in above_debug, f"full session id {sid[:8]}… in an INFO+ record"
    for log in (info_log, debug_log):
        assert ALICE_TOKEN not in log
        assert "Traceback" not in log


def test_proposing_another_principals_session_id_reveals_nothing(auth_server, tmp_path: Path) -> None:
    """Ids are scoped to their principal: Bob may create a session with the id Alice uses (no
    ALREADY_EXISTS oracle), and the two sessions are independent, also across a restart."""
    srv, channel = auth_server
    stub = pb_grpc.LstmServiceStub(channel)
    alice, bob = bearer(ALICE_TOKEN), bearer(BOB_TOKEN)
    shared = "shared-id-0123456789abcdefXYZ"
    stub.CreateSession(pb.CreateSessionRequest(session_id=shared), metadata=alice)
    stub.Step(pb.StepRequest(session_id=shared, text="Alice's text"), metadata=alice)
    created = stub.CreateSession(pb.CreateSessionRequest(session_id=shared), metadata=bob).session
    assert created.session_id == shared and created.position == 0
    assert stub.Step(pb.StepRequest(session_id=shared, text="Bob"), metadata=bob).position == 3
    assert stub.GetSession(pb.GetSessionRequest(session_id=shared), metadata=alice).session.position == 12
    # Alice proposing it again is her own conflict.
    assert rpc_code(stub.CreateSession, pb.CreateSessionRequest(session_id=shared), alice)[0] == Code.ALREADY_EXISTS
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=shared), metadata=bob)
    assert stub.GetSession(pb.GetSessionRequest(session_id=shared), metadata=alice).session.position == 12
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=shared), metadata=alice)


def test_per_principal_ids_survive_a_restart(tiny_checkpoint: Path, tmp_path: Path) -> None:
    tokens = {"auth_tokens_inline": f"alice:{ALICE_TOKEN},bob:{BOB_TOKEN}"}
    state = {"durability": "snapshot", "state_dir": str(tmp_path / "state")}
    shared = "restart-id-0123456789abcdefXYZ"
    alice, bob = bearer(ALICE_TOKEN), bearer(BOB_TOKEN)
    with run_server(tiny_checkpoint, **tokens, **state) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        for who, text in ((alice, "abcdef"), (bob, "xy")):
            stub.CreateSession(pb.CreateSessionRequest(session_id=shared), metadata=who)
            stub.Step(pb.StepRequest(session_id=shared, text=text), metadata=who)
    with run_server(tiny_checkpoint, **tokens, **state) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        assert stub.GetSession(pb.GetSessionRequest(session_id=shared), metadata=alice).session.position == 6
        assert stub.GetSession(pb.GetSessionRequest(session_id=shared), metadata=bob).session.position == 2
        assert stub.Step(pb.StepRequest(session_id=shared, text="z", expected_position=2), metadata=bob).position == 3
