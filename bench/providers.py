"""What one keepalive ping costs the daemon per provider: keepwarm's own `send_ping` through each
provider's official SDK client against the emulator, one after another, warm cache.

The emulator runs in a subprocess (`keepwarm emulator`), so its work is not counted against the
client's interpreter. The figure that matters is the client side: Bedrock signs every request
with SigV4 (botocore), which the other providers do not, and a daemon at 10,000 pairs pays that
per ping. Writes bench/results/providers.json.

    python3 bench/providers.py [--pings 300]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keepwarm.config import ApiKey, parse_config  # noqa: E402
from keepwarm.ping import send_ping  # noqa: E402
from keepwarm.providers.clients import make_clients  # noqa: E402

PROMPT = "You are a careful analyst of shipping rates; cite sources. " * 350  # ~5,000 tokens
PLACES = {
    "anthropic": ({"name": "api", "provider": "anthropic"}, "claude-sonnet-4-6"),
    "bedrock": ({"name": "aws", "provider": "bedrock", "region": "us-east-1"}, "us.anthropic.claude-sonnet-4-6"),
    "bedrock-mantle": ({"name": "mantle", "provider": "bedrock", "region": "us-east-1", "bedrock_api": "mantle"},
                       "global.anthropic.claude-opus-4-8"),
    "vertex": ({"name": "gcp", "provider": "vertex", "region": "global", "project_id": "bench"}, "claude-sonnet-4-6"),
    "foundry": ({"name": "azure", "provider": "foundry", "resource": "bench"}, "claude-sonnet-4-6"),
}


def main() -> int:
    """Run the benchmark and write its JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--pings", type=int, default=300)
    args = parser.parse_args()
    proc = subprocess.Popen([sys.executable, "-m", "keepwarm", "emulator", "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[-1]
        doc = {
            "accounts": [account for account, _ in PLACES.values()],
            "experts": [{"name": name, "account": account["name"], "system": [{"text": PROMPT}], "models": [model]}
                        for name, (account, model) in PLACES.items()],
        }
        config = parse_config(doc, ROOT)
        clients = make_clients(config, ApiKey("bench-key", "bench"), emulator_url=url)
        results = {}
        for pair in config.pairs:
            send_ping(clients, pair, 1)  # the write, and the client's first-use costs (sessions, imports)
            latencies = []
            for _ in range(args.pings):
                t0 = time.perf_counter()
                attempt = send_ping(clients, pair, 1)
                latencies.append(time.perf_counter() - t0)
                assert attempt.error is None and attempt.usage is not None and attempt.usage.cache_read > 0, attempt
            latencies.sort()
            results[pair.expert] = {
                "model": pair.model,
                "pings": args.pings,
                "median_ms": round(statistics.median(latencies) * 1000, 3),
                "p90_ms": round(latencies[int(0.9 * len(latencies))] * 1000, 3),
                "pings_per_second_one_thread": round(args.pings / sum(latencies), 1),
            }
            print(f"{pair.expert:15} median {results[pair.expert]['median_ms']:7.3f} ms"
                  f"  p90 {results[pair.expert]['p90_ms']:7.3f} ms", flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    out = {
        "what": "keepwarm.ping.send_ping per provider through the official SDK client, warm cache, emulator in a subprocess",
        "command": f"python3 bench/providers.py --pings {args.pings}",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "results": results,
    }
    path = ROOT / "bench" / "results" / "providers.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
