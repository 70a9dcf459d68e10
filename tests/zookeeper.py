"""A real ZooKeeper server for tests: Debian's `zookeeper` package, started as
`java -cp ... org.apache.zookeeper.server.quorum.QuorumPeerMain <cfg>` on a free loopback port with
the admin server disabled, and always stopped by its fixture."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

ZOOKEEPER_JARS = ("/usr/share/java/zookeeper.jar",)
ZOOKEEPER_CONF_DIR = "/etc/zookeeper/conf"


def zookeeper_available() -> str | None:
    """None when ZooKeeper can be started here, else why not."""
    if shutil.which("java") is None:
        return "java is not installed (apt-get install zookeeper brings it)"
    if not all(Path(j).exists() for j in ZOOKEEPER_JARS):
        return "Debian's zookeeper package is not installed (apt-get install zookeeper)"
    return None


def _ruok(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"ruok")
            return s.recv(4) == b"imok"
    except OSError:
        return False


class ZooKeeperProcess:
    def __init__(self, workdir: Path, port: int, tick_ms: int = 500) -> None:
        self.workdir = workdir
        self.port = port
        self.tick_ms = tick_ms
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "zookeeper.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> ZooKeeperProcess:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "zoo.cfg"
        cfg.write_text(
            f"tickTime={self.tick_ms}\n"
            f"dataDir={data}\n"
            f"clientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\n"
            "admin.enableServer=false\n"
            "minSessionTimeout=1000\n"
            "maxSessionTimeout=60000\n"
            "4lw.commands.whitelist=ruok,stat,srvr\n"
        )
        classpath = ":".join([ZOOKEEPER_CONF_DIR, *ZOOKEEPER_JARS])
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed by the child's exit
        self.proc = subprocess.Popen(
            ["java", "-Xmx256m", "-XX:+UseSerialGC", "-cp", classpath,
             "-Dzookeeper.admin.enableServer=false", "-Dzookeeper.jmx.log4j.disable=true",
             "org.apache.zookeeper.server.quorum.QuorumPeerMain", str(cfg)],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True,
        )
        log_file.close()
        deadline = time.monotonic() + timeout_s
        while not _ruok(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"zookeeper exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"zookeeper did not answer ruok within {timeout_s}s")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
