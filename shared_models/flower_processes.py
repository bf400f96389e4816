"""Starting and stopping Flower's processes: what the node, the coordinator and the simulation runner share.

`fedpriv node` (`client.supernode`) starts `flower-supernode`, `fedpriv server`
(`server.superlink`) starts `flower-superlink`, and `fedpriv simulate`
(`simulations.runner`) starts a SuperLink in simulation mode and `flwr run`. They find
Flower's console scripts, pick ports, set Flower's environment and stop process trees the
same way, here.

Service-friendly: Flower's processes spawn others by name from PATH (`flower-superexec`,
then `flwr-serverapp`, `flwr-clientapp`, `flwr-simulation`), so `flower_env` puts the bin
folder of the interpreter running fedpriv first on PATH: a `fedpriv` called by its absolute
path from a venv that is not activated (systemd, cron, a container's entry point) starts
Flower from that same venv.

No orphans: every process started with `start_flower` gets SIGTERM when the fedpriv process
that started it dies, however it dies (Linux `prctl(PR_SET_PDEATHSIG)`), and carries an
environment marker (`OWNER_VARIABLE`) that everything Flower and Ray start beneath it
inherits. A small reaper process, started once per fedpriv process, waits for fedpriv to
end and then stops every process still carrying its marker, and every descendant of a
marked process it has seen (SIGTERM, SIGKILL 5 s later): a SIGKILL of `fedpriv
simulate` leaves no SuperLink, `flwr run`, simulation or Ray process. Why descendants too:
Ray's agents rename themselves (setproctitle), which can overwrite the environment that
/proc shows, and once their raylet is gone they are orphans nobody else stops.
"""

from __future__ import annotations

import ctypes
import os
import random
import re
import signal
import socket
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

import psutil

APP_DIR = Path(__file__).resolve().parents[1]  # the folder holding pyproject.toml (the Flower App)
OWNER_VARIABLE = "FEDPRIV_OWNER"  # marks every process a fedpriv process started, and their descendants
_PR_SET_PDEATHSIG = 1
try:  # loaded here, not in the forked child (preexec_fn must not load libraries)
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _PRCTL = None
_owner_token: str | None = None
_reaper: subprocess.Popen | None = None


def bin_dir() -> Path:
    """The bin folder of the environment running fedpriv (`sys.executable`'s folder, symlinks kept)."""
    return Path(sys.executable).parent


def owner_token() -> str:
    """This fedpriv process's marker: `OWNER_VARIABLE` in the environment of each Flower process it starts."""
    global _owner_token
    if _owner_token is None:
        _owner_token = f"{os.getpid()}-{uuid.uuid4().hex}"
    return _owner_token


def process_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ for a Flower process: this environment's bin folder first on PATH, unbuffered
    output, this process's owner marker, plus `extra`."""
    path = os.environ.get("PATH", "")
    first = str(bin_dir())
    if path.split(os.pathsep)[0] != first:
        path = first + (os.pathsep + path if path else "")
    return {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1", OWNER_VARIABLE: owner_token(), **(extra or {})}


def flwr_env(home: Path) -> dict[str, str]:
    """Environment for `flwr` and Flower's processes: config folder `home`, no update check, no
    runtime dependency installation (offline), unbuffered logs, this environment's bin folder first
    on PATH (see the module docstring)."""
    return process_env({"FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
                        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"})


_LISTEN_PORTS = (20000, 32768)  # below Linux's default ephemeral range (32768-60999)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, outside the OS's ephemeral range where it can.

    Why outside: a service restarted on its port (a coordinator after a crash) must find it
    free again, and a port in the ephemeral range can meanwhile be taken as the local end of
    any outgoing connection, even a node's own retry to that very port (TCP self-connect).
    Falls back to a port the OS picks when none below the range is free.
    """
    low, high = _ephemeral_range()
    candidates = [port for port in range(*_LISTEN_PORTS) if not low <= port <= high]
    for port in random.sample(candidates, min(50, len(candidates))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def console_script(name: str) -> str:
    """A console script of the running interpreter's environment (works without an activated venv)."""
    candidate = bin_dir() / name
    return str(candidate) if candidate.exists() else name


def _die_with_parent(parent: int):
    """preexec_fn: SIGTERM this child when the process that started it dies (Linux), even by SIGKILL."""
    def setup() -> None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took hold
            os.kill(os.getpid(), signal.SIGTERM)
    return setup


def start_flower(command: list[str], *, env: dict[str, str] | None = None, new_session: bool = True,
                 **popen) -> subprocess.Popen:
    """Popen a Flower process (or nginx) that cannot outlive this fedpriv process.

    env: defaults to `process_env()`; it always carries this process's owner marker. The
    child gets its own process group (`new_session`), a parent-death signal (Linux), and the
    reaper (`ensure_reaper`) stops it and its descendants once this process is gone.
    """
    env = {**(env if env is not None else process_env()), OWNER_VARIABLE: owner_token()}
    ensure_reaper()
    preexec = _die_with_parent(os.getpid()) if _PRCTL is not None else None
    return subprocess.Popen(command, env=env, start_new_session=new_session, preexec_fn=preexec, **popen)


_REAPER_SOURCE = r"""
import sys, time, psutil
parent, created, token, variable = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
known = {}  # pid -> create time of every marked process seen, and of every process beneath one
def alive():
    try:
        proc = psutil.Process(parent)
        return abs(proc.create_time() - created) < 1 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
def remember(procs):
    for proc in procs:
        try:
            known.setdefault(proc.pid, proc.create_time())
        except psutil.Error:
            pass
def descendants(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
def marked(proc):
    try:
        return proc.environ().get(variable) == token
    except (psutil.Error, OSError):
        return False
def targets():
    found = {}
    for proc in psutil.process_iter():
        if proc.pid != psutil.Process().pid and marked(proc):
            found[proc.pid] = proc
    for pid, born in known.items():  # a renamed process (setproctitle) may no longer show its environ
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == born:
                found.setdefault(pid, proc)
        except psutil.Error:
            pass
    for pid in list(found):
        for child in descendants(pid):
            found.setdefault(child.pid, child)
    remember(found.values())
    live = []
    for proc in found.values():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                live.append(proc)
        except psutil.Error:
            pass
    return live
while alive():  # remember the trees of fedpriv's Flower processes while they can still be told apart
    for child in descendants(parent):
        if marked(child):
            remember([child, *descendants(child.pid)])
    time.sleep(0.5)
quiet = 0
deadline = time.monotonic() + 60
while quiet < 2 and time.monotonic() < deadline:
    procs = targets()
    if not procs:
        quiet += 1
        time.sleep(0.5)
        continue
    quiet = 0
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(procs, timeout=5)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
"""


def ensure_reaper() -> None:
    """Start (once per process) the reaper that stops this process's Flower processes after it dies."""
    global _reaper
    if _reaper is not None and _reaper.poll() is None:
        return
    env = {k: v for k, v in os.environ.items() if k != OWNER_VARIABLE}
    _reaper = subprocess.Popen(
        [sys.executable, "-c", _REAPER_SOURCE, str(os.getpid()), repr(psutil.Process().create_time()),
         owner_token(), OWNER_VARIABLE],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True)


_ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit|Interrupt): .+")
ATTEMPT_MARK = "===== fedpriv attempt started"


def attempt_header() -> bytes:
    """The line fedpriv writes into an appended log before each attempt (`last_error` reads only the last one)."""
    return f"\n{ATTEMPT_MARK} {datetime.now(timezone.utc).isoformat(timespec='seconds')} =====\n".encode()


def last_error(*log_files: Path) -> str:
    """': <exception line>' from the last of `log_files` that has one, or '' (the cause, before "see LOG").

    Reads Flower's logs (`--log-file`, and the captured stdout/stderr where uvicorn and
    tracebacks land) for lines such as `FileNotFoundError: [Errno 2] No such file or
    directory: 'flower-superexec'`.
    """
    for log_file in reversed(log_files):
        if log_file is not None and Path(log_file).exists():
            line = exception_line(Path(log_file).read_text(errors="replace"))
            if line:
                return f": {line}"
    return ""


def exception_line(text: str) -> str:
    """The last `SomeError: message` line of a log's `text` (of its last attempt, see `attempt_header`),
    stripped, or ''."""
    text = text[text.rfind(ATTEMPT_MARK):] if ATTEMPT_MARK in text else text
    hits = [line.strip() for line in text.splitlines() if _ERROR_LINE.match(line.strip())]
    return hits[-1] if hits else ""


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
