"""`run --profile DIR`: py-spy on the server (per phase) and on every worker, with a text summary.

py-spy writes collapsed stacks (`--format raw`: "frame;frame;... count" per line, viewable with any
flamegraph tool) when told to stop (SIGINT) or when its target exits. Sampling costs the targets a
little CPU, so profiled runs are never merged into latest.json.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench.procs import STARTED_PIDS

RATE_HZ = 250
# Frames every sample of a process passes through: left out of the inclusive list.
BOILERPLATE = ("(<frozen runpy>)", "(runners.py)", "(spawn.py)", "(process.py)", "(<string>)", "(__main__.py)",
               "BaseEventLoop.run_forever", "BaseEventLoop.run_until_complete", "BaseEventLoop._run_once",
               "Thread._bootstrap", "Thread.run ", "main (cli.py)", "cmd_serve (cli.py)", "main (worker.py)")  # fmt: skip


def py_spy() -> str | None:
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


class Profiler:
    def __init__(self, out_dir: Path, label: str) -> None:
        self.out_dir = out_dir
        self.label = label
        self.exe = py_spy()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.files: list[Path] = []
        out_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, pid: int) -> None:
        if self.exe is None:
            return
        path = self.out_dir / f"{self.label}-{name}.txt"
        argv = [self.exe, "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--format", "raw",
                "--output", str(path), "--nonblocking"]  # fmt: skip
        log = open(self.out_dir / f"{self.label}-{name}.log", "wb")  # noqa: SIM115 - child owns it
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        STARTED_PIDS.append(self.procs[name].pid)
        self.files.append(path)

    def stop(self, name: str, timeout_s: float = 20.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def dump_stacks(pid: int) -> str:
    """`py-spy dump` of a live process (what a stuck server was doing), or '' without py-spy."""
    exe = py_spy()
    if exe is None:
        return ""
    try:
        out = subprocess.run([exe, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"(py-spy dump failed: {exc})"
    return f"--- py-spy dump of {pid} at the failure ---\n{out.stdout}{out.stderr}"


def summarize(path: Path, top: int = 12) -> str:
    """The functions with the most samples: own (leaf) and inclusive (anywhere on the stack)."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"{path.name}: no profile written"
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f.split(" (")[0] + _where(f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return f"{path.name}: no samples"
    out = [f"{path.name}: {total} samples at {RATE_HZ} Hz (idle threads excluded)", "  own time:"]
    out += [f"    {n / total * 100:5.1f} %  {f}" for f, n in own.most_common(top)]
    out.append("  inclusive:")
    interesting = [(f, n) for f, n in incl.most_common() if not any(b in f + " " for b in BOILERPLATE)]
    out += [f"    {n / total * 100:5.1f} %  {f}" for f, n in interesting[:top]]
    return "\n".join(out)


def _where(frame: str) -> str:
    """'fn (path/to/file.py:12)' -> ' (file.py)'; keeps names short and merges line numbers."""
    if " (" not in frame:
        return ""
    loc = frame.split(" (", 1)[1].rstrip(")")
    return f" ({Path(loc.split(':')[0]).name})"
