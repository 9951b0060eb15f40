"""What TLS and basic auth cost the listener, and bcrypt from the package against the stdlib.

    python3 bench/web_auth.py [--pairs 2000] [--scrapes 40]

1. A basic-auth check: one bcrypt verification at cost 10 (what `htpasswd -B` makes) with the
   `bcrypt` package and with the deprecated `crypt` module (libxcrypt), median of 7 each; and
   what keepwarm's BasicAuth answers for credentials it has seen (a digest lookup).
2. Scrape latency of /metrics (gzip, --pairs pairs' series) from `keepwarm.web.WebServer` on
   loopback: plain HTTP, HTTPS, and HTTPS with basic auth, each on a new connection per scrape
   (as Prometheus' first scrape, the worst case) and on one kept-alive connection; p50 and max.

Results go to bench/results/web-auth.json. Seconds, not minutes; only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import http.client
import ipaddress
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import bcrypt
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keepwarm.config import parse_config  # noqa: E402
from keepwarm.metrics import Metrics  # noqa: E402
from keepwarm.web import WebServer  # noqa: E402
from keepwarm.webconfig import BasicAuth, load_web_config  # noqa: E402

PASSWORD = b"correct horse battery staple"


def _median_ms(fn: Any, n: int = 7) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 2)


def bcrypt_costs() -> dict[str, Any]:
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(10))
    out: dict[str, Any] = {"cost": 10, "bcrypt_package_ms": _median_ms(lambda: bcrypt.checkpw(PASSWORD, hashed)),
                           "bcrypt_version": bcrypt.__version__}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt  # noqa: PLC0415 - deprecated, measured for the comparison only

            ok = crypt.crypt(PASSWORD.decode(), hashed.decode()) == hashed.decode()
            out["crypt_module_ms"] = _median_ms(lambda: crypt.crypt(PASSWORD.decode(), hashed.decode()))
            out["crypt_module_checks_bcrypt"] = ok
        except ImportError:
            out["crypt_module_ms"] = None
    auth = BasicAuth({"prometheus": hashed})
    header = "Basic " + base64.b64encode(b"prometheus:" + PASSWORD).decode()
    auth.check(header)
    t = time.perf_counter()
    for _ in range(1000):
        auth.check(header)
    out["remembered_check_us"] = round((time.perf_counter() - t) / 1000 * 1e6, 2)
    return out


def _pki(directory: Path) -> tuple[Path, Path, Path]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-ca")])
    now = datetime.datetime.now(datetime.UTC)
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "server")]))
            .issuer_name(name).public_key(key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def scrapes(pairs: int, count: int) -> dict[str, Any]:
    import ssl

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        ca, cert, key = _pki(directory)
        doc = {"experts": [{"name": f"e{i}", "system": [{"text": "x"}], "models": ["claude-sonnet-4-6"]} for i in range(pairs)]}
        config = parse_config(doc, directory)
        metrics = Metrics()
        for pair in config.pairs:
            metrics.add_pair(pair)
        hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(10)).decode()
        variants = {
            "http": {},
            "https": {"tls_server_config": {"cert_file": cert.name, "key_file": key.name}},
            "https_basic_auth": {"tls_server_config": {"cert_file": cert.name, "key_file": key.name},
                                 "basic_auth_users": {"prometheus": hashed}},
        }
        ctx = ssl.create_default_context(cafile=str(ca))
        headers = {"Accept-Encoding": "gzip", "Authorization": "Basic " + base64.b64encode(b"prometheus:" + PASSWORD).decode()}
        out: dict[str, Any] = {}
        for name, web_doc in variants.items():
            path = directory / f"{name}.yml"
            path.write_text(yaml.safe_dump(web_doc))
            server = WebServer("127.0.0.1", 0, metrics, states=lambda: [], health=lambda: (True, "ok"),
                               web=load_web_config(path))
            server.start()
            port = server.address[1]

            def connect(name: str = name, port: int = port) -> http.client.HTTPConnection:
                if name == "http":
                    return http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                return http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=ctx)

            try:
                for mode in ("new_connection", "kept_alive"):
                    times = []
                    conn = connect()
                    for _ in range(count):
                        if mode == "new_connection":
                            conn.close()
                            conn = connect()
                        t = time.perf_counter()
                        conn.request("GET", "/metrics", headers=headers)
                        answer = conn.getresponse()
                        body = answer.read()
                        assert answer.status == 200, (name, answer.status)
                        times.append((time.perf_counter() - t) * 1000)
                    conn.close()
                    out[f"{name}_{mode}"] = {"p50_ms": round(statistics.median(times), 2),
                                             "max_ms": round(max(times), 2), "gzip_bytes": len(body)}
            finally:
                server.stop()
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--scrapes", type=int, default=40)
    args = parser.parse_args()
    result = {"pairs": args.pairs, "scrapes": args.scrapes, "bcrypt": bcrypt_costs(),
              "scrape": scrapes(args.pairs, args.scrapes)}
    out = ROOT / "bench" / "results" / "web-auth.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
