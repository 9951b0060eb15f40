"""Where keepwarm keeps its state when the config does not say: the standard places.

systemd's `StateDirectory=` hands the service `$STATE_DIRECTORY`; a container sets it to its
volume; a user's shell has the XDG base directories. The file is private (0600 in a 0700
directory): it holds what production sends about its requests.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

FILE_NAME = "ledger.db"


def default_ledger_path(environ: Mapping[str, str] | None = None) -> Path:
    """`$STATE_DIRECTORY/ledger.db`, else `$XDG_STATE_HOME/keepwarm/ledger.db`, else
    `~/.local/state/keepwarm/ledger.db`."""
    env = os.environ if environ is None else environ
    # systemd passes a colon-separated list when a unit names several directories: ours is first.
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state) / FILE_NAME
    xdg = env.get("XDG_STATE_HOME", "")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore a relative value
        return Path(xdg) / "keepwarm" / FILE_NAME
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "state" / "keepwarm" / FILE_NAME


def prepare(path: Path, make_directory: bool = True) -> None:
    """Create the ledger's file (0600) and, with `make_directory`, its directory (0700) if
    missing; raise OSError.

    Only what we create is made private: an existing directory (`/var/lib/keepwarm`, a volume)
    keeps the mode its owner gave it. A path the config names must have its directory already:
    a typo there should fail loudly, not create a tree somewhere.
    """
    if make_directory and not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
