"""Process lifecycle: every server and worker the harness starts is stopped, even on error or Ctrl-C.

- Servers run in their own session (the terminal's Ctrl-C reaches only the harness, which then stops
  them in order) and get PR_SET_PDEATHSIG=SIGKILL, so even a `kill -9` of the harness takes them along.
  They get it from a tiny exec wrapper (`dying_with_parent`), not from a `preexec_fn`: a preexec_fn
  makes subprocess fork() instead of vfork(), and a fork() while the harness's own gRPC client is
  busy (the failover measurement restarts brokers under a running producer) runs gRPC's fork
  handlers, which can abort the child before it execs ("epoll_wait error: Bad file descriptor").
- Workers are `multiprocessing` spawn children that ignore SIGINT, die with the harness
  (PR_SET_PDEATHSIG too) and are otherwise terminated, then killed, by `reap()`.
- Every pid started is recorded in `STARTED_PIDS` so results can prove that all were reaped.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing.process
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

STARTED_PIDS: list[int] = []
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def die_with_parent(parent_pid: int | None = None) -> None:
    """SIGKILL this process when its parent dies (Linux prctl); exit now if it already has."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


# argv[1] = the harness's pid, argv[2:] = the command. PR_SET_PDEATHSIG survives execve.
_PDEATHSIG_EXEC = (
    "import ctypes, os, sys\n"
    f"ctypes.CDLL('libc.so.6', use_errno=True).prctl({_PR_SET_PDEATHSIG}, {int(signal.SIGKILL)})\n"
    "if os.getppid() != int(sys.argv[1]): os._exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def dying_with_parent(argv: Sequence[str]) -> list[str]:
    """`argv`, run so that the process (same pid, after an exec) is SIGKILLed when this one dies."""
    return [sys.executable, "-I", "-S", "-c", _PDEATHSIG_EXEC, str(os.getpid()), *argv]


class ServerProcess:
    """A server subprocess with its output in a log file; `stop()` is idempotent."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            dying_with_parent(self.argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        STARTED_PIDS.append(self.proc.pid)
        self.exit_code: int | None = None
        self.graceful: bool | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll `ready()` until it is true; fail with the server's log tail if it dies or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited with code {self.proc.returncode} before {what}:\n{self.log_tail()}"
                )
            try:
                if ready():
                    return
            except Exception:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not {what} after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.exit_code is None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout_s)
                    self.graceful = True
                except subprocess.TimeoutExpired:
                    self.graceful = False
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(5)
            else:
                self.graceful = False  # it was already gone: a crash, not a stop
            self.exit_code = self.proc.returncode
        self._log.close()


def reap(procs: Sequence[multiprocessing.process.BaseProcess], grace_s: float = 3.0) -> None:
    """Join worker processes; terminate, then kill, whatever is still alive."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join(2.0)


def pid_exists(pid: int) -> bool:
    """True while the pid is a live (non-zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")
