"""``lakelet up``'s side of the Data API: N worker processes (``worker.py``) serving HTTP on one
listening socket, and the control plane they reach over their links.

Why processes: a request costs the Data API ~100 µs of Python, and ``lakelet up`` is one event
loop that also runs the Postgres proxy, the control plane and storage's threads. One process
saturates one core and its pauses (collections of a big heap, storage threads holding the GIL)
become the Data API's tail latency. Workers hold only the Data API's heap and spread over the
cores.

The supervisor binds HOST:PORT itself (so a busy port is reported here, as before) and passes
the socket to every worker. Per worker it keeps a socket-pair ``Link``:

- ``wake``: ``ensure_ready`` on the control plane (single flight there), answered with the
  compute's address, or ``unknown`` / ``failed``;
- ``load``: the worker's in-flight count for a branch replaces its previous one in the branch's
  ``LoadSignals.sessions``, bytes add up, activity marks the branch busy — the autoscaler and
  scale-to-zero see HTTP load exactly as they see the proxy's;
- ``forget`` (pushed): a branch whose compute is no longer the one handed out (stopped, crashed,
  restarted, moved) is named to every worker, which drops the cached address;
- ``metrics``: at scrape time, each worker's samples, summed here by a collector on the main
  registry (``lakelet_data_api_*`` on ``/metrics`` as before).

A worker that exits is logged, counted and replaced; its load is taken off the branches it held.
``close`` stops them all (SIGTERM, then SIGKILL); a worker whose link closes (``lakelet up`` died)
exits on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from compute import Endpoints, UnknownBranch, WakeError
from dataapi.ipc import Link, LinkClosed, Message
from dataapi.metrics import DataAPIMetrics
from dataapi.server import DataAPIConfig

log = logging.getLogger("lakelet.dataapi")

WATCH_EVERY = 0.05      # seconds between checks that handed-out compute addresses still hold
READY_TIMEOUT = 60.0    # a worker that is not accepting after this long failed to start
STOP_TIMEOUT = 10.0
ROOT = str(Path(__file__).resolve().parent.parent)  # where the dataapi package is importable from


class WorkerStartError(RuntimeError):
    pass


class WorkerProcess:
    """One worker: its process, its link, and the load it holds on each branch."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.link: Link | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sessions: dict[str, int] = {}
        self.started = time.monotonic()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class Workers:
    def __init__(self, endpoints: Endpoints, config: DataAPIConfig, count: int,
                 registry: CollectorRegistry | None = None, log_format: str = "text",
                 log_level: str = "info") -> None:
        self.endpoints = endpoints
        self.config = config
        self.count = count
        self.log_format = log_format
        self.log_level = log_level
        self.sock: socket.socket | None = None
        self.port: int | None = None
        self.workers: list[WorkerProcess] = []
        self._handed: dict[str, int] = {}  # branch → pid of the compute whose address workers hold
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False
        self._up = False  # every worker accepted once: from then on, a worker that dies is replaced
        registry = registry if registry is not None else CollectorRegistry()
        self.restarts = Counter("lakelet_data_api_worker_restarts_total",
                                "Data API worker processes that exited and were replaced", registry=registry)
        self.alive = Gauge("lakelet_data_api_workers", "Data API worker processes running", registry=registry)
        self.collector = SummedMetrics(self)
        registry.register(self.collector)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> None:
        """Bind HOST:PORT (an ``OSError`` if it is taken), start the workers and wait until each
        accepts."""
        sock = socket.create_server((host, port), backlog=4096)
        sock.setblocking(False)
        self.sock = sock
        self.port = sock.getsockname()[1]
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="data-api-watch")
        for index in range(self.count):
            worker = await self._spawn(index)
            self.workers.append(worker)
        try:
            await asyncio.wait_for(asyncio.gather(*(w.ready for w in self.workers)), READY_TIMEOUT)
        except (TimeoutError, WorkerStartError) as e:
            await self.close()
            raise WorkerStartError(f"the data API workers did not start: {e or 'no answer'}") from None
        self._up = True

    async def _spawn(self, index: int) -> WorkerProcess:
        assert self.sock is not None
        worker = WorkerProcess(index)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH"))
                                                               if p)}
            worker.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dataapi.worker", str(self.sock.fileno()), str(theirs.fileno()),
                pass_fds=(self.sock.fileno(), theirs.fileno()), env=env, stdin=asyncio.subprocess.DEVNULL)
        finally:
            theirs.close()
        ours.setblocking(False)
        worker.link = await Link.open(ours, lambda link, m, w=worker: self._on_message(w, link, m))
        worker.link.send({"op": "start", "index": index, "log_format": self.log_format, "log_level": self.log_level,
                          "config": dataclasses.asdict(self.config)})
        self._spawn_task(self._supervise(worker), f"data-api-worker-{index}")
        return worker

    def _spawn_task(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _supervise(self, worker: WorkerProcess) -> None:
        assert worker.proc is not None
        code = await worker.proc.wait()
        if worker.link is not None:
            worker.link.close()
        self._drop_load(worker)
        if worker.ready.done():
            self.alive.dec()
        else:
            worker.ready.set_exception(WorkerStartError(f"worker {worker.index} exited with code {code} "
                                                        "before accepting; see the lines above"))
            worker.ready.exception()  # retrieved: start() reports it, or the restart below follows it
            if not self._up:
                return
        if self._stopping:
            return
        self.restarts.inc()
        # A worker that keeps dying right after start is not restarted in a tight loop.
        delay = 0.0 if worker.ready.exception() is None and time.monotonic() - worker.started > 10 else 1.0
        log.warning("a data API worker exited; starting another", extra={
            "worker": worker.index, "pid": worker.pid, "exit_code": code})
        await asyncio.sleep(delay)
        if self._stopping:
            return
        try:
            fresh = await self._spawn(worker.index)
        except OSError as e:
            log.error("could not start a data API worker", extra={"worker": worker.index, "error": str(e)})
            return
        self.workers[self.workers.index(worker)] = fresh
        if self._stopping and fresh.proc is not None:  # close() began while it was starting
            with contextlib.suppress(ProcessLookupError):
                fresh.proc.terminate()
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(fresh.ready), READY_TIMEOUT)

    async def close(self) -> None:
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.terminate()
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                await asyncio.wait_for(w.proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.warning("a data API worker did not stop; killing it", extra={"pid": w.pid})
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                await w.proc.wait()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # -- messages from a worker -----------------------------------------------------------------

    def _on_message(self, worker: WorkerProcess, link: Link, message: Message) -> None:
        op = message.get("op")
        if op == "load":
            self._load(worker, message)
        elif op == "wake":
            self._spawn_task(self._wake(link, message), "data-api-wake")
        elif op == "ready" and not worker.ready.done():
            worker.ready.set_result(None)
            worker.started = time.monotonic()
            self.alive.inc()

    async def _wake(self, link: Link, message: Message) -> None:
        branch = str(message.get("branch"))
        try:
            address = await self.endpoints.ensure_ready(branch)
        except UnknownBranch as e:
            link.reply(message, {"error": "unknown", "message": str(e)})
            return
        except WakeError as e:
            link.reply(message, {"error": "failed", "message": str(e)})
            return
        except Exception as e:
            log.exception("waking a branch for the data API failed", extra={"branch": branch})
            link.reply(message, {"error": "failed", "message": str(e)})
            return
        self._handed[branch] = address.pid
        link.reply(message, {"socket_dir": address.socket_dir, "port": address.port, "pid": address.pid})

    def _load(self, worker: WorkerProcess, message: Message) -> None:
        branch = str(message.get("branch"))
        if not self.endpoints.has_branch(branch):
            return
        signals = self.endpoints.signals(branch)
        sessions = int(message.get("sessions", 0))
        signals.sessions += sessions - worker.sessions.get(branch, 0)
        worker.sessions[branch] = sessions
        signals.bytes_in += int(message.get("bytes_in", 0))
        signals.bytes_out += int(message.get("bytes_out", 0))
        if message.get("active") or sessions:
            signals.last_activity = time.monotonic()

    def _drop_load(self, worker: WorkerProcess) -> None:
        """A worker that is gone holds no request: its sessions leave the branches' counts."""
        for branch, sessions in worker.sessions.items():
            if sessions and self.endpoints.has_branch(branch):
                signals = self.endpoints.signals(branch)
                signals.sessions -= sessions
                signals.last_activity = time.monotonic()
        worker.sessions.clear()

    # -- pushed invalidation --------------------------------------------------------------------

    async def _watch(self) -> None:
        """Name to every worker each branch whose compute is no longer the one handed out."""
        while True:
            await asyncio.sleep(WATCH_EVERY)
            if not self._handed:
                continue
            gone = []
            for branch, pid in list(self._handed.items()):
                node = self.endpoints.active_node(branch) if self.endpoints.has_branch(branch) else None
                if node is None or node.pid != pid:
                    gone.append(branch)
                    del self._handed[branch]
            if gone:
                for w in self.workers:
                    if w.link is not None and w.link.is_open:
                        with contextlib.suppress(LinkClosed):
                            w.link.send({"op": "forget", "branches": gone})

    # -- metrics ----------------------------------------------------------------------------------

    async def pull_metrics(self, timeout: float = 2.0) -> list[list[dict[str, Any]]]:
        """Every live worker's samples, asked for now."""
        async def one(w: WorkerProcess) -> list[dict[str, Any]]:
            if w.link is None or not w.link.is_open or not w.ready.done():
                return []
            try:
                answer = await w.link.request({"op": "metrics"}, timeout)
            except (LinkClosed, TimeoutError):
                return []
            return list(answer.get("families", []))
        return list(await asyncio.gather(*(one(w) for w in self.workers)))


class SummedMetrics(Collector):
    """The workers' ``lakelet_data_api_*`` families, summed sample by sample (counters and
    histogram buckets add up across processes; ``_created`` takes the earliest). Collected in
    the thread ``/metrics`` renders in, it asks the workers through the event loop; collected on
    the loop itself, it serves the last answers."""

    def __init__(self, workers: Workers) -> None:
        self.workers = workers
        self.loop = asyncio.get_running_loop()
        self.last: list[list[dict[str, Any]]] = []
        # The families exist even before any worker has answered (dashboards query them).
        self._shapes = [(f.name, f.documentation, f.type) for f in
                        DataAPIMetrics(CollectorRegistry()).registry.collect()]

    def collect(self) -> Iterator[Metric]:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        if not on_loop and not self.loop.is_closed():
            future = asyncio.run_coroutine_threadsafe(self.workers.pull_metrics(), self.loop)
            with contextlib.suppress(Exception):
                self.last = future.result(timeout=5)
        yield from sum_families(self._shapes, self.last)


def sum_families(shapes: list[tuple[str, str, str]], answers: list[list[dict[str, Any]]]) -> Iterator[Metric]:
    families: dict[str, Metric] = {name: Metric(name, doc, kind) for name, doc, kind in shapes}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {name: {} for name in families}
    for answer in answers:
        for f in answer:
            name = f["name"]
            if name not in families:
                families[name] = Metric(name, f["doc"], f["type"])
                values[name] = {}
            acc = values[name]
            for sample_name, labels, value in f["samples"]:
                key = (sample_name, tuple(sorted(labels.items())))
                if sample_name.endswith("_created"):
                    acc[key] = min(acc.get(key, value), value)
                else:
                    acc[key] = acc.get(key, 0.0) + value
    for name, metric in families.items():
        for (sample_name, labels), value in values[name].items():
            metric.add_sample(sample_name, dict(labels), value)
        yield metric


__all__ = ["SummedMetrics", "WorkerStartError", "Workers", "sum_families"]
