"""A local development cluster: ZooKeeper from Debian's package plus N brokers on loopback.

`logbroker dev-cluster --brokers 3` uses it; so do the tests' fixtures. ZooKeeper runs as
`java -cp ... org.apache.zookeeper.server.quorum.QuorumPeerMain <cfg>` on a loopback port with the
admin server disabled. `$LOGBROKER_ZOOKEEPER_JARS` (paths separated by ":") replaces the Debian jar,
for a ZooKeeper installed elsewhere.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ZOOKEEPER_JARS = ("/usr/share/java/zookeeper.jar",)
ZOOKEEPER_JARS_ENV = "LOGBROKER_ZOOKEEPER_JARS"
ZOOKEEPER_CONF_DIR = "/etc/zookeeper/conf"


def zookeeper_jars() -> tuple[str, ...]:
    """The jars ZooKeeper runs from: $LOGBROKER_ZOOKEEPER_JARS if set, else Debian's."""
    override = os.environ.get(ZOOKEEPER_JARS_ENV, "")
    return tuple(j for j in override.split(":") if j) if override else ZOOKEEPER_JARS


def zookeeper_available() -> str | None:
    """None when ZooKeeper can be started here, else why not."""
    if shutil.which("java") is None:
        return "java is not installed (apt-get install zookeeper brings it)"
    missing = [j for j in zookeeper_jars() if not Path(j).exists()]
    if missing:
        return f"ZooKeeper not found ({', '.join(missing)} missing): install Debian's zookeeper package " \
               "(apt-get install zookeeper)"
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
        classpath = ":".join([ZOOKEEPER_CONF_DIR, *zookeeper_jars()])
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serving(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def dev_cluster_secret(workdir: Path) -> Path:
    """The cluster secret file the dev cluster's brokers share (cluster_secret.py): `cluster-secret` in
    `workdir`, kept across runs, made once (owner-only, written atomically)."""
    path = workdir / "cluster-secret"
    if not path.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = workdir / "cluster-secret.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    return path


def run_dev_cluster(brokers: int, workdir: Path | None, base_port: int = 0, timeout_s: float = 60.0) -> int:
    """Start ZooKeeper and `brokers` brokers, print their addresses, stop them all on Ctrl-C/SIGTERM.

    `workdir` None: a new directory under the system's temp dir (kept after exit, for its logs), so
    the cluster leaves nothing in the current directory.
    """
    import sys

    why = zookeeper_available()
    if why is not None:
        print(f"logbroker: error: {why}", file=sys.stderr)
        return 1
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="logbroker-dev-cluster-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"data        {workdir} (broker-N/ data, broker-N.log logs, zookeeper/zookeeper.log; kept after exit)",
          flush=True)
    zk = ZooKeeperProcess(workdir / "zookeeper", _free_port())
    procs: list[subprocess.Popen[bytes]] = []
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        (workdir / "zookeeper").mkdir(parents=True, exist_ok=True)
        zk.start(timeout_s)
        print(f"zookeeper   {zk.address}", flush=True)
        secret_file = dev_cluster_secret(workdir)
        addresses = []
        for i in range(brokers):
            port = base_port + i if base_port else _free_port()
            address = f"127.0.0.1:{port}"
            log_file = open(workdir / f"broker-{i}.log", "ab")  # noqa: SIM115
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "logbroker", "serve", "--data-dir", str(workdir / f"broker-{i}"),
                 "--listen", address, "--broker-id", str(i), "--zookeeper", f"{zk.address}/logbroker",
                 "--cluster-secret-file", str(secret_file), "--metrics-listen", "off"],
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            ))
            log_file.close()
            addresses.append(address)
        deadline = time.monotonic() + timeout_s
        pending = set(addresses)
        while pending and not stop:
            if time.monotonic() > deadline:
                print(f"logbroker: error: brokers {sorted(pending)} did not start; see {workdir}/broker-*.log",
                      file=sys.stderr)
                return 1
            for p in procs:
                if p.poll() is not None:
                    print(f"logbroker: error: a broker exited with {p.returncode}; see {workdir}/broker-*.log",
                          file=sys.stderr)
                    return 1
            pending = {a for a in pending if not _serving(a)}
            time.sleep(0.2)
        for i, address in enumerate(addresses):
            print(f"broker {i}    {address}", flush=True)
        print(f"bootstrap   {','.join(addresses)}", flush=True)
        print(f"export LOGBROKER_BOOTSTRAP={','.join(addresses)}", flush=True)
        print("Ctrl-C stops the cluster.", flush=True)
        while not stop and all(p.poll() is None for p in procs):
            time.sleep(0.2)
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        zk.stop()
