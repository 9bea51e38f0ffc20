"""One Data API worker process: ``python -m dataapi.worker LISTEN_FD LINK_FD``, started and
supervised by ``lakelet up`` (``workers.py``).

It accepts HTTP on the listening socket it inherited (every worker accepts on the same one; the
kernel hands each connection to whichever worker's loop takes it first, so a busy worker takes
fewer), and serves it with the same ``DataAPI`` as everywhere. The control plane stays in
``lakelet up``; this process reaches it through ``RemoteComputes`` over the link:

- a branch's compute address is kept once asked for, so a request in steady state never waits
  for the link; ``lakelet up`` sends ``forget`` when that compute stops, restarts or moves, and a
  request that finds no compute at the address retries once (``DataAPI.handle``);
- a branch's in-flight count is sent the moment it goes 0 ↔ non-zero (scale-to-zero must never
  stop a compute under a request), and with the bytes moved every second while there is load.

The worker imports neither the control plane nor storage: its heap is the Data API's alone (so
the collector has little to walk; ``gc.freeze`` after start-up and higher thresholds were measured
under bench/data_api.py and made throughput worse, not better, so the defaults stay). The first
message on the link is ``start`` with the configuration (secrets never travel in argv);
the link closing (``lakelet up`` gone, even by kill -9) ends the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from dataapi.databases import NoSuchBranch, WakeFailed
from dataapi.ipc import Link, LinkClosed, Message
from dataapi.server import DataAPI, DataAPIConfig

log = logging.getLogger("lakelet.dataapi")

REPORT_EVERY = 1.0  # seconds between load reports while a branch has traffic


@dataclass(frozen=True)
class Address:
    socket_dir: str
    port: int
    pid: int


class WorkerSignals:
    """A branch's load as this worker sees it; ``RemoteComputes`` ships it to ``lakelet up``."""

    __slots__ = ("branch", "sessions", "bytes_in", "bytes_out", "touched", "reported_busy", "settling", "_computes")

    def __init__(self, branch: str, computes: RemoteComputes) -> None:
        self.branch = branch
        self.sessions = 0
        self.reported_busy = False  # what lakelet up was last told: requests in flight or not
        self.settling = False       # a report of "none in flight" is due at the end of this turn
        self.bytes_in = 0
        self.bytes_out = 0
        self.touched = False  # requests began or ended since the last report
        self._computes = computes

    def held(self) -> _Held:
        return _Held(self)


class _Held:
    """One request in flight (a class, not a generator: it is on every request)."""

    __slots__ = ("_s",)

    def __init__(self, s: WorkerSignals) -> None:
        self._s = s

    def __enter__(self) -> None:
        s = self._s
        s.sessions += 1
        s.touched = True
        if s.sessions == 1 and not s.reported_busy:
            s._computes.report(s)  # at once: scale-to-zero must not stop the compute under it

    def __exit__(self, *exc: object) -> None:
        s = self._s
        s.sessions -= 1
        if s.sessions == 0 and not s.settling:
            # Reported at the end of this turn of the loop, unless a request arrived meanwhile
            # (under load the count touches zero between requests all the time).
            s.settling = True
            asyncio.get_running_loop().call_soon(s._computes.settle, s)


class RemoteComputes:
    """``databases.Computes`` over the link to ``lakelet up``."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self._addresses: dict[str, Address] = {}
        self._waking: dict[str, asyncio.Task[Address]] = {}
        self._signals: dict[str, WorkerSignals] = {}
        self._reporter: asyncio.Task[None] | None = None

    async def ensure_ready(self, branch: str) -> Address:
        address = self._addresses.get(branch)
        if address is not None:
            return address
        task = self._waking.get(branch)
        if task is None:  # single flight: one ``wake`` on the link per branch at a time
            task = self._waking[branch] = asyncio.get_running_loop().create_task(self._wake(branch))
            task.add_done_callback(lambda t, b=branch: self._waking.pop(b, None))
        return await asyncio.shield(task)

    async def _wake(self, branch: str) -> Address:
        try:
            answer = await self.link.request({"op": "wake", "branch": branch})
        except LinkClosed:
            raise WakeFailed("lakelet up is not answering (it may be stopping)") from None
        if answer.get("error") == "unknown":
            raise NoSuchBranch(answer.get("message", ""))
        if "error" in answer:
            raise WakeFailed(answer.get("message", ""))
        address = Address(answer["socket_dir"], answer["port"], answer["pid"])
        self._addresses[branch] = address
        return address

    def known(self, branch: str) -> Address | None:
        return self._addresses.get(branch)

    def forget(self, branch: str) -> None:
        self._addresses.pop(branch, None)

    def signals(self, branch: str) -> WorkerSignals:
        s = self._signals.get(branch)
        if s is None:
            s = self._signals[branch] = WorkerSignals(branch, self)
        return s

    def report(self, s: WorkerSignals) -> None:
        """Tell ``lakelet up`` the branch's in-flight count now, and what it moved since the
        last report (the autoscaler and scale-to-zero read them from its ``LoadSignals``)."""
        with contextlib.suppress(LinkClosed):
            self.link.send({"op": "load", "branch": s.branch, "sessions": s.sessions, "bytes_in": s.bytes_in,
                            "bytes_out": s.bytes_out, "active": s.touched or s.sessions > 0})
        s.bytes_in = s.bytes_out = 0
        s.touched = False
        s.reported_busy = s.sessions > 0

    def settle(self, s: WorkerSignals) -> None:
        s.settling = False
        if s.sessions == 0 and s.reported_busy:
            self.report(s)

    def start(self) -> None:
        self._reporter = asyncio.get_running_loop().create_task(self._report_loop(), name="data-api-load")

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY)
            for s in list(self._signals.values()):
                if s.touched or s.sessions or s.bytes_in or s.bytes_out:
                    self.report(s)

    def stop(self) -> None:
        if self._reporter is not None:
            self._reporter.cancel()


def registry_samples(registry: CollectorRegistry) -> list[dict[str, Any]]:
    """The registry's families as plain data for the link (``workers.py`` sums them)."""
    return [{"name": f.name, "doc": f.documentation, "type": f.type,
             "samples": [[s.name, s.labels, s.value] for s in f.samples]} for f in registry.collect()]


class Worker:
    def __init__(self, listen: socket.socket, link_sock: socket.socket) -> None:
        self.listen = listen
        self.link_sock = link_sock
        self.registry = CollectorRegistry()
        self.api: DataAPI | None = None
        self.computes: RemoteComputes | None = None
        self._config: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.stop = asyncio.Event()

    def _on_message(self, link: Link, message: Message) -> None:
        op = message.get("op")
        if op == "start" and not self._config.done():
            self._config.set_result(message)
        elif op == "forget" and self.computes is not None:
            for branch in message.get("branches", []):
                self.computes.forget(branch)
        elif op == "metrics":
            link.reply(message, {"families": registry_samples(self.registry)})

    def _on_close(self, link: Link) -> None:
        self.stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        link = await Link.open(self.link_sock, self._on_message, self._on_close)
        start = await self._config
        setup_logging(start.get("log_format", "text"), start.get("log_level", "info"), start.get("index", 0))
        config = DataAPIConfig(**{k: tuple(v) if k == "schemas" else v for k, v in start["config"].items()})
        self.computes = RemoteComputes(link)
        self.api = DataAPI(self.computes, config, self.registry)
        try:
            await self.api.start(sock=self.listen)
            self.computes.start()
            link.send({"op": "ready", "pid": os.getpid()})
            await self.stop.wait()
        finally:
            self.computes.stop()
            await self.api.close()
            link.close()


class _Formatter(logging.Formatter):
    """Lines shaped like ``lakelet up``'s own (text or JSON), tagged with the worker."""

    def __init__(self, fmt: str, index: int) -> None:
        super().__init__()
        self.json = fmt == "json"
        self.index = index

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += f" error={record.exc_info[1]!r}"
        if self.json:
            return json.dumps({"ts": round(record.created, 3), "level": record.levelname.lower(),
                               "logger": record.name, "msg": message, "data_api_worker": self.index})
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return (f"{ts}.{int(record.msecs):03d}Z {record.levelname:<7} {record.name}: {message} "
                f"data_api_worker={self.index}")


def setup_logging(fmt: str, level: str, index: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt, index))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


async def _main(listen_fd: int, link_fd: int) -> None:
    listen = socket.socket(fileno=listen_fd)
    listen.setblocking(False)
    link_sock = socket.socket(fileno=link_fd)
    link_sock.setblocking(False)
    await Worker(listen, link_sock).run()


def main() -> None:
    listen_fd, link_fd = int(sys.argv[1]), int(sys.argv[2])
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_main(listen_fd, link_fd))
    else:
        uvloop.run(_main(listen_fd, link_fd))


if __name__ == "__main__":
    main()
