"""Commands run as a user runs them, in processes of their own: in one process, or in several under
``mlx.launch`` (ring backend, on this machine); the server among them, asked over HTTP once it answers."""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import List

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = Path(sys.executable).parent / "mlx.launch"


def restore_ctrl_c() -> None:
    """``preexec_fn`` of a child that a test stops with Ctrl-C: the children of a background job (tests run with
    ``&``) inherit SIGINT ignored, and Python then leaves it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports."""
    while True:
        first, sockets = free_port(), []
        try:
            for port in range(first, first + n):
                sockets.append(socket.socket())
                sockets[-1].bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()


def command(processes: int, *args: str) -> List[str]:
    """``python ARGS``; with several processes, under ``mlx.launch`` with the ring backend on this machine (on
    free ports: another group may be running)."""
    if processes == 1:
        return [sys.executable, *args]
    launcher = [str(LAUNCHER), "-n", str(processes), "--backend", "ring", "--starting-port", str(free_ports(processes))]
    return [*launcher, "--python", sys.executable, "--", *args]


def start_server(model: Path, log: Path, *options: str, processes: int = 1) -> SimpleNamespace:
    """The server on a free port, once it answers /health; its output (every rank's) goes to ``log``."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen(
            command(processes, "-m", "mlx_eve.server", "--model", str(model), "--port", str(port), *options),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            # mlx.launch makes its standard input non-blocking: not the terminal's, which the tests share.
            stdin=subprocess.PIPE if processes > 1 else None,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # Several processes form a group of their own, which stop_server's Ctrl-C reaches as a terminal's does.
            start_new_session=processes > 1,
            preexec_fn=restore_ctrl_c,
        )
    server = SimpleNamespace(process=process, port=port, url=f"http://127.0.0.1:{port}", log=log, processes=processes)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if http_request(server, "GET", "/health")[0] == 200:
                return server
        except OSError:
            if time.monotonic() > deadline:
                kill_server(server)
                pytest.fail(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.2)


def stop_server(server: SimpleNamespace) -> int:
    """Ctrl-C, as a user stops it (in a terminal it reaches every process of the group); its exit code."""
    if server.processes > 1:
        os.killpg(server.process.pid, signal.SIGINT)
    else:
        server.process.send_signal(signal.SIGINT)
    try:
        return server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        kill_server(server)
        pytest.fail(f"the server did not stop within 30 s of Ctrl-C:\n{server.log.read_text()}")


def kill_server(server: SimpleNamespace) -> None:
    if server.processes > 1:
        try:
            os.killpg(server.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    else:
        server.process.kill()
    server.process.wait()


def http_request(server, method: str, path: str, body=None, headers=None, key=None):
    """(status, JSON body) of a raw request; ``body`` is JSON unless it is bytes."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        headers = dict(headers or {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def wait_for_log(server, pattern: str, timeout: float = 10) -> re.Match:
    deadline = time.monotonic() + timeout
    while not (match := re.search(pattern, server.log.read_text())):
        assert time.monotonic() < deadline, f"{pattern!r} not in the server's log:\n{server.log.read_text()}"
        time.sleep(0.05)
    return match
