"""The embedded broker: CLI and API lifecycle, port reuse, a busy port refused."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from confluent_kafka.admin import AdminClient

from streamrec.kafka.embedded import BrokerError, EmbeddedBroker, free_port


def _answers_metadata(bootstrap: str) -> bool:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        admin.list_topics(timeout=3)
        return True
    except Exception:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _tansu_processes_on(port: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "tansu" in cmdline and f":{port}" in cmdline:
            found.append(proc)
    return found


def test_api_starts_and_stops_twice_on_the_same_port() -> None:
    port = free_port()
    for _ in range(2):
        with EmbeddedBroker(port=port) as broker:
            assert broker.bootstrap == f"127.0.0.1:{port}"
            assert _answers_metadata(broker.bootstrap)
        assert _tansu_processes_on(port) == []
        assert _port_free(port)


def _start_cli(port: int) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamrec", "broker", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # the bootstrap address, printed once ready
    return proc, line


@pytest.mark.slow
def test_cli_starts_and_stops_twice_on_the_same_port() -> None:
    port = free_port()
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        proc, bootstrap = _start_cli(port)
        try:
            assert bootstrap == f"127.0.0.1:{port}"
            assert _answers_metadata(bootstrap)
        finally:
            proc.send_signal(stop_signal)
            rc = proc.wait(20)
        assert rc == 0
        assert _tansu_processes_on(port) == []
        assert _port_free(port)


def test_broker_dies_with_a_killed_parent() -> None:
    port = free_port()
    proc, bootstrap = _start_cli(port)
    assert bootstrap == f"127.0.0.1:{port}"
    assert _tansu_processes_on(port)
    proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + 10
    while _tansu_processes_on(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _tansu_processes_on(port) == []


def test_busy_port_is_refused_with_a_clear_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(BrokerError, match=f"port {port} .* already in use"):
            EmbeddedBroker(port=port).start()
        result = subprocess.run(
            [sys.executable, "-m", "streamrec", "broker", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "already in use" in lines[0]
    assert result.stdout == ""
