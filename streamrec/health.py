"""The metrics and health endpoints of every long-running process (worker, archiver, the
retrainer's ``--every`` loop): ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

* ``/healthz``: 200 while the process's loop turns (:meth:`Health.beat` within
  ``stale_after_s``, or a long task under way that bounds itself: :meth:`Health.busy`);
  503 otherwise. A restart is what helps a process that fails it.
* ``/readyz``: 200 when the process does its job (a worker: partitions assigned and their
  state recovered, a model loaded and through its gate); 503 with the reason otherwise, e.g.
  while a rebalance recovers state.

This module sits below every room (it knows only ``prometheus_client``), so the trainer's
retrain loop serves its own metrics through it as the worker does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

#: a loop that has not turned for this long is reported dead (/healthz 503)
STALE_AFTER_S = 60.0


class Health:
    """Liveness and readiness of one process, set by its loop and read by the endpoint."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        stale_after_s: float = STALE_AFTER_S,
        ready_check: Callable[[], tuple[bool, str]] | None = None,
    ) -> None:
        self.stale_after_s = stale_after_s
        self.ready_check = ready_check
        self._lock = threading.Lock()
        self._last_beat = time.monotonic()
        self._ready = False
        self._reason = "starting"
        self._busy: str | None = None
        self._gauge = (
            Gauge("streamrec_ready", "1 when /readyz answers 200", registry=registry)
            if registry is not None
            else None
        )
        self._publish(False)

    def beat(self) -> None:
        """The loop turned."""
        self._last_beat = time.monotonic()

    def set_ready(self, ready: bool, reason: str = "") -> None:
        with self._lock:
            self._ready, self._reason = ready, reason
        self._publish(ready)

    def busy(self, reason: str) -> None:
        """A long task that bounds its own time (a state recovery) begins: alive, not ready."""
        with self._lock:
            self._busy = reason
        self._publish(False)

    def done(self, ready: bool = True, reason: str = "") -> None:
        """The task of :meth:`busy` ended."""
        with self._lock:
            self._busy = None
        self.beat()
        self.set_ready(ready, reason)

    def alive(self) -> tuple[bool, str]:
        with self._lock:
            busy = self._busy
        if busy is not None:
            return True, busy
        age = time.monotonic() - self._last_beat
        if age > self.stale_after_s:
            return False, f"the loop has not turned for {age:.0f} s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        alive, why = self.alive()
        with self._lock:
            busy, ready, reason = self._busy, self._ready, self._reason
        if busy is not None:
            return False, busy
        if not alive:
            return False, why
        if self.ready_check is not None:
            ok, reason = self.ready_check()
            self._publish(ok)
            return ok, reason
        return ready, reason or ("ok" if ready else "not ready")

    def _publish(self, ready: bool) -> None:
        if self._gauge is not None:
            self._gauge.set(1 if ready else 0)


def serve(registry: CollectorRegistry, health: Health, port: int, host: str) -> Any:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` in a daemon thread
    (port 0: nothing is served); returns the server (``.shutdown()``) or None."""
    if not port:
        return None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok, reason = health.alive() if path == "/healthz" else health.ready()
                self._send(200 if ok else 503, (reason + "\n").encode(), "text/plain")
            else:
                self._send(404, b"/metrics, /healthz or /readyz\n", "text/plain")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a scrape every few seconds is not news

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="streamrec-metrics", daemon=True).start()
    return server
