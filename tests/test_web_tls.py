"""TLS and basic auth for the listener, from a web config file in the exporter toolkit's format.

Real certificates made here (a CA, the server's, a client's), a real HTTPS client (urllib and
ssl with the CA), a real Prometheus scraping with `tls_config` and `basic_auth`, and
`promtool check web-config` reading the same file.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from conftest import free_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keepwarm.config import ConfigError, parse_config
from keepwarm.metrics import Metrics
from keepwarm.observations import Observer
from keepwarm.web import WebServer
from keepwarm.webconfig import load_web_config

PASSWORD = "correct horse battery staple"


class Pki:
    """A CA, and certificates it signs, written as PEM files in a directory."""

    def __init__(self, directory: Path, name: str = "test-ca") -> None:
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_file = directory / f"{name}.crt"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, server: bool = True) -> tuple[Path, Path, int]:
        """(cert file, key file, serial) of a certificate for 127.0.0.1 (server) or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        serial = x509.random_serial_number()
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(serial)
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_file, key_file = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_file, key_file, serial


def _hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()  # cost 4: fast enough for tests


def _write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def _web_config(tmp_path: Path, pki: Pki, **extra: Any) -> Path:
    cert, key, _ = pki.issue("server")
    doc: dict[str, Any] = {
        "tls_server_config": {"cert_file": cert.name, "key_file": key.name},
        "basic_auth_users": {"prometheus": _hash(PASSWORD)},
        "http_server_config": {"headers": {"Strict-Transport-Security": "max-age=31536000",
                                           "X-Content-Type-Options": "nosniff"}},
    }
    for section, values in extra.items():
        doc.setdefault(section, {}).update(values)
    return _write(tmp_path / "web.yml", doc)


class Served:
    def __init__(self, tmp_path: Path, web_file: Path, request_timeout: float = 10.0) -> None:
        config = parse_config({"experts": [{"name": "analyst", "system": [{"text": "x"}], "models": ["claude-sonnet-4-6"]}],
                               "observe": {"token_file": "token"}}, _token(tmp_path))
        self.metrics = Metrics()
        self.observer = Observer(config, self.metrics, b"obs-token")
        self.server = WebServer("127.0.0.1", 0, self.metrics, states=lambda: [], health=lambda: (True, "ok"),
                                observer=self.observer, live=lambda: (True, "alive"), request_timeout=request_timeout,
                                web=load_web_config(web_file))
        self.server.start()
        self.port = self.server.address[1]
        self.url = f"https://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.stop()


def _token(tmp_path: Path) -> Path:
    (tmp_path / "token").write_text("obs-token\n")
    return tmp_path


def _context(pki: Pki, client: tuple[Path, Path, int] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    if client is not None:
        ctx.load_cert_chain(client[0], client[1])
    return ctx


def _get(url: str, ctx: ssl.SSLContext, user: str | None = "prometheus", password: str = PASSWORD,
         method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    request = urllib.request.Request(url, method=method, data=body, headers=dict(headers or {}))
    if user is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10, context=ctx) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


@pytest.fixture
def served(tmp_path: Path, pki: Pki) -> Iterator[tuple[Served, Pki]]:
    s = Served(tmp_path, _web_config(tmp_path, pki), request_timeout=1.0)
    yield s, pki
    s.close()


def test_metrics_over_tls_need_the_password_and_the_probes_do_not(served: tuple[Served, Pki]) -> None:
    s, pki = served
    ctx = _context(pki)
    status, headers, body = _get(f"{s.url}/metrics", ctx)
    assert status == 200 and b"keepwarm_build_info" in body
    assert headers["Strict-Transport-Security"] == "max-age=31536000" and headers["X-Content-Type-Options"] == "nosniff"
    for user, password in ((None, ""), ("prometheus", "wrong"), ("nobody", PASSWORD)):
        status, headers, _ = _get(f"{s.url}/metrics", ctx, user, password)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic "), (user, password)
    assert _get(f"{s.url}/", ctx, None)[0] == 401, "the status page too"
    for probe in ("/healthz", "/readyz"):
        assert _get(f"{s.url}{probe}", ctx, None)[0] == 200, "a kubelet probe has no password to send"
    # Observations keep their own bearer token (one Authorization header cannot carry both).
    item = {"expert": "analyst", "model": "claude-sonnet-4-6", "usage": {"input_tokens": 3}}
    post = {"method": "POST", "body": json.dumps(item).encode(), "headers": {"Content-Type": "application/json"}}
    assert _get(f"{s.url}/v1/observations", ctx, None, **post)[0] == 401
    bearer = {**post, "headers": {**post["headers"], "Authorization": "Bearer obs-token"}}
    assert _get(f"{s.url}/v1/observations", ctx, None, **bearer)[0] == 202


def test_plain_http_and_a_stalled_handshake_are_closed_and_scrapes_go_on(served: tuple[Served, Pki]) -> None:
    s, pki = served
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{s.port}/healthz", timeout=5).read()
    with socket.create_connection(("127.0.0.1", s.port)) as silent:  # connects, never says hello
        silent.settimeout(10)
        assert _get(f"{s.url}/metrics", _context(pki))[0] == 200, "a silent client holds no worker"
        started = time.monotonic()
        assert silent.recv(1) == b"", "closed by the server"
        assert time.monotonic() - started < 8, "within the request timeout (1 s) and a maintenance round"


def test_client_certificates_when_the_config_requires_them(tmp_path: Path, pki: Pki) -> None:
    clients = Pki(tmp_path, "clients-ca")
    web = _web_config(tmp_path, pki, tls_server_config={"client_auth_type": "RequireAndVerifyClientCert",
                                                        "client_ca_file": clients.ca_file.name, "min_version": "TLS13"})
    s = Served(tmp_path, web)
    try:
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _get(f"{s.url}/metrics", _context(pki))
        stranger = Pki(tmp_path, "other-ca").issue("intruder", server=False)
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _get(f"{s.url}/metrics", _context(pki, stranger))
        assert _get(f"{s.url}/metrics", _context(pki, clients.issue("prometheus-client", server=False)))[0] == 200
        old = ssl.create_default_context(cafile=str(pki.ca_file))
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _get(f"{s.url}/healthz", old, None)
    finally:
        s.close()


def _peer_serial(port: int, pki: Pki) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with _context(pki).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def test_a_reload_takes_a_renewed_certificate_and_new_users_for_new_connections(served: tuple[Served, Pki],
                                                                                tmp_path: Path) -> None:
    s, pki = served
    first = _peer_serial(s.port, pki)
    cert, key, serial = pki.issue("renewed")
    _write(tmp_path / "web.yml", {"tls_server_config": {"cert_file": cert.name, "key_file": key.name},
                                  "basic_auth_users": {"grafana": _hash("other")}})
    s.server.apply_web(load_web_config(tmp_path / "web.yml"))
    assert _peer_serial(s.port, pki) == serial != first
    assert _get(f"{s.url}/metrics", _context(pki))[0] == 401
    assert _get(f"{s.url}/metrics", _context(pki), "grafana", "other")[0] == 200


def test_answers_are_remembered_so_a_scrape_costs_no_bcrypt(served: tuple[Served, Pki], monkeypatch: Any) -> None:
    import keepwarm.webconfig as module

    s, pki = served
    calls = []
    real = module._bcrypt_ok
    monkeypatch.setattr(module, "_bcrypt_ok", lambda p, h: calls.append(1) or real(p, h))
    for _ in range(3):
        assert _get(f"{s.url}/metrics", _context(pki))[0] == 200
    assert len(calls) == 1


PROBLEMS = [
    ({"tls_server_config": {"cert_file": "server.crt"}}, "tls_server_config.key_file: required for TLS"),
    ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", "cipher_suites": ["x"]}},
     "tls_server_config.cipher_suites: not supported by keepwarm's listener"),
    ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", "client_auth_type": "RequestClientCert"}},
     "tls_server_config.client_auth_type: 'RequestClientCert' is not supported"),
    ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key",
                            "client_auth_type": "RequireAndVerifyClientCert"}},
     "tls_server_config.client_ca_file: required with client_auth_type RequireAndVerifyClientCert"),
    ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", "min_version": "TLS10"}},
     "tls_server_config.min_version: 'TLS10' is not supported"),
    ({"tls_server_config": {"cert_file": "missing.crt", "key_file": "server.key"}},
     "tls_server_config: cannot load cert_file"),
    ({"basic_auth_users": {"alice": "hunter2"}}, "basic_auth_users.alice: expected a bcrypt hash"),
    ({"http_server_config": {"headers": {"Server": "x"}}}, "http_server_config.headers.Server: not a header"),
    ({"http_server_config": {"http2": True}}, "http_server_config.http2: only false is supported"),
    ({"rate_limit": {"interval": "1s"}}, "rate_limit: not supported"),
    ({"tls_config": {}}, "tls_config: unknown key; supported: basic_auth_users, http_server_config, tls_server_config"),
]


@pytest.mark.parametrize(("doc", "message"), PROBLEMS, ids=[m.split(":")[0] for _, m in PROBLEMS])
def test_what_the_listener_cannot_do_is_refused_naming_the_file_and_the_key(tmp_path: Path, pki: Pki,
                                                                           doc: dict[str, Any], message: str) -> None:
    cert, key, _ = pki.issue("server")
    path = _write(tmp_path / "web.yml", doc)
    with pytest.raises(ConfigError) as caught:
        load_web_config(path)
    assert any(p.startswith(f"web.config_file {path}: {message}") for p in caught.value.problems), caught.value.problems


def test_an_unreadable_file_and_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"web.config_file: cannot read .*missing.yml"):
        load_web_config(tmp_path / "missing.yml")
    config = parse_config({"experts": [{"name": "a", "system": [{"text": "x"}], "models": ["claude-sonnet-4-6"]}],
                           "web": {"config_file": "web.yml"}}, tmp_path)
    assert config.web_config_file == tmp_path / "web.yml", "relative to the config file"


def test_promtool_reads_the_same_file(tmp_path: Path, pki: Pki) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: scripts/test installs it (Debian package prometheus)"
    web = _web_config(tmp_path, pki)
    result = subprocess.run([promtool, "check", "web-config", str(web)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_over_tls_with_basic_auth(served: tuple[Served, Pki], tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    assert binary, "prometheus not found: scripts/test installs it (Debian package prometheus)"
    s, pki = served
    port = free_port()
    (tmp_path / "password").write_text(PASSWORD)
    config = _write(tmp_path / "prometheus.yml", {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
        "scrape_configs": [{
            "job_name": "keepwarm", "scheme": "https",
            "tls_config": {"ca_file": str(pki.ca_file)},
            "basic_auth": {"username": "prometheus", "password_file": str(tmp_path / "password")},
            "static_configs": [{"targets": [f"127.0.0.1:{s.port}"]}],
        }],
    })
    with (tmp_path / "prometheus.log").open("wb") as out:
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            end = time.monotonic() + 60
            while True:
                try:
                    query = urllib.parse.urlencode({"query": 'up{job="keepwarm"}'})
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{query}", timeout=5) as answer:
                        result = json.loads(answer.read())["data"]["result"]
                    if result and result[0]["value"][1] == "1":
                        break
                except (OSError, KeyError, ValueError):
                    pass
                assert time.monotonic() < end, (tmp_path / "prometheus.log").read_text()[-2000:]
                time.sleep(0.2)
        finally:
            proc.kill()
            proc.wait()


def test_the_daemon_serves_its_web_config_and_reloads_it_on_sighup(tmp_path: Path, pki: Pki) -> None:
    import signal

    from conftest import DaemonProcess, basic_doc, daemon_env, write_config

    web = _web_config(tmp_path, pki)
    port = free_port()
    doc = basic_doc(interval="3s", jitter="0s")
    doc["metrics"] = {"listen": f"127.0.0.1:{port}"}
    doc["web"] = {"config_file": web.name}
    daemon = DaemonProcess(write_config(tmp_path, doc), port, daemon_env(), ("--emulator",))
    try:
        daemon.wait_for("keepwarm started", lambda: daemon.started)
        assert f"https://127.0.0.1:{port}/metrics" in daemon.text(), "the start-up line says https"
        url = f"https://127.0.0.1:{port}"
        assert _get(f"{url}/metrics", _context(pki))[0] == 200
        first = _peer_serial(port, pki)
        # A broken file is refused at reload with its key named; the old settings keep serving.
        web.write_text(yaml.safe_dump({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key",
                                                             "cipher_suites": ["TLS_AES_128_GCM_SHA256"]}}))
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("the reload rejected", lambda: "tls_server_config.cipher_suites" in daemon.text())
        assert _peer_serial(port, pki) == first
        cert, key, serial = pki.issue("renewed")
        web.write_text(yaml.safe_dump({"tls_server_config": {"cert_file": cert.name, "key_file": key.name}}))
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("the renewed certificate", lambda: _peer_serial(port, pki) == serial)
        assert _get(f"{url}/metrics", _context(pki), None)[0] == 200, "no users any more: no password asked"
        assert daemon.stop()[0] == 0
    finally:
        if daemon.alive:
            daemon.proc.kill()


def test_a_bad_web_config_at_start_is_a_config_error(tmp_path: Path) -> None:
    from conftest import basic_doc, keepwarm_cmd, write_config

    _write(tmp_path / "web.yml", {"basic_auth_users": {"alice": "hunter2"}})
    doc = basic_doc()
    doc["web"] = {"config_file": "web.yml"}
    result = subprocess.run([*keepwarm_cmd("run", "--config", str(write_config(tmp_path, doc)), "--emulator")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 78, result.stderr[-2000:]
    assert "basic_auth_users.alice: expected a bcrypt hash" in result.stderr and "hunter2" not in result.stderr


def test_keepwarm_observe_sends_over_tls_verifying_the_certificate(served: tuple[Served, Pki],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from keepwarm import observe

    s, pki = served
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))  # how a deployment names a private CA
    sender = observe.Observer(s.url, token="obs-token")
    usage = {"input_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 2000, "output_tokens": 1}
    sender.record("analyst", "claude-sonnet-4-6", time.time(), [{"type": "text", "text": "x"}], None, usage)
    assert sender.flush(10)
    sender.close()
    labels = {"expert": "analyst", "model": "claude-sonnet-4-6", "result": "warm"}
    assert s.metrics.registry.get_sample_value("keepwarm_production_requests_total", labels) == 1
    monkeypatch.delenv("SSL_CERT_FILE")
    stranger = observe.Observer(s.url, token="obs-token", timeout=2)
    stranger.record("analyst", "claude-sonnet-4-6", time.time(), [{"type": "text", "text": "x"}], None, usage)
    stranger.flush(3)
    stranger.close()
    assert s.metrics.registry.get_sample_value("keepwarm_production_requests_total", labels) == 1, \
        "a certificate the client cannot verify gets nothing"


def test_basic_auth_without_tls_works_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    web = _write(tmp_path / "web.yml", {"basic_auth_users": {"prometheus": _hash(PASSWORD)}})
    s = Served(tmp_path, web)
    try:
        assert "passwords cross the network in clear" in caplog.text
        url = f"http://127.0.0.1:{s.port}"
        assert _get(f"{url}/metrics", ssl.create_default_context(), None)[0] == 401
        assert _get(f"{url}/metrics", ssl.create_default_context())[0] == 200
    finally:
        s.close()
