"""Starting and stopping Flower's processes: what the node, the coordinator and the simulation runner share.

`fedpriv node` (`client.supernode`) starts `flower-supernode`, `fedpriv server`
(`server.superlink`) starts `flower-superlink`, and `fedpriv simulate`
(`simulations.runner`) starts a SuperLink in simulation mode and `flwr run`. They find
Flower's console scripts, pick ports, set Flower's environment and stop process trees the
same way, here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil


def flwr_env(home: Path) -> dict[str, str]:
    """Environment for `flwr` and Flower's processes: config folder `home`, no update check, no
    runtime dependency installation (offline), unbuffered logs."""
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def console_script(name: str) -> str:
    """A console script of the running interpreter's environment (works without an activated venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def stop_process_tree(process: subprocess.Popen | None) -> None:
    """Stop the SuperLink and everything under it, then SIGKILL what is left after 15 s.

    The simulation process and Ray's daemons start their own process groups, so the whole
    process tree is collected first (psutil) rather than signalling one group.
    """
    if process is None:
        return
    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for proc in tree:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    if process.poll() is None:
        process.wait(timeout=10)
