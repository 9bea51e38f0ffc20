"""A small HTTP client for the control API, used by the CLI (stdlib only: the CLI starts fast)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from lakelet.rundir import read_run_info


class ClientError(RuntimeError):
    """The request failed; the message is the one line to show the user."""


class ControlClient:
    def __init__(self, data_dir: Path, timeout: float = 120.0) -> None:
        info = read_run_info(data_dir)
        if info is None:
            raise ClientError(
                f"no running lakelet found for data dir {data_dir}: start it with `lakelet up "
                f"--data-dir {data_dir}` (or pass the --data-dir it runs with)"
            )
        host, _, port = info.http.rpartition(":")
        host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host.strip("[]")
        self.base = f"http://{host}:{port}"
        self.token = info.token
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             query: dict[str, str] | None = None) -> dict[str, Any]:
        url = self.base + path + ("?" + urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error") or e.reason
            except ValueError:
                message = f"HTTP {e.code} {e.reason}"
            raise ClientError(str(message)) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ClientError(f"cannot reach lakelet at {self.base} ({reason}): is `lakelet up` running?") from None

    @staticmethod
    def path(*parts: str) -> str:
        return "/" + "/".join(quote(p, safe="") for p in parts)


def wait_healthy(http_port: int, running: Callable[[], bool], timeout: float) -> bool:
    """Poll ``GET /healthz`` of a starting ``lakelet up`` on this machine: True once it answers
    200, False when the process stops (``running`` turns false) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False
