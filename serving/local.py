"""A model server process on localhost: a free port, waiting until it answers, stopping it (the demo, the tests and
``make bench-serve`` start the real KServe model server this way)."""

from __future__ import annotations

import socket
import subprocess
import time

from deepmedix.errors import DemoError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Terminate a server process; kill it if it has not ended after ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"model server exited with code {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise DemoError(f"model server not ready after {timeout:.0f} s ({url})")
