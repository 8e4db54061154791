"""Transport security and bearer tokens: TLS, mutual TLS and tokens over real gRPC on
loopback, with the real exported model and certificates made here; the settings and their
start-up checks; and no token in any log."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving import (
    VENV_BIN,
    server_thread,
    start_server_process,
    stop_process,
    wait_serving,
)
from vae_client import AsyncVaeClient, VaeClient, VaeError
from vae_client.__main__ import main as client_main
from vae_client.bench import run_bench
from vae_client.channel import Security, read_token_file
from vae_core.ports import free_port
from vae_server.config import SettingsError, build_parser, load_settings

TOKENS = ("tok-alpha-0123456789abcdef", "tok-bravo-fedcba9876543210")
WRONG_TOKEN = "tok-wrong-5a5a5a5a5a5a5a5a"
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


# -- certificates ---------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None
           ) -> None:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))


def _make_ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _issue(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], cn: str, server: bool
           ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder()
               .subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


@dataclass(frozen=True)
class Pki:
    """ca.pem signed server.pem/.key (localhost, 127.0.0.1) and client.pem/.key; other_ca.pem,
    unrelated, signed other_client.pem/.key."""

    root: Path

    def __getattr__(self, name: str) -> str:
        stem, _, ext = name.rpartition("_")
        return str(self.root / f"{stem}.{ext}")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca, other_ca = _make_ca("vae test CA"), _make_ca("another CA")
    _write(root / "ca", ca[0])
    _write(root / "other_ca", other_ca[0])
    _write(root / "server", *_issue(ca, "localhost", server=True))
    _write(root / "client", *_issue(ca, "vae test client", server=False))
    _write(root / "other_client", *_issue(other_ca, "someone else", server=False))
    return Pki(root)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# accepted tokens\n\n{TOKENS[0]}\n  {TOKENS[1]}  \n# {WRONG_TOKEN}\n")
    return str(path)


def _refused(call, *codes: grpc.StatusCode) -> VaeError:
    with pytest.raises(VaeError) as err:
        call()
    assert err.value.code in (codes or (grpc.StatusCode.UNAVAILABLE,)), err.value
    return err.value


# -- settings and start-up checks -----------------------------------------------------------


def test_security_settings_come_from_flags_and_environment(pki, token_file):
    s = load_settings(["--tls-cert", pki.server_pem, "--tls-key", pki.server_key,
                       "--auth-token-file", token_file], env={})
    assert s.tls and not s.tls_client_ca and s.auth_tokens == TOKENS
    env = {"VAE_TLS_CERT": pki.server_pem, "VAE_TLS_KEY": pki.server_key,
           "VAE_TLS_CLIENT_CA": pki.ca_pem, "VAE_AUTH_TOKENS": f" extra-token , {TOKENS[0]},",
           "VAE_AUTH_TOKEN_FILE": token_file}
    s = load_settings([], env=env)
    assert (s.tls_cert, s.tls_key, s.tls_client_ca) == (pki.server_pem, pki.server_key,
                                                        pki.ca_pem)
    assert s.auth_tokens == ("extra-token", *TOKENS)  # the environment's first, no repeats
    assert not any(t in repr(s) for t in s.auth_tokens)  # logging the settings leaks nothing
    assert load_settings([], env={}).auth_tokens == ()
    # Set and blank: a Kubernetes secret's empty key. Before: "" and "   " served without
    # tokens (" , " was refused).
    for blank in ("", "   "):
        with pytest.raises(SettingsError, match="VAE_AUTH_TOKENS is set but holds no token"):
            load_settings([], env={"VAE_AUTH_TOKENS": blank})


def test_tokens_have_no_command_line_flag():
    text = build_parser(env={}).format_help()
    assert "--auth-token-file" in text and "VAE_AUTH_TOKENS" in text
    assert "--auth-tokens" not in text
    with pytest.raises(SettingsError, match="--auth-tokens"):
        load_settings(["--auth-tokens", "secret"], env={})


def _bad_settings(pki: Pki, tmp: Path) -> dict[str, tuple[list[str], dict[str, str], str]]:
    (tmp / "empty").write_text("# nothing but comments\n\n")
    (tmp / "spaced").write_text("good-token\nhas a space\n")
    (tmp / "junk.pem").write_text("not a certificate\n")
    return {  # name: (argv, env, words the message must hold)
        "cert without key": (["--tls-cert", pki.server_pem], {}, "--tls-key"),
        "key without cert": (["--tls-key", pki.server_key], {}, "--tls-cert"),
        "client CA without TLS": (["--tls-client-ca", pki.ca_pem], {}, "needs TLS"),
        "unreadable cert": (["--tls-cert", str(tmp / "missing.pem"), "--tls-key",
                             pki.server_key], {}, "cannot read --tls-cert"),
        "unreadable client CA": (["--tls-cert", pki.server_pem, "--tls-key", pki.server_key,
                                  "--tls-client-ca", str(tmp / "nope")], {}, "cannot read"),
        "not PEM": (["--tls-cert", str(tmp / "junk.pem"), "--tls-key", pki.server_key], {},
                    "holds no PEM certificate"),
        "key of another cert": (["--tls-cert", pki.server_pem, "--tls-key", pki.client_key],
                                {}, "not a usable pair"),
        "unreadable token file": (["--auth-token-file", str(tmp / "gone")], {},
                                  "cannot read --auth-token-file"),
        "empty token file": (["--auth-token-file", str(tmp / "empty")], {}, "holds no token"),
        "token with a space": (["--auth-token-file", str(tmp / "spaced")], {}, "line 2"),
        "empty token list": ([], {"VAE_AUTH_TOKENS": " , "}, "holds no token"),
        # Before: accepted, and gRPC refused calls carrying it at random (its metadata soft
        # limit) with RESOURCE_EXHAUSTED, which clients retry as a full queue.
        "token too long": ([], {"VAE_AUTH_TOKENS": "t" * 12_000},
                           "token 1 is not printable ASCII without spaces, at most 4096"),
    }


BAD = ["cert without key", "key without cert", "client CA without TLS", "unreadable cert",
       "unreadable client CA", "not PEM", "key of another cert", "unreadable token file",
       "empty token file", "token with a space", "empty token list", "token too long"]


@pytest.mark.parametrize("case", BAD)
def test_bad_security_settings_stop_the_start_with_a_clear_message(case, pki, tmp_path):
    argv, env, words = _bad_settings(pki, tmp_path)[case]
    with pytest.raises(SettingsError) as exc:
        load_settings(argv, env=env)
    message = str(exc.value)
    assert words in message, message
    assert "good-token" not in message and "has a space" not in message


def test_the_server_program_refuses_a_bad_pair(pki):
    proc = subprocess.run([str(VENV_BIN / "vae-server"), "--tls-cert", pki.server_pem],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("vae-server: --tls-cert needs --tls-key too (TLS takes a "
                                   "certificate and its private key)")


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(model_dir, pki):
    with server_thread(model_dir, tls_cert=pki.server_pem, tls_key=pki.server_key) as srv:
        yield srv


# A refused handshake is UNAVAILABLE, which clients retry by default: these tests want the
# refusal itself, at once.
NO_RETRY = 0


def test_tls_connects_with_the_servers_ca(tls_server, pki):
    with VaeClient(tls_server.target, timeout=10, tls_ca=pki.ca_pem) as client:
        assert client.info().latent_dim > 0
        assert client.sample(3, seed=1).shape == (3, 28, 28)
    # By name rather than address, and with the CA as bytes.
    port = tls_server.running.port
    with VaeClient(f"localhost:{port}", timeout=10,
                   tls_ca=Path(pki.ca_pem).read_bytes()) as client:
        assert client.info().latent_dim > 0

    async def over_asyncio() -> int:
        async with AsyncVaeClient(tls_server.target, timeout=10, tls_ca=pki.ca_pem) as client:
            chunks = [c async for _, c in client.sample_stream(10, seed=2, chunk_size=4)]
            return sum(len(c) for c in chunks)

    assert asyncio.run(over_asyncio()) == 10


def test_tls_refuses_a_client_that_trusts_another_ca(tls_server, pki):
    with VaeClient(tls_server.target, timeout=10, retries=NO_RETRY, tls_ca=pki.other_ca_pem) as client:
        _refused(client.info)
    with VaeClient(tls_server.target, timeout=10, retries=NO_RETRY, tls=True) as client:  # the system's roots
        _refused(client.info)


def test_the_cli_s_failed_handshake_is_its_one_line_alone(tls_server, pki):
    """Before: four of gRPC's own "I... ssl_transport_security.cc:2563] Handshake failed"
    lines came above vae-client's one-line error. GRPC_VERBOSITY from the environment still
    wins."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    argv = [str(VENV_BIN / "vae-client"), "--target", tls_server.target, "--timeout", "5",
            "--tls-ca", pki.other_ca_pem, "info"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("vae-client: error: "), \
        proc.stderr
    loud = subprocess.run(argv, env={**env, "GRPC_VERBOSITY": "INFO"}, capture_output=True,
                          text=True, timeout=60)
    assert "Handshake failed" in loud.stderr, loud.stderr


def test_tls_refuses_plaintext_and_a_wrong_server_name(tls_server, pki):
    with VaeClient(tls_server.target, timeout=10, retries=NO_RETRY) as client:
        _refused(client.info)
    with VaeClient(tls_server.target, timeout=10, retries=NO_RETRY, tls_ca=pki.ca_pem,
                   tls_server_name="vae.example.org") as client:
        _refused(client.info)


# -- mutual TLS -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls_server(model_dir, pki):
    with server_thread(model_dir, tls_cert=pki.server_pem, tls_key=pki.server_key,
                       tls_client_ca=pki.ca_pem) as srv:
        yield srv


def test_mutual_tls_connects_with_a_client_certificate_of_its_ca(mtls_server, pki):
    with VaeClient(mtls_server.target, timeout=10, tls_ca=pki.ca_pem, tls_cert=pki.client_pem,
                   tls_key=pki.client_key) as client:
        assert client.decode(client.encode(client.sample(2, seed=3))[0]).shape == (2, 28, 28)

    async def over_asyncio() -> int:
        async with AsyncVaeClient(mtls_server.target, timeout=10, tls_ca=pki.ca_pem,
                                  tls_cert=pki.client_pem, tls_key=pki.client_key) as client:
            return (await client.info()).latent_dim

    assert asyncio.run(over_asyncio()) > 0


def test_mutual_tls_refuses_a_client_without_a_certificate(mtls_server, pki):
    with VaeClient(mtls_server.target, timeout=10, retries=NO_RETRY, tls_ca=pki.ca_pem) as client:
        _refused(client.info)


def test_mutual_tls_refuses_a_client_certificate_of_another_ca(mtls_server, pki):
    with VaeClient(mtls_server.target, timeout=10, retries=NO_RETRY, tls_ca=pki.ca_pem,
                   tls_cert=pki.other_client_pem, tls_key=pki.other_client_key) as client:
        _refused(client.info)


def test_mutual_tls_refuses_a_client_that_trusts_another_ca(mtls_server, pki):
    with VaeClient(mtls_server.target, timeout=10, retries=NO_RETRY, tls_ca=pki.other_ca_pem,
                   tls_cert=pki.client_pem, tls_key=pki.client_key) as client:
        _refused(client.info)


# -- bearer tokens --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server(model_dir, token_file):
    with server_thread(model_dir, auth_token_file=token_file) as srv:
        yield srv


def _rejected(srv) -> float:
    return srv.running.metrics.registry.get_sample_value(
        "vae_rejected_total", {"reason": "unauthenticated"})


def _handled(srv, method: str, code: str) -> float:
    value = srv.running.metrics.registry.get_sample_value("grpc_server_handled_total", {
        "grpc_service": "vae.v1.VaeService", "grpc_method": method,
        "grpc_type": "server_stream" if method == "SampleStream" else "unary",
        "grpc_code": code})
    return value or 0.0


def test_a_missing_or_wrong_token_is_unauthenticated_and_counted(token_server):
    srv = token_server
    before = (_rejected(srv), _handled(srv, "GetModelInfo", "Unauthenticated"),
              _handled(srv, "SampleStream", "Unauthenticated"))
    with VaeClient(srv.target, timeout=10) as client:
        missing = _refused(client.info, UNAUTH)
        assert "missing bearer token" in missing.details
        _refused(lambda: list(client.sample_stream(5, seed=1)), UNAUTH)
    with VaeClient(srv.target, timeout=10, token=WRONG_TOKEN) as client:
        wrong = _refused(client.info, UNAUTH)
        assert "not accepted" in wrong.details and WRONG_TOKEN not in wrong.details
    # Another scheme, and a token that is only a prefix of a right one.
    for value in (f"Basic {TOKENS[0]}", f"Bearer {TOKENS[0][:-1]}"):
        with grpc.insecure_channel(srv.target) as ch:
            info = ch.unary_unary("/vae.v1.VaeService/GetModelInfo")
            with pytest.raises(grpc.RpcError) as err:
                info(b"", metadata=(("authorization", value),), timeout=10)
            assert err.value.code() == UNAUTH and TOKENS[0][:-1] not in err.value.details()
    # Counted as rejections, and by the gRPC metrics as handled with UNAUTHENTICATED: the
    # token check runs inside the metrics' wrapper of each handler.
    after = (_rejected(srv), _handled(srv, "GetModelInfo", "Unauthenticated"),
             _handled(srv, "SampleStream", "Unauthenticated"))
    assert [a - b for a, b in zip(after, before, strict=True)] == [5, 4, 1]


def test_every_configured_token_is_accepted(token_server):
    srv = token_server
    before = _rejected(srv)
    for token in TOKENS:
        with VaeClient(srv.target, timeout=10, token=token) as client:
            assert client.info().latent_dim > 0
            assert sum(len(c) for _, c in client.sample_stream(9, seed=1, chunk_size=4)) == 9
    # Lower-case scheme, as RFC 7235 allows.
    with grpc.insecure_channel(srv.target) as ch:
        info = ch.unary_unary("/vae.v1.VaeService/GetModelInfo")
        info(b"", metadata=(("authorization", f"bearer {TOKENS[1]}"),), timeout=10)
    assert _rejected(srv) == before
    assert _handled(srv, "GetModelInfo", "OK") >= 3

    async def over_asyncio() -> tuple[int, grpc.StatusCode]:
        async with AsyncVaeClient(srv.target, timeout=10, token=TOKENS[1]) as client:
            n = sum([len(c) async for _, c in client.sample_stream(6, seed=1, chunk_size=4)])
        async with AsyncVaeClient(srv.target, timeout=10) as client:
            try:
                await client.info()
            except VaeError as err:
                return n, err.code
        return n, grpc.StatusCode.OK

    assert asyncio.run(over_asyncio()) == (6, UNAUTH)


def test_health_and_reflection_need_no_token(token_server):
    before = _rejected(token_server)
    with grpc.insecure_channel(token_server.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "vae.v1.VaeService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
        [reply] = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for s in reply.list_services_response.service}
        assert {"vae.v1.VaeService", "grpc.health.v1.Health"} <= names
    assert _rejected(token_server) == before


def test_the_token_file_of_the_client(tmp_path):
    path = tmp_path / "token"
    path.write_text("# mine\n\n  the-token  \n")
    assert read_token_file(path) == "the-token"
    path.write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="exactly one token, not 2"):
        read_token_file(path)
    with pytest.raises(ValueError) as err:
        Security.from_options(token="two words")
    assert "two words" not in str(err.value)
    with pytest.raises(ValueError, match="go together"):
        Security.from_options(tls_cert=b"x")
    assert "the-token" not in repr(Security.from_options(token="the-token"))


def test_a_client_warns_where_its_token_would_leave_the_host_in_clear_text(pki):
    """Before: a token went over plaintext to any host without a word (the server warns
    about plaintext tokens at its start; the caller never saw that)."""
    import warnings

    from vae_client.channel import leaves_host

    local = ["127.0.0.1:50051", "localhost:50051", "[::1]:50051", "dns:///localhost:50051",
             "ipv4:127.0.0.1:1,127.0.0.2:2", "ipv6:[::1]:50051", "unix:/tmp/vae.sock",
             "unix-abstract:vae"]
    away = ["10.0.0.7:50051", "vae.example.com:50051", "dns:///vae:50051",
            "ipv4:127.0.0.1:1,10.0.0.1:2", "[2001:db8::1]:50051", "xds:///vae"]
    assert [t for t in local if leaves_host(t)] == []
    assert [t for t in away if not leaves_host(t)] == []
    with pytest.warns(UserWarning, match="the bearer token goes to 10.0.0.7:50051 in clear "
                                         "text"):
        VaeClient("10.0.0.7:50051", token="the-token").close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none: loopback, no token, or TLS
        VaeClient("127.0.0.1:50051", token="the-token").close()
        VaeClient("10.0.0.7:50051").close()
        VaeClient("10.0.0.7:50051", token="the-token", tls=True,
                  tls_ca=pki.ca_pem).close()


def test_the_cli_says_so_on_one_line(capsys, monkeypatch):
    from vae_client.__main__ import main

    monkeypatch.setenv("VAE_TOKEN", "the-token")
    # Nothing listens there: the warning comes as the channel is made, then the error.
    assert main(["--target", "192.0.2.1:9", "--timeout", "1", "info"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("vae-client: warning: the bearer token goes to 192.0.2.1:9 in clear "
                      "text (no TLS): anyone on the network between can read it and call as "
                      "you"), err
    assert "the-token" not in "\n".join(err)


def test_workers_started_again_serve_the_certificate_the_server_started_with(
        pki, tmp_path, monkeypatch):
    """Before: each worker read the TLS files as it started, a replacement too. Files
    changed since (a certificate rotated without a restart) put two certificates on one
    port, and a certificate replaced before its key made every replacement fail, the server
    NOT_SERVING. The supervisor reads them once, at its start, and hands each worker the
    bytes."""
    import shutil

    from vae_server.workers import Supervisor

    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    shutil.copy(pki.server_pem, cert)
    shutil.copy(pki.server_key, key)
    started = (key.read_bytes(), cert.read_bytes())
    supervisor = Supervisor(load_settings(["--model-dir", "unused", "--workers", "2",
                                           "--tls-cert", str(cert), "--tls-key", str(key)],
                                          env={}))
    shutil.copy(pki.client_pem, cert)  # rotated: another certificate, its key not yet
    given: list[tuple[object, ...]] = []

    class Process:  # the worker as started: its arguments
        def __init__(self, target: object, args: tuple[object, ...], name: str,
                     daemon: bool) -> None:
            given.append(args)

        def start(self) -> None:
            pass

    monkeypatch.setattr(supervisor._context, "Process", Process)
    supervisor._start(1)
    (args,) = given
    tls = args[-1]
    assert (tls.key, tls.cert, tls.client_ca) == (*started, None)
    assert "PRIVATE KEY" not in repr(tls) and "PRIVATE KEY" not in repr(args)  # a log's


# -- everything at once: mutual TLS and tokens, from the CLI and the load generator ----------


@pytest.fixture(scope="module")
def locked_server(model_dir, pki, token_file):
    with server_thread(model_dir, tls_cert=pki.server_pem, tls_key=pki.server_key,
                       tls_client_ca=pki.ca_pem, auth_token_file=token_file) as srv:
        yield srv


def test_cli_with_mutual_tls_and_a_token(locked_server, pki, token_file, tmp_path, capsys,
                                         monkeypatch):
    monkeypatch.delenv("VAE_TOKEN", raising=False)
    tls = ["--target", locked_server.target, "--timeout", "10", "--tls-ca", pki.ca_pem,
           "--tls-cert", pki.client_pem, "--tls-key", pki.client_key]
    one = tmp_path / "token"
    one.write_text(TOKENS[1] + "\n")
    assert client_main([*tls, "--token-file", str(one), "info", "--json"]) == 0
    assert '"latent_dim"' in capsys.readouterr().out

    monkeypatch.setenv("VAE_TOKEN", TOKENS[0])
    assert client_main([*tls, "info"]) == 0
    capsys.readouterr()

    monkeypatch.setenv("VAE_TOKEN", WRONG_TOKEN)
    assert client_main([*tls, "info"]) == 1
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED" in err and WRONG_TOKEN not in err

    monkeypatch.delenv("VAE_TOKEN")
    assert client_main([*tls, "info"]) == 1
    assert "missing bearer token" in capsys.readouterr().err
    assert client_main([*tls, "--token-file", token_file, "info"]) == 1  # two tokens
    assert "exactly one token" in capsys.readouterr().err
    assert client_main(["--target", locked_server.target, "--tls-ca", pki.ca_pem,
                        "--tls-cert", pki.client_pem, "info"]) == 1
    assert "--tls-key" in capsys.readouterr().err


def test_cli_names_its_own_flags_for_a_bad_file(pki, tmp_path, capsys):
    """Before: "cannot read tls_ca nope.pem", the library's argument, not the flag."""
    text = tmp_path / "text.txt"
    text.write_text("not a certificate\n")
    for flag, path, words in (("--tls-ca", str(tmp_path / "nope.pem"), "cannot read --tls-ca"),
                              ("--tls-ca", str(text), "--tls-ca " + str(text) + " holds no PEM")):
        assert client_main(["--target", "127.0.0.1:1", flag, path, "info"]) == 1
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    assert client_main(["--target", "127.0.0.1:1", "--tls-cert", pki.client_pem, "--tls-key",
                        str(text), "info"]) == 1
    assert "--tls-key " + str(text) + " holds no PEM private key" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cannot read tls_ca"):  # the library's own names
        Security.from_options(tls_ca=str(tmp_path / "nope.pem"))


def test_cli_refuses_a_bad_pair_or_ca_file_in_one_line_before_connecting(pki, tmp_path,
                                                                         capsys):
    """Before: gRPC found them at the handshake, after seconds of retries: several C-core
    lines ("Invalid private key.", "Handshaker factory creation failed"), then UNAVAILABLE
    "Failed to create security handshaker", which names neither the file nor the option."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n"
                       "-----END CERTIFICATE-----\n")
    for flags, words in (
            (["--tls-ca", pki.ca_pem, "--tls-cert", pki.client_pem, "--tls-key",
              pki.server_key], f"--tls-cert {pki.client_pem} and --tls-key {pki.server_key} "
                               "are not a usable pair"),
            (["--tls-ca", str(garbage)], f"--tls-ca {garbage}: not usable as CA certificates")):
        assert client_main(["--target", f"127.0.0.1:{free_port()}", *flags, "info"]) == 1
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    with pytest.raises(ValueError, match="tls_cert .* and tls_key .* are not a usable pair"):
        Security.from_options(tls_cert=pki.client_pem, tls_key=pki.server_key)
    with pytest.raises(ValueError, match="tls_ca: not usable as CA certificates"):
        Security.from_options(tls_ca=garbage.read_bytes())
    # PEM bytes with text outside the blocks, not all ASCII, are CA certificates still.
    pem = Path(pki.ca_pem).read_bytes()
    assert Security.from_options(tls_ca="# Zertifizierungsstelle für Tests\n".encode() + pem)
    with pytest.raises(ValueError, match="tls_ca: not usable as CA certificates"):
        Security.from_options(tls_ca=b"")


def test_load_generator_with_mutual_tls_and_a_token(locked_server, pki):
    security = Security.from_options(tls_ca=pki.ca_pem, tls_cert=pki.client_pem,
                                     tls_key=pki.client_key, token=TOKENS[0])
    result = asyncio.run(run_bench(locked_server.target, "decode", concurrency=2,
                                   duration=0.3, warmup=0.0, security=security))
    assert result.calls > 0 and result.errors == {}
    wrong = Security.from_options(tls_ca=pki.ca_pem, tls_cert=pki.client_pem,
                                  tls_key=pki.client_key, token=WRONG_TOKEN)
    with pytest.raises(VaeError) as err:  # its first call, GetModelInfo
        asyncio.run(run_bench(locked_server.target, "decode", duration=0.2, warmup=0.0,
                              security=wrong))
    assert err.value.code == UNAUTH


def test_the_load_generator_command_with_a_wrong_token_says_so_in_a_line(
        locked_server, pki, capsys, monkeypatch):
    monkeypatch.setenv("VAE_TOKEN", WRONG_TOKEN)
    assert client_main(["--target", locked_server.target, "--tls-ca", pki.ca_pem,
                        "--tls-cert", pki.client_pem, "--tls-key", pki.client_key,
                        "bench", "--method", "decode", "--duration", "0.2"]) == 1
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED" in err and WRONG_TOKEN not in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# -- no token in the log --------------------------------------------------------------------


def test_no_token_ever_reaches_the_servers_log(model_dir):
    port = free_port()
    target = f"127.0.0.1:{port}"
    proc = start_server_process(model_dir, port, "--log-level", "DEBUG", "--warmup-rounds", "1",
                                env={"VAE_AUTH_TOKENS": TOKENS[0]})
    try:
        wait_serving(target, proc)  # health is open: no token needed to probe
        with VaeClient(target, timeout=10) as client:
            _refused(client.info, UNAUTH)
        with VaeClient(target, timeout=10, token=WRONG_TOKEN) as client:
            _refused(client.info, UNAUTH)
        with VaeClient(target, timeout=10, token=TOKENS[0]) as client:
            assert client.info().latent_dim > 0
    finally:
        stop_process(proc)
    log = proc.stdout.read()
    assert "bearer tokens on (1 token)" in log
    assert "UNAUTHENTICATED /vae.v1.VaeService/GetModelInfo" in log  # DEBUG was on
    assert TOKENS[0] not in log and WRONG_TOKEN not in log
