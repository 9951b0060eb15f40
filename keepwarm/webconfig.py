"""The listener's web config file: TLS and basic authentication, in the format Prometheus
exporters share (the exporter toolkit's `--web.config.file`), named by `web.config_file`.

```yaml
tls_server_config:
  cert_file: server.crt            # PEM; paths are relative to this file
  key_file: server.key
  client_auth_type: RequireAndVerifyClientCert   # optional: client certificates (mutual TLS)
  client_ca_file: clients-ca.crt
  min_version: TLS12               # TLS12 (default) or TLS13
  max_version: TLS13
basic_auth_users:                  # user: bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\\n')
  prometheus: $2y$10$...
http_server_config:
  headers:                         # added to every answer
    Strict-Transport-Security: max-age=31536000
```

What the toolkit has and this listener cannot do is refused by name rather than ignored
(`cipher_suites`, `http2: true`, ...): a file that asks for something must get it. Basic auth
guards `/metrics` and the status page; `/healthz` and `/readyz` stay open (a kubelet probe has
no password to send, and they say only "ok" or why not), and `POST /v1/observations` keeps its
own bearer token. The file is read at start and at every reload (SIGHUP).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import ssl
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from keepwarm.config import ConfigError

# Keys of the exporter toolkit's format this listener does not support: refused with a reason.
_UNSUPPORTED = {
    "tls_server_config.cert": "inline certificates: use cert_file",
    "tls_server_config.key": "inline keys: use key_file",
    "tls_server_config.client_ca": "an inline client CA: use client_ca_file",
    "tls_server_config.cipher_suites": "choosing cipher suites (Python's defaults are used)",
    "tls_server_config.curve_preferences": "choosing curves",
    "tls_server_config.prefer_server_cipher_suites": "choosing cipher suites",
    "tls_server_config.client_allowed_sans": "filtering client certificates by SAN",
    "rate_limit": "rate limiting (the listener bounds connections and workers instead)",
}
_TOP = {"tls_server_config", "basic_auth_users", "http_server_config", "rate_limit"}
_TLS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version", "cert", "key",
        "client_ca", "cipher_suites", "curve_preferences", "prefer_server_cipher_suites", "client_allowed_sans"}
_HTTP = {"headers", "http2"}
# The headers the exporter toolkit lets a web config set; anything else would be a surprise.
HEADERS = ("Strict-Transport-Security", "X-Content-Type-Options", "X-Frame-Options", "X-XSS-Protection",
           "Content-Security-Policy")
_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# client_auth_type -> how the handshake treats a client certificate. The toolkit's
# RequestClientCert and RequireAnyClientCert accept a certificate nobody verified: not offered.
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# bcrypt hashes as htpasswd -B and the toolkit's docs make them ($2y$) and as bcrypt does ($2b$, $2a$).
_BCRYPT_PREFIXES = (b"$2a$", b"$2b$", b"$2y$")
# bcrypt costs some 50 ms a check by design; a scraper sends the same credentials every 15 s.
_CACHE_SIZE = 256


@dataclass(frozen=True)
class TlsSettings:
    """`tls_server_config`, resolved: absolute paths and the handshake's settings."""

    cert_file: Path
    key_file: Path
    client_auth: ssl.VerifyMode = ssl.CERT_NONE
    client_ca_file: Path | None = None
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion | None = None

    def context(self) -> ssl.SSLContext:
        """A server context with the certificate loaded; raise ConfigError naming the file."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = self.min_version
        if self.max_version is not None:
            ctx.maximum_version = self.max_version
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([f"tls_server_config: cannot load cert_file {self.cert_file} with key_file"
                               f" {self.key_file}: {_reason(exc)}"]) from None
        ctx.verify_mode = self.client_auth
        if self.client_ca_file is not None:
            try:
                ctx.load_verify_locations(cafile=self.client_ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError([f"tls_server_config.client_ca_file: cannot load {self.client_ca_file}:"
                                   f" {_reason(exc)}"]) from None
        return ctx


@dataclass(frozen=True)
class WebSettings:
    """What a web config file asks of the listener (empty: plain HTTP, no authentication)."""

    path: Path | None = None
    tls: TlsSettings | None = None
    users: Mapping[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: tuple[tuple[str, str], ...] = ()
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def load_web_config(path: Path | None) -> WebSettings:
    """Read and check a web config file (None: none); raise ConfigError listing every problem,
    each naming the file and the key."""
    if path is None:
        return WebSettings()
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"web.config_file: cannot read {path}: {_reason(exc)}"]) from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError([f"web.config_file {path}: not YAML: {exc}"]) from None
    problems: list[str] = []
    settings = _parse(doc if doc is not None else {}, path, problems)
    if problems:
        raise ConfigError([f"web.config_file {path}: {p}" for p in problems])
    return settings


def _mapping(value: Any, where: str, problems: list[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping, got {type(value).__name__}")
        return {}
    return value


def _known(doc: dict[str, Any], allowed: set[str], prefix: str, problems: list[str]) -> None:
    supported = sorted(k for k in allowed if f"{prefix}{k}" not in _UNSUPPORTED)
    for key in doc:
        where = f"{prefix}{key}"
        if where in _UNSUPPORTED:
            problems.append(f"{where}: not supported by keepwarm's listener ({_UNSUPPORTED[where]})")
        elif key not in allowed:
            problems.append(f"{where}: unknown key; supported: {', '.join(supported)}")


def _parse(doc: Any, path: Path, problems: list[str]) -> WebSettings:
    top = _mapping(doc, "the file", problems)
    _known(top, _TOP, "", problems)
    base = path.parent
    tls = _parse_tls(_mapping(top.get("tls_server_config"), "tls_server_config", problems), base, problems)
    users = _parse_users(_mapping(top.get("basic_auth_users"), "basic_auth_users", problems), problems)
    http = _mapping(top.get("http_server_config"), "http_server_config", problems)
    _known(http, _HTTP, "http_server_config.", problems)
    if http.get("http2") not in (None, False):
        problems.append("http_server_config.http2: only false is supported (the listener speaks HTTP/1.1)")
    headers = []
    for name, value in _mapping(http.get("headers"), "http_server_config.headers", problems).items():
        if name not in HEADERS:
            problems.append(f"http_server_config.headers.{name}: not a header a web config may set; allowed: {', '.join(HEADERS)}")
        elif not isinstance(value, str) or any(c in value for c in "\r\n"):
            problems.append(f"http_server_config.headers.{name}: expected one line of text")
        else:
            headers.append((name, value))
    if problems:
        return WebSettings(path)
    settings = WebSettings(path, tls, users, tuple(headers))
    if tls is not None:
        try:
            return WebSettings(path, tls, users, tuple(headers), tls.context())
        except ConfigError as exc:
            problems.extend(exc.problems)
    return settings


def _parse_tls(doc: dict[str, Any], base: Path, problems: list[str]) -> TlsSettings | None:
    if not doc:
        return None
    _known(doc, _TLS, "tls_server_config.", problems)
    files: dict[str, Path] = {}
    for key in ("cert_file", "key_file", "client_ca_file"):
        value = doc.get(key)
        if value is None:
            if key != "client_ca_file":
                problems.append(f"tls_server_config.{key}: required for TLS")
        elif not isinstance(value, str) or not value:
            problems.append(f"tls_server_config.{key}: expected a file name")
        else:
            files[key] = base / value
    auth_name = doc.get("client_auth_type", "NoClientCert")
    auth = _CLIENT_AUTH.get(auth_name) if isinstance(auth_name, str) else None
    if auth is None:
        problems.append(f"tls_server_config.client_auth_type: {auth_name!r} is not supported; one of"
                        f" {', '.join(_CLIENT_AUTH)} (a certificate nobody verifies proves nothing)")
    elif auth is not ssl.CERT_NONE and "client_ca_file" not in files:
        problems.append(f"tls_server_config.client_ca_file: required with client_auth_type {auth_name}")
    bounds: dict[str, ssl.TLSVersion | None] = {}
    for key, default in (("min_version", "TLS12"), ("max_version", None)):
        name = doc.get(key, default)
        bounds[key] = _VERSIONS.get(name) if isinstance(name, str) else None
        if name is not None and bounds[key] is None:
            problems.append(f"tls_server_config.{key}: {name!r} is not supported; one of {', '.join(_VERSIONS)}")
    low, high = bounds["min_version"], bounds["max_version"]
    if low is not None and high is not None and high < low:
        problems.append("tls_server_config.max_version: below min_version")
    if problems or auth is None or low is None:
        return None
    return TlsSettings(files["cert_file"], files["key_file"], auth, files.get("client_ca_file"), low, high)


def _parse_users(doc: dict[str, Any], problems: list[str]) -> dict[str, bytes]:
    users: dict[str, bytes] = {}
    for user, hashed in doc.items():
        where = f"basic_auth_users.{user}"
        if not isinstance(user, str) or not user or ":" in user:
            problems.append(f"{where}: a user name is text without ':'")
        elif not isinstance(hashed, str) or not hashed.encode().startswith(_BCRYPT_PREFIXES) or len(hashed) != 60:
            problems.append(f"{where}: expected a bcrypt hash ($2y$..., 60 characters), never a password in clear")
        else:
            users[user] = hashed.encode()
    return users


class BasicAuth:
    """Checks `Authorization: Basic` against bcrypt hashes, remembering recent answers.

    A check costs a bcrypt hash (tens of milliseconds, on purpose); a scraper sends the same
    credentials every few seconds, so answers are kept by a digest of user, password and hash
    (never the password itself), as the exporter toolkit does.
    """

    def __init__(self, users: Mapping[str, bytes]) -> None:
        import bcrypt  # imported here: only a web config with users needs it

        self.users = dict(users)
        self._cache: OrderedDict[bytes, bool] = OrderedDict()
        self._lock = threading.Lock()
        # Checked against when the user is unknown, so that an unknown user costs what a known
        # one does and the answer's time does not tell which users exist.
        self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(10))

    def check(self, header: str | None) -> bool:
        """Whether an Authorization header carries a configured user's password."""
        scheme, _, encoded = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user_bytes, sep, password = decoded.partition(b":")
        if not sep:
            return False
        user = user_bytes.decode("utf-8", "replace")
        hashed = self.users.get(user)
        known = hashed is not None
        target = hashed if hashed is not None else self._dummy
        key = hashlib.sha256(b"\0".join((user_bytes, password, target))).digest()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached and known
        ok = _bcrypt_ok(password, target) and known
        with self._lock:
            self._cache[key] = ok
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return ok


def _bcrypt_ok(password: bytes, hashed: bytes) -> bool:
    import bcrypt

    try:
        return bool(bcrypt.checkpw(password, hashed))
    except ValueError:  # a malformed hash (refused at load) or a password over bcrypt's 72 bytes
        return False
