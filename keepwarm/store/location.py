"""Where a PostgreSQL ledger is, and where its password comes from, without importing psycopg:
`keepwarm report` on a SQLite file, and the config's validation, should not pay for the driver.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from keepwarm.store.sqlite import LedgerError

CREDENTIAL = "ledger_password"  # the file systemd's LoadCredential= puts in $CREDENTIALS_DIRECTORY


@dataclass(frozen=True)
class PostgresTarget:
    """A PostgreSQL ledger: the URL or conninfo string, and the password file if the config names one.

    The password itself is read at connection time and never kept here: this object is logged,
    compared on reload and shown in errors.
    """

    url: str
    password_file: Path | None = None

    def __str__(self) -> str:
        return display(self.url)

    def __repr__(self) -> str:
        return f"PostgresTarget({display(self.url)!r}, password_file={self.password_file!r})"


def is_url(text: str) -> bool:
    """Whether a ledger location names a PostgreSQL database (a libpq URI or conninfo) rather than a file."""
    return text.startswith(("postgresql://", "postgres://")) or bool(re.match(r"^\s*\w+\s*=", text))


_URI_PASSWORD = re.compile(r"(://[^/:@\s]*:)[^@\s]*@")
_CONNINFO_PASSWORD = re.compile(r"(?<![?&\w])(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&\s]*", re.IGNORECASE)


SHOWN = ("host", "hostaddr", "port", "dbname", "user", "sslmode", "target_session_attrs")


def display(url: str) -> str:
    """The database as logs and errors name it: the URL's harmless keys, rebuilt (whatever else it
    holds stays out), or a placeholder when it does not parse (libpq could not say where a
    password would be, so none of it is shown)."""
    from psycopg.conninfo import conninfo_to_dict  # only ever called with a database in use

    try:
        params = conninfo_to_dict(url)
    except Exception:  # noqa: BLE001 - psycopg.ProgrammingError; any failure means "do not show it"
        return "(an unparseable ledger.url)"
    return " ".join(f"{k}={params[k]}" for k in SHOWN if params.get(k) not in (None, "")) or "(libpq defaults)"


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every password in it replaced by `***`: those given, and any a URI or conninfo spells out."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _URI_PASSWORD.sub(r"\1***@", text)
    text = _QUERY_PASSWORD.sub(r"\1***", text)
    return _CONNINFO_PASSWORD.sub(r"\1***", text)




def read_password(target: PostgresTarget, environ: Mapping[str, str] | None = None) -> str | None:
    """The password to send: `ledger.password_file`, else `$CREDENTIALS_DIRECTORY/ledger_password`,
    else None (libpq then uses PGPASSWORD or the password file); raise LedgerError."""
    env = os.environ if environ is None else environ
    path = target.password_file
    if path is None and env.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL
        path = candidate if candidate.is_file() else None
    if path is None:
        return None
    try:
        # Only the line ending is trimmed: `echo secret > file` adds one, and a password may hold spaces.
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"ledger password file {path}: cannot read it: {type(exc).__name__}") from None


