"""Container health probe: ``python -m stream_classifier.ops.probe [healthz|readyz]``.

Exits 0 when the local ops server answers 200 on the endpoint, 1 otherwise. It reads the
port from the same settings as the server, so the Dockerfile's HEALTHCHECK needs neither
curl nor a hard-coded port.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from stream_classifier.config import load_settings

_WILDCARDS = {"", "0.0.0.0", "::"}


def probe(endpoint: str = "healthz", timeout_s: float = 3.0) -> bool:
    """True when ``/<endpoint>`` of this host's ops server answers 200."""
    settings = load_settings().metrics
    host = settings.host
    if host in _WILDCARDS:
        host = "127.0.0.1" if host != "::" else "::1"
    if ":" in host:
        host = f"[{host}]"
    try:
        with urllib.request.urlopen(
            f"http://{host}:{settings.port}/{endpoint}", timeout=timeout_s
        ) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str]) -> int:
    endpoint = argv[0] if argv else "healthz"
    if endpoint not in ("healthz", "readyz"):
        sys.stderr.write("usage: python -m stream_classifier.ops.probe [healthz|readyz]\n")
        return 2
    return 0 if probe(endpoint) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
