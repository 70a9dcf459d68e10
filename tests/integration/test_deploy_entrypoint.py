"""The container, without a container engine: the image's entrypoint (`logbroker serve`) with the prod
StatefulSet's arguments, environment and files, against a real ZooKeeper, until the gRPC health
service says SERVING; the rack init container against a fake API server; and the preStop hook's wait
on a real two-broker cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme

from logbroker import Admin, Producer, k8s_rack
from logbroker.tls import TlsConfig
from tests.cluster import Cluster
from tests.conftest import REPO, BrokerProcess, free_port, wait_for
from tests.deploy import (
    CLUSTER_SECRET_KEY,
    CLUSTER_SECRET_NAME,
    TEST_CLUSTER_SECRET,
    TLS_SECRET_NAME,
    container,
    container_env,
    dockerfile_exec_form,
    expand,
    find,
    render_overlay,
)

pytestmark = pytest.mark.timeout(180)

NODE = "node-a"
ZONE = "eu-west-1a"
TOKEN = "test-token"


class FakeApiServer:
    """GET /api/v1/nodes/<name> on 127.0.0.1, as the Kubernetes API server answers it."""

    def __init__(self, nodes: dict[str, dict[str, str]], status: int = 200) -> None:
        outer = self
        self.requests: list[tuple[str, str]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                outer.requests.append((self.path, self.headers.get("Authorization", "")))
                name = self.path.rsplit("/", 1)[-1]
                if status != 200 or not self.path.startswith("/api/v1/nodes/") or name not in nodes:
                    self.send_response(status if status != 200 else 404)
                    self.end_headers()
                    return
                body = json.dumps({"kind": "Node", "metadata": {"name": name, "labels": nodes[name]}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FakeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def run_rack(api: FakeApiServer, tmp_path: Path, output: Path) -> subprocess.CompletedProcess[str]:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    return subprocess.run(
        [sys.executable, "-m", "logbroker.k8s_rack", "--node", NODE, "--output", str(output),
         "--api-url", api.url, "--token-file", str(token), "--ca-file", str(tmp_path / "no-ca.crt")],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )


def test_rack_init_container_writes_the_zone(tmp_path: Path):
    out = tmp_path / "run" / "rack.toml"
    with FakeApiServer({NODE: {"topology.kubernetes.io/zone": ZONE, "kubernetes.io/hostname": NODE}}) as api:
        proc = run_rack(api, tmp_path, out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == k8s_rack.rack_config(ZONE)
    assert api.requests == [(f"/api/v1/nodes/{NODE}", f"Bearer {TOKEN}")]


def test_rack_init_container_without_zone_label_and_without_permission(tmp_path: Path):
    out = tmp_path / "rack.toml"
    with FakeApiServer({NODE: {"kubernetes.io/hostname": NODE}}) as api:
        proc = run_rack(api, tmp_path, out)
    assert proc.returncode == 0 and "without a rack" in proc.stderr
    assert out.read_text() == k8s_rack.rack_config("")
    out.unlink()
    with FakeApiServer({}, status=403) as api:
        proc = run_rack(api, tmp_path, out)
    assert proc.returncode == 1 and "HTTP 403" in proc.stderr and "get` on `nodes" in proc.stderr
    assert not out.exists()


def write_tls_secret(directory: Path) -> TlsConfig:
    """A CA and a broker certificate naming 127.0.0.1 (the probes' address), valid for client auth
    too; the in-pod commands use the same files, and so does this test's client."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost", common_name="logbroker")
    (directory / "tls.crt").write_bytes(b"".join(c.bytes() for c in leaf.cert_chain_pems))
    (directory / "tls.key").write_bytes(leaf.private_key_pem.bytes())
    (directory / "ca.crt").write_bytes(ca.cert_pem.bytes())
    return TlsConfig(str(directory / "ca.crt"), str(directory / "tls.crt"), str(directory / "tls.key"))


class Pod:
    """The prod overlay's broker pod logbroker-2, emulated on loopback: each volume a directory, the
    ConfigMap's keys as files, the rack file from the init container, the container's env expanded."""

    POD_NAME = "logbroker-2"

    def __init__(self, root: Path, zookeeper: str) -> None:
        resources = render_overlay("prod")
        sts = find(resources, "StatefulSet", "logbroker")
        pod = sts["spec"]["template"]["spec"]
        self.main = container(pod, "broker")
        self.mounts: dict[str, Path] = {}
        self.tls: TlsConfig | None = None  # the prod overlay serves TLS from its Secret
        for mount in self.main["volumeMounts"]:
            directory = root / mount["name"]
            directory.mkdir(parents=True)
            self.mounts[mount["mountPath"]] = directory
            volume = next((v for v in pod["volumes"] if v["name"] == mount["name"]), None)
            if volume is not None and "configMap" in volume:
                for key, text in find(resources, "ConfigMap", volume["configMap"]["name"])["data"].items():
                    (directory / key).write_text(text)
            if volume is not None and "secret" in volume and volume["secret"]["secretName"] == TLS_SECRET_NAME:
                self.tls = write_tls_secret(directory)  # as cert-manager writes it: tls.crt, tls.key, ca.crt
            elif volume is not None and "secret" in volume:  # the operator's Secret: a test value
                assert volume["secret"]["secretName"] == CLUSTER_SECRET_NAME
                (directory / CLUSTER_SECRET_KEY).write_text(TEST_CLUSTER_SECRET + "\n")
        self.port = free_port()
        self.metrics_port = free_port()
        self.env = container_env(self.main, {"metadata.name": self.POD_NAME, "metadata.namespace": "streaming"})
        for name, value in self.env.items():  # the TLS files' paths, on this machine
            if name.startswith("LOGBROKER_TLS") and value.startswith("/"):
                self.env[name] = str(self.path(value))
        # what loopback changes: nothing may bind 0.0.0.0 or fixed ports, the pod's DNS name does not
        # resolve here, ZooKeeper is the test's, and /var/lib/logbroker is a temporary directory.
        # Environment variables override the ConfigMap's file, as they would in the pod.
        self.overrides = {
            "LOGBROKER_LISTEN": f"127.0.0.1:{self.port}",
            "LOGBROKER_METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}",
            "LOGBROKER_ADVERTISED_ADDRESS": f"127.0.0.1:{self.port}",
            "LOGBROKER_ZOOKEEPER": zookeeper,
            "LOGBROKER_DATA_DIR": str(self.path("/var/lib/logbroker")),
        }
        self.rack_init = container(pod, "rack", init=True)

    def path(self, in_container: str) -> Path:
        for mount_path, directory in self.mounts.items():
            if in_container == mount_path or in_container.startswith(mount_path.rstrip("/") + "/"):
                return directory / in_container[len(mount_path):].lstrip("/")
        raise AssertionError(f"{in_container} is not on a volume")

    def localize(self, arg: str) -> str:
        return str(self.path(arg)) if arg.startswith("/") else arg

    def run_init_container(self, api: FakeApiServer, tmp_path: Path) -> None:
        args = [expand(a, {"NODE_NAME": NODE}) for a in self.rack_init["args"]]
        out = args[args.index("--output") + 1]
        proc = run_rack(api, tmp_path, self.path(out))
        assert proc.returncode == 0, proc.stderr

    def command(self) -> list[str]:
        entrypoint = dockerfile_exec_form("ENTRYPOINT")
        executable = Path(sys.executable).parent / entrypoint[0]  # the console script pip installed
        assert executable.exists(), executable
        return [str(executable), *entrypoint[1:], *(self.localize(expand(a, self.env)) for a in self.main["args"])]

    def environ(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("LOGBROKER_")}
        return {**base, **self.env, **self.overrides, "HOSTNAME": self.POD_NAME, "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def pod_process(zookeeper, zk_chroot, tmp_path: Path) -> Iterator[tuple[Pod, subprocess.Popen[bytes], Path]]:
    pod = Pod(tmp_path / "pod", f"{zookeeper.address}{zk_chroot}")
    with FakeApiServer({NODE: {"topology.kubernetes.io/zone": ZONE}}) as api:
        pod.run_init_container(api, tmp_path)
    log_path = tmp_path / "broker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(pod.command(), env=pod.environ(), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        yield pod, proc, log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def logbroker_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "logbroker", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def test_entrypoint_with_the_statefulset_settings_turns_serving(pod_process):
    pod, proc, log_path = pod_process
    probe = BrokerProcess(pod.path("/var/lib/logbroker"), pod.port, tls=pod.tls)
    probe.proc = proc  # the fixture owns the process; this only reads its health
    probe.log_path = log_path
    wait_for(probe.serving, 60, f"the broker pod to report SERVING (log: {log_path})")

    # broker id 2 from the pod name, rack from the init container, registered in ZooKeeper
    with Admin(probe.address, tls=pod.tls) as admin:
        brokers = admin.describe_cluster()["brokers"]
    assert brokers == [{"broker_id": 2, "host": "127.0.0.1", "port": pod.port, "rack": ZONE}]

    # the probes and the hook, as the kubelet runs them (pointed at the loopback port)
    liveness = pod.main["livenessProbe"]["exec"]["command"]
    assert liveness[0] == "logbroker"
    alive = logbroker_cli(*liveness[1:], "--address", probe.address, env=pod.environ())  # TLS from LOGBROKER_TLS_*
    assert alive.returncode == 0 and alive.stdout.strip() == "SERVING", alive.stderr
    readiness = pod.main["readinessProbe"]["exec"]["command"]
    ready = logbroker_cli(*readiness[1:], "--address", probe.address, env=pod.environ())
    assert ready.returncode == 0 and ready.stdout.strip() == "SERVING", ready.stderr
    plain = logbroker_cli(*liveness[1:], "--address", probe.address)  # the listener speaks only TLS
    assert plain.returncode != 0

    # the metrics port the pod annotation names
    with urllib.request.urlopen(f"http://127.0.0.1:{pod.metrics_port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'logbroker_broker_info{broker_id="2",rack="eu-west-1a"} 1.0' in metrics
    assert "logbroker_up 1.0" in metrics and "process_resident_memory_bytes" in metrics

    with Admin(probe.address, tls=pod.tls) as admin:
        admin.create_topic("orders", partitions=2, replication_factor=1)
    with Producer(probe.address, acks="all", tls=pod.tls) as producer:
        producer.send("orders", b"v", key=b"k").result(timeout=30)
    pre_stop = pod.main["lifecycle"]["preStop"]["exec"]["command"]
    hook = logbroker_cli(*pre_stop[1:], "--bootstrap", probe.address, env=pod.environ())  # $HOSTNAME: the id
    assert hook.returncode == 0 and "broker 2 can stop" in hook.stdout, hook.stderr

    # SIGTERM (what the kubelet sends after preStop): a clean exit well inside the grace period
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert "stopped cleanly" in log_path.read_text()

    # preStop for a broker that does not answer (hung, or killed after failing its liveness probe)
    # gives up after WAIT_SAFE_UNREACHABLE_S instead of holding the restart for its whole timeout
    hook = logbroker_cli(*pre_stop[1:], "--bootstrap", probe.address, env=pod.environ(), timeout=60)
    lines = hook.stderr.splitlines()  # the error, after at most the client's one line about its circuit
    assert hook.returncode == 1 and len(lines) <= 2 and "not waiting" in lines[-1], hook.stderr
    assert len(lines) == 1 or "circuit to broker" in lines[0], hook.stderr


def test_entrypoint_refuses_a_misspelt_setting(tmp_path: Path):
    pod = Pod(tmp_path / "pod", "127.0.0.1:1/none")
    (pod.path("/etc/logbroker/broker.toml")).write_text('zk_sesion_timeout_ms = 1\n')
    pod.path("/var/run/logbroker/rack.toml").write_text(k8s_rack.rack_config(ZONE))
    proc = subprocess.run(pod.command(), env=pod.environ(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "unknown setting 'zk_sesion_timeout_ms'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture
def cluster2(zookeeper, zk_chroot, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(zookeeper, zk_chroot, tmp_path, 2, session_timeout_ms=2000,
                extra_args=["--replica-lag-time-max-ms", "2000"])
    try:
        yield c.start()
    finally:
        c.stop()


def test_pre_stop_waits_until_the_peer_is_back_in_sync(cluster2: Cluster):
    """A rolling update: broker 1 was stopped; until it is back in the ISR, stopping broker 0 would
    leave the partition with no in-sync replica to spare, so the hook waits (and gives up at its
    timeout); once broker 1 has caught up, it returns at once."""
    bootstrap = cluster2.brokers[0].address
    with Admin(bootstrap) as admin:
        admin.create_topic("events", partitions=1, replication_factor=2)
    wait_for(lambda: sorted(cluster2.partition_states("events")[0].isr) == [0, 1], 30, "ISR [0, 1]")
    ok = logbroker_cli("wait-safe-to-stop", "--broker-id", "0", "--timeout", "30", "--bootstrap", bootstrap)
    assert ok.returncode == 0, ok.stderr

    cluster2.brokers[1].stop()
    wait_for(lambda: list(cluster2.partition_states("events", via=0)[0].isr) == [0], 30, "ISR [0]")
    blocked = logbroker_cli("wait-safe-to-stop", "--broker-id", "0", "--timeout", "1", "--interval", "0.2",
                            "--bootstrap", bootstrap)
    assert blocked.returncode == 1 and "events-0 (isr [0] of" in blocked.stderr, blocked.stderr

    waiter = subprocess.Popen([sys.executable, "-m", "logbroker", "wait-safe-to-stop", "--broker-id", "0",
                               "--timeout", "60", "--interval", "0.2", "--bootstrap", bootstrap],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        cluster2.brokers[1].start()
        out, err = waiter.communicate(timeout=90)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait(timeout=10)
    assert waiter.returncode == 0 and "broker 0 can stop" in out, err
    assert sorted(cluster2.partition_states("events")[0].isr) == [0, 1]
