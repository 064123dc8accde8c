"""TLS, mutual TLS and bearer tokens, against a small in-process gRPC server that
implements GetModelInfo and checks the ``authorization`` metadata (lstm-serve itself runs
without authentication in the tests). Certificates are made with the openssl command."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from lstmserve_client import AsyncClient, Client, TlsConfig, Unauthenticated, Unavailable
from lstmserve_client.cli import main as cli_main
from lstmserve_client.proto import lstm_service_pb2 as pb
from lstmserve_client.proto import lstm_service_pb2_grpc as pb_grpc

TOKEN = "s3cret-token"
SERVER_NAME = "lstm.test"



def test_openssl_is_available() -> None:
    """The certificates below are made with the openssl command (Debian's openssl package)."""
    assert shutil.which("openssl"), "install the openssl command to run the TLS tests"


@dataclass
class Certs:
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes
    server_cert_path: Path


def _self_signed(directory: Path, name: str, cn: str) -> tuple[bytes, bytes, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={cn}",
            "-addext", f"subjectAltName=DNS:{cn}",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert.read_bytes(), key.read_bytes(), cert


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("certs")
    server_cert, server_key, server_path = _self_signed(d, "server", SERVER_NAME)
    client_cert, client_key, _ = _self_signed(d, "client", "lstm-client")
    return Certs(server_cert, server_key, client_cert, client_key, server_path)


class AuthServicer(pb_grpc.LstmServiceServicer):  # type: ignore[misc,unused-ignore]
    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    def GetModelInfo(self, request: Any, context: Any) -> Any:
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.seen.append(md)
        if md.get("authorization") != f"Bearer {TOKEN}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        return pb.GetModelInfoResponse(vocab=["a", "b"], cell_type=pb.CELL_TYPE_GRU, server_version="fake")


@dataclass
class FakeServer:
    target: str
    servicer: AuthServicer


def _serve(credentials: Any | None) -> Iterator[FakeServer]:
    servicer = AuthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_LstmServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call,unused-ignore]
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield FakeServer(f"127.0.0.1:{port}", servicer)
    finally:
        server.stop(grace=None)


@pytest.fixture
def tls_server(certs: Certs) -> Iterator[FakeServer]:
    yield from _serve(grpc.ssl_server_credentials([(certs.server_key, certs.server_cert)]))


@pytest.fixture
def mtls_server(certs: Certs) -> Iterator[FakeServer]:
    creds = grpc.ssl_server_credentials(
        [(certs.server_key, certs.server_cert)], root_certificates=certs.client_cert, require_client_auth=True
    )
    yield from _serve(creds)


@pytest.fixture
def plain_server() -> Iterator[FakeServer]:
    yield from _serve(None)


def test_token_over_plaintext(plain_server: FakeServer) -> None:
    with Client(plain_server.target, token=TOKEN) as c:
        assert c.model_info().cell_type == "gru"
    assert plain_server.servicer.seen[-1]["authorization"] == f"Bearer {TOKEN}"
    with Client(plain_server.target, token="wrong") as c:
        with pytest.raises(Unauthenticated) as info:
            c.model_info()
    assert info.value.code == "UNAUTHENTICATED" and "bearer token" in info.value.details
    with Client(plain_server.target) as c, pytest.raises(Unauthenticated):
        c.model_info()


def test_tls_with_token(tls_server: FakeServer, certs: Certs) -> None:
    tls = TlsConfig(root_certificates=certs.server_cert, server_name_override=SERVER_NAME)
    with Client(tls_server.target, tls=tls, token=TOKEN) as c:
        assert c.model_info().vocab == ["a", "b"]
    # Over TLS the token travels as call credentials, still "authorization: Bearer ...".
    assert tls_server.servicer.seen[-1]["authorization"] == f"Bearer {TOKEN}"
    with Client(tls_server.target, tls=tls) as c, pytest.raises(Unauthenticated):
        c.model_info()


def test_tls_rejects_an_untrusted_server(tls_server: FakeServer, certs: Certs) -> None:
    # System roots do not trust the self-signed certificate: the handshake fails.
    tls = TlsConfig(server_name_override=SERVER_NAME)
    with Client(tls_server.target, tls=tls, token=TOKEN, timeout=5) as c, pytest.raises(Unavailable):
        c.model_info()
    # Plaintext against a TLS port fails too.
    with Client(tls_server.target, timeout=5) as c, pytest.raises(Unavailable):
        c.model_info()


def test_mutual_tls(mtls_server: FakeServer, certs: Certs) -> None:
    tls = TlsConfig(
        root_certificates=certs.server_cert,
        certificate_chain=certs.client_cert,
        private_key=certs.client_key,
        server_name_override=SERVER_NAME,
    )
    with Client(mtls_server.target, tls=tls, token=TOKEN) as c:
        assert c.model_info().server_version == "fake"
    no_client_cert = TlsConfig(root_certificates=certs.server_cert, server_name_override=SERVER_NAME)
    with Client(mtls_server.target, tls=no_client_cert, token=TOKEN, timeout=5) as c, pytest.raises(Unavailable):
        c.model_info()


async def test_async_tls_with_token(tls_server: FakeServer, certs: Certs) -> None:
    tls = TlsConfig(root_certificates=certs.server_cert, server_name_override=SERVER_NAME)
    async with AsyncClient(tls_server.target, tls=tls, token=TOKEN) as c:
        assert (await c.model_info()).cell_type == "gru"
    async with AsyncClient(tls_server.target, tls=tls, token="wrong") as c:
        with pytest.raises(Unauthenticated):
            await c.model_info()


def test_cli_tls_and_token(tls_server: FakeServer, certs: Certs, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--target", tls_server.target, "--ca-cert", str(certs.server_cert_path), "--server-name", SERVER_NAME]
    assert cli_main(base + ["--token", TOKEN, "info"]) == 0
    assert "cell type:          gru" in capsys.readouterr().out
    assert cli_main(base + ["info"]) == 1
    err = capsys.readouterr().err
    assert err == "lstm-client: error: UNAUTHENTICATED: missing or wrong bearer token\n"
