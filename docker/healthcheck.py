"""Container health probe for `tuneport serve`: exit 0 when GET URL answers 200, else 1.

Usage: python healthcheck.py http://127.0.0.1:8000/health

The images' HEALTHCHECK runs this with the container's environment. `tuneport serve` asks every
request for the API key once it has one, /health included, so the probe sends TUNEPORT_API_KEY as a
bearer token when it is set (a key given with --api-key instead is unknown here, and the probe fails).
Only the standard library, so the images need no curl; it runs as the image's non-root user.
"""

from __future__ import annotations

import os
import sys
import urllib.request

TIMEOUT_S = 4  # below the HEALTHCHECK --timeout, so the probe reports its own error first


def probe(url: str, api_key: str | None) -> int:
    """Return 0 if `url` answers 200 within TIMEOUT_S, else print why and return 1."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as reply:
            status = reply.status
    except OSError as e:  # refused, timed out, or an HTTP error status (HTTPError)
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: healthcheck.py URL")
    sys.exit(probe(sys.argv[1], os.environ.get("TUNEPORT_API_KEY")))
