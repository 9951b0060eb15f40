"""The Dockerfile, checked by hadolint and by running what it would run.

There is no container engine here, so the image's contract is tested piece by piece: hadolint
lints the file, the structure is read from the file itself, and the final stage's exact
ENTRYPOINT + CMD and HEALTHCHECK command are started as processes against the API emulator.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from conftest import STARTUP_DEADLINE, tool

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
IMAGE_CONFIG = "/etc/keepwarm/keepwarm.yaml"
IMAGE_VENV_BIN = "/opt/keepwarm/bin"
IMAGE_CREDENTIALS = "/run/secrets/keepwarm"
IMAGE_STATE = "/var/lib/keepwarm"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.base}"
        return found[-1]


def parse_dockerfile(text: str) -> list[Stage]:
    """The Dockerfile's stages, each with its (KEYWORD, arguments) in order."""
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue  # comments may sit inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    stages: list[Stage] = []
    for instruction in logical:
        keyword, _, args = instruction.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
        elif keyword == "ARG" and not stages:
            continue
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, args))
    return stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for pair in shlex.split(args):
            key, sep, value = pair.partition("=")
            assert sep, f"ENV {args!r}: use the KEY=value form"
            env[key] = value
    return env


def healthcheck_command(stage: Stage) -> list[str]:
    args = stage.last("HEALTHCHECK")
    match = re.search(r"\bCMD\s+(\[.*\])\s*$", args)
    assert match, f"HEALTHCHECK must use the exec form CMD [...]: {args}"
    return exec_form(match.group(1))


STAGES = parse_dockerfile(DOCKERFILE.read_text())
FINAL = STAGES[-1]


def test_hadolint_is_clean() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILE)],
        check=False, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_two_stages_on_one_pinned_slim_base() -> None:
    assert len(STAGES) == 2
    assert STAGES[0].name == "builder"
    # The venv built in the first stage is copied into the second: same interpreter path.
    assert STAGES[0].base == FINAL.base
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", FINAL.base)
    assert FINAL.all("COPY") == ["--from=builder /opt/keepwarm /opt/keepwarm"], (
        "the final stage takes only the built venv: no config, prompts or key baked in"
    )


def test_runs_as_a_numeric_non_root_user() -> None:
    user = FINAL.last("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, user
    # The user is set before the process starts, never switched back.
    keywords = [kw for kw, _ in FINAL.instructions]
    assert "RUN" not in keywords[keywords.index("USER"):]


def test_entrypoint_and_environment() -> None:
    assert exec_form(FINAL.last("ENTRYPOINT")) == ["keepwarm"]
    assert exec_form(FINAL.last("CMD")) == ["run", "--config", IMAGE_CONFIG]
    env = env_of(FINAL)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["CREDENTIALS_DIRECTORY"] == IMAGE_CREDENTIALS
    assert env["PATH"].split(":")[0] == IMAGE_VENV_BIN
    # The state's default place is the declared volume, so a restart resumes from it.
    assert env["STATE_DIRECTORY"] == IMAGE_STATE
    assert IMAGE_STATE in json.loads(FINAL.last("VOLUME"))
    assert not any("KEY" in key and "ANTHROPIC" in key for key in env), "no key in the image"
    assert "9464" in FINAL.last("EXPOSE").split()


def test_healthcheck_uses_python_not_curl() -> None:
    command = healthcheck_command(FINAL)
    assert command[:2] == ["python", "-c"]
    assert "urllib" in command[2] and "http://127.0.0.1:9464/healthz" in command[2]


def test_dockerignore_admits_only_the_build_inputs() -> None:
    lines = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "start from excluding everything"
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert admitted == {"pyproject.toml", "README.md", "keepwarm"}
    sources: set[str] = set()
    for args in STAGES[0].all("COPY"):
        *srcs, _dest = args.split()
        sources.update(src.rstrip("/") for src in srcs if not src.startswith("--"))
    assert sources == admitted


# --- the image's command as a process ---------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


PROMPT = " ".join(
    f"Rule {n}: the chief economist answers with numbers, sources and uncertainty." for n in range(80)
)


def test_image_command_serves_healthz_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    from keepwarm.emulator import Emulator

    assert len(PROMPT) > 6000
    emulator = Emulator(time_scale=1.0)
    emulator.start()
    try:
        port = free_port()
        config = tmp_path / "etc" / "keepwarm.yaml"
        config.parent.mkdir()
        config.write_text(
            json.dumps({  # JSON is YAML: no quoting surprises in the long prompt
                "api": {"base_url": emulator.base_url},
                "defaults": {"models": ["claude-sonnet-4-6"], "interval": "2s", "jitter": "0s"},
                "experts": [{"name": "demo", "system": [{"text": PROMPT}]}],
                "metrics": {"listen": f"127.0.0.1:{port}"},
            })
        )
        # The key arrives the way the image documents it: a file in $CREDENTIALS_DIRECTORY.
        credentials = tmp_path / "secrets"
        credentials.mkdir(mode=0o700)
        key = "sk-ant-test-" + secrets.token_hex(16)
        (credentials / "anthropic_api_key").write_text(key + "\n")
        (credentials / "anthropic_api_key").chmod(0o600)
        workdir = tmp_path / "state"
        workdir.mkdir()

        # The image's command, with the image's paths mapped to this machine's: the config
        # argument to the temp config, the venv's bin to this interpreter's, the secret dir to
        # the temp one. Everything else is taken from the Dockerfile as written.
        argv = exec_form(FINAL.last("ENTRYPOINT")) + exec_form(FINAL.last("CMD"))
        argv = [str(config) if arg == IMAGE_CONFIG else arg for arg in argv]
        argv[0] = tool(argv[0])
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "KEEPWARM_"))}
        image_env = env_of(FINAL)
        image_env["CREDENTIALS_DIRECTORY"] = str(credentials)
        image_env["STATE_DIRECTORY"] = str(workdir)  # the volume
        image_env["PATH"] = os.pathsep.join([str(Path(argv[0]).parent), env.get("PATH", "")])
        env.update(image_env)

        log = tmp_path / "keepwarm.log"
        with log.open("wb") as out:
            process = subprocess.Popen(argv, env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + STARTUP_DEADLINE  # the daemon's start-up under load
                while healthz(port) != 200:
                    assert process.poll() is None, log.read_text()
                    assert time.monotonic() < deadline, f"no /healthz 200 in {STARTUP_DEADLINE:.0f} s:\n" + log.read_text()
                    time.sleep(0.2)

                # The HEALTHCHECK, as written, but at this test's port and with this python.
                check = healthcheck_command(FINAL)
                check[0] = sys.executable
                check[2] = check[2].replace("127.0.0.1:9464", f"127.0.0.1:{port}")
                healthy = subprocess.run(check, check=False, capture_output=True, text=True, timeout=10)
                assert healthy.returncode == 0, healthy.stderr

                process.send_signal(signal.SIGTERM)
                assert process.wait(timeout=STARTUP_DEADLINE) == 0, log.read_text()
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()

        # With the daemon gone the same check must report unhealthy.
        assert subprocess.run(check, check=False, capture_output=True, timeout=10).returncode != 0
        # The state went to the volume, with no `ledger:` key in the config, private to the user.
        ledger = workdir / "ledger.db"
        assert ledger.is_file() and (ledger.stat().st_mode & 0o777) == 0o600, log.read_text()
        assert key not in log.read_text(), "the API key leaked into the logs"
    finally:
        emulator.stop()
