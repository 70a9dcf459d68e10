"""deploy/: every rendered manifest is valid Kubernetes (strict, offline), every setting the manifests
give `logbroker serve` is accepted by its configuration loader, and the pieces agree with each other
(ports, paths, names, replica counts, shutdown budget)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from logbroker import cli, k8s_rack
from logbroker.config import (
    SERVE_SETTINGS_BY_NAME,
    broker_config_from_settings,
    parse_host_port,
    read_serve_config_file,
    read_serve_env,
    resolve_serve_settings,
)
from tests.deploy import (
    CLUSTER_SECRET_KEY,
    CLUSTER_SECRET_NAME,
    DEPLOY,
    OVERLAYS,
    TEST_CLUSTER_SECRET,
    TLS_SECRET_KEYS,
    TLS_SECRET_NAME,
    container,
    container_env,
    dockerfile_exec_form,
    dockerfile_instructions,
    expand,
    find,
    render_overlay,
)

EXPECTED_REPLICAS = {"dev": (1, 1), "prod": (3, 3)}  # (zookeeper, brokers)
SHUTDOWN_GRACE_S = 5  # BrokerConfig.shutdown_grace_s: the gRPC server's drain after controlled shutdown
# the oldest Kubernetes the manifests claim (gRPC probes are GA in 1.27) and the newest schemas shipped
K8S_VERSIONS = ("1.27.0", None)


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render_overlay(request.param)


def validate(path: Path, version: str | None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", str(path)]
    if version:
        cmd[3:3] = ["-k", version]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_strictly(overlay, version, tmp_path: Path):
    name, resources = overlay
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(resources))
    proc = validate(path, version)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kinds = sorted(r["kind"] for r in resources)
    assert kinds == sorted(["ConfigMap", "ConfigMap", "Service", "Service", "Service", "Service", "StatefulSet",
                            "StatefulSet", "PodDisruptionBudget", "PodDisruptionBudget", "ServiceAccount",
                            "ClusterRole", "ClusterRoleBinding"])


@pytest.mark.timeout(300)
def test_strict_validation_rejects_an_unknown_field(tmp_path: Path):
    """The negative control: a misspelt field must fail, or the test above proves nothing."""
    resources = render_overlay("dev")
    sts = find(resources, "StatefulSet", "logbroker")
    broker = container(sts["spec"]["template"]["spec"], "broker")
    broker["livenesProbe"] = broker.pop("livenessProbe")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump_all(resources))
    proc = validate(path, None)
    assert proc.returncode != 0 and "livenesProbe" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def broker_parts(resources: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    sts = find(resources, "StatefulSet", "logbroker")
    pod = sts["spec"]["template"]["spec"]
    return sts, pod, container(pod, "broker")


def materialize(path: str, pod: dict[str, Any], main: dict[str, Any], resources: list[dict[str, Any]],
                root: Path) -> Path:
    """The file a container sees at `path`: from a ConfigMap volume, or written into an emptyDir by an
    init container (the rack file), copied under `root`."""
    mount = next(m for m in main["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    relative = path[len(mount["mountPath"].rstrip("/")) + 1:]
    target = root / mount["name"] / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if "secret" in volume and volume["secret"]["secretName"] == TLS_SECRET_NAME:
        assert relative in TLS_SECRET_KEYS, volume
        target.write_text(_test_tls_files()[relative])
    elif "secret" in volume:  # created by the operator, not in the manifests: a test secret
        assert volume["secret"]["secretName"] == CLUSTER_SECRET_NAME and relative == CLUSTER_SECRET_KEY, volume
        target.write_text(TEST_CLUSTER_SECRET + "\n")
    elif "configMap" in volume:
        data = find(resources, "ConfigMap", volume["configMap"]["name"])["data"]
        assert relative in data, f"ConfigMap {volume['configMap']['name']} has no key {relative}"
        target.write_text(data[relative])
    elif "emptyDir" in volume:
        writers = [c for c in pod.get("initContainers", [])
                   if any(m["name"] == mount["name"] for m in c.get("volumeMounts", []))]
        assert [c["name"] for c in writers] == ["rack"], f"who writes {path}?"
        args = k8s_rack.build_parser().parse_args(
            [expand(a, {"NODE_NAME": "node-a"}) for a in writers[0]["args"]])
        assert str(args.output) == path
        target.write_text(k8s_rack.rack_config("zone-a"))
    else:
        raise AssertionError(f"{path}: unexpected volume {volume}")
    return target


_TLS_FILES: dict[str, str] = {}


def _test_tls_files() -> dict[str, str]:
    """What cert-manager would write into the TLS Secret: tls.crt, tls.key, ca.crt (made once)."""
    if not _TLS_FILES:
        import trustme

        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1", "*.logbroker-headless.ns.svc", common_name="logbroker")
        _TLS_FILES.update({"tls.crt": leaf.cert_chain_pems[0].bytes().decode(),
                           "tls.key": leaf.private_key_pem.bytes().decode(), "ca.crt": ca.cert_pem.bytes().decode()})
    return _TLS_FILES


TLS_ENV = {"LOGBROKER_TLS_CERT": "tls.crt", "LOGBROKER_TLS_KEY": "tls.key", "LOGBROKER_TLS_CLIENT_CA": "ca.crt"}
EXPECTED_SERVE_ENV = {"dev": {"advertised_address"},
                      "prod": {"advertised_address", "tls_cert", "tls_key", "tls_client_ca", "tls_client_auth"}}


def serve_argv(main: dict[str, Any], env: dict[str, str]) -> list[str]:
    """What the container runs: the image's ENTRYPOINT (`logbroker serve`) plus the container's args."""
    entrypoint = dockerfile_exec_form("ENTRYPOINT")
    assert entrypoint == ["logbroker", "serve"]
    assert "command" not in main, "the broker container must keep the image's entrypoint"
    return [*entrypoint[1:], *(expand(a, env) for a in main["args"])]


def test_every_broker_setting_is_accepted_and_the_id_comes_from_the_pod_name(overlay, tmp_path: Path):
    name, resources = overlay
    sts, pod, main = broker_parts(resources)
    _, brokers = EXPECTED_REPLICAS[name]
    configs = []
    for ordinal in range(brokers):
        pod_name = f"{sts['metadata']['name']}-{ordinal}"
        env = container_env(main, {"metadata.name": pod_name, "metadata.namespace": "ns"})
        args = cli.build_parser().parse_args(serve_argv(main, env))  # unknown flags exit here
        files = [materialize(path, pod, main, resources, tmp_path / pod_name) for path in args.config]
        secret_in_pod = args.cluster_secret_file
        args.cluster_secret_file = str(materialize(secret_in_pod, pod, main, resources, tmp_path / pod_name))
        for f in files:
            read_serve_config_file(f)  # unknown keys and wrong types raise here
        for var in TLS_ENV:  # the TLS files, where the Secret's keys would be
            if var in env:
                env[var] = str(materialize(env[var], pod, main, resources, tmp_path / pod_name))
        assert set(read_serve_env(env)) == EXPECTED_SERVE_ENV[name]  # unknown LOGBROKER_* raise here
        values = resolve_serve_settings(files, env, cli.serve_flags(args))
        configs.append(broker_config_from_settings(values, hostname=pod_name))
    assert [c.broker_id for c in configs] == list(range(brokers))
    for ordinal, c in enumerate(configs):
        assert c.advertised == (f"logbroker-{ordinal}.{sts['spec']['serviceName']}.ns.svc", c.listen_port)
        assert c.rack == "zone-a"
        assert c.zookeeper == "zookeeper:2181/logbroker"
        assert str(c.data_dir) == "/var/lib/logbroker"
        assert c.cluster_secret == TEST_CLUSTER_SECRET.encode()
        assert (c.tls is not None) == (name == "prod")


def test_the_cluster_secret_comes_from_a_secret_mounted_read_only(overlay):
    """A cluster broker does not start without --cluster-secret-file; the file is the Secret's key,
    mounted read-only, readable by the broker's group only."""
    _, resources = overlay
    _, pod, main = broker_parts(resources)
    args = cli.build_parser().parse_args(serve_argv(main, {}))
    path = args.cluster_secret_file
    mount = next(m for m in main["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
    assert mount["readOnly"] is True and path == f"{mount['mountPath']}/{CLUSTER_SECRET_KEY}"
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"] == {"secretName": CLUSTER_SECRET_NAME, "defaultMode": 0o440}
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    assert not any(r["kind"] == "Secret" for r in resources), "the secret must not live in git"


def test_prod_takes_its_tls_files_from_a_secret_mounted_read_only(overlay):
    """The broker's certificate, key and client CA are the keys of the Secret logbroker-tls (as
    cert-manager writes them), mounted read-only as a directory (a subPath mount would never see a
    renewed certificate), set through their LOGBROKER_* variables with client certificates
    required; the in-pod commands (probes, preStop) use the same files as their client TLS."""
    name, resources = overlay
    _, pod, main = broker_parts(resources)
    env = {e["name"]: e.get("value") for e in main["env"]}
    if name == "dev":
        assert not any(k.startswith("LOGBROKER_TLS") for k in env), "dev is plaintext"
        return
    mount = next(m for m in main["volumeMounts"] if m["name"] == "tls")
    assert mount["readOnly"] is True and "subPath" not in mount
    volume = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert volume["secret"] == {"secretName": TLS_SECRET_NAME, "defaultMode": 0o440}
    for var, key in TLS_ENV.items():
        assert env[var] == f"{mount['mountPath']}/{key}", var
        assert var.removeprefix("LOGBROKER_").lower() in SERVE_SETTINGS_BY_NAME
    assert env["LOGBROKER_TLS_CLIENT_AUTH"] == "required"
    assert env["LOGBROKER_TLS_CA"] == f"{mount['mountPath']}/ca.crt"  # the CLI's CA (not a serve setting)
    assert not any(r["kind"] == "Secret" for r in resources), "the key must not live in git"


def test_every_setting_in_the_configmap_is_a_serve_setting(overlay):
    _, resources = overlay
    text = find(resources, "ConfigMap", "logbroker-config")["data"]["broker.toml"]
    assert set(tomllib.loads(text)) <= set(SERVE_SETTINGS_BY_NAME)


def settings(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return tomllib.loads(find(resources, "ConfigMap", "logbroker-config")["data"]["broker.toml"])


def test_probes_hooks_and_init_container_commands_parse(overlay):
    _, resources = overlay
    _, pod, main = broker_parts(resources)
    liveness = main["livenessProbe"]["exec"]["command"]
    pre_stop = main["lifecycle"]["preStop"]["exec"]["command"]
    for command in (liveness, pre_stop):
        assert command[0] == "logbroker"
        cli.build_parser().parse_args(command[1:])
    assert cli.build_parser().parse_args(liveness[1:]).liveness
    assert cli.build_parser().parse_args(pre_stop[1:]).broker_id_from_hostname
    rack = container(pod, "rack", init=True)
    assert rack["command"] == ["python", "-m", "logbroker.k8s_rack"]
    k8s_rack.build_parser().parse_args([expand(a, {"NODE_NAME": "n"}) for a in rack["args"]])
    assert rack["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_ports_names_and_paths_agree(overlay):
    _, resources = overlay
    sts, pod, main = broker_parts(resources)
    cfg = settings(resources)
    listen_port = parse_host_port(cfg["listen"])[1]
    metrics_port = parse_host_port(cfg["metrics_listen"])[1]
    data_port = parse_host_port(cfg["data_listen"])[1]
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"grpc": listen_port, "data": data_port, "metrics": metrics_port}
    readiness = main["readinessProbe"]
    if "grpc" in readiness:
        assert readiness["grpc"]["port"] == listen_port
    else:  # (TLS: the kubelet's gRPC probe speaks none) the CLI asks the health service
        command = readiness["exec"]["command"]
        health = cli.build_parser().parse_args(command[1:])
        assert command[:2] == ["logbroker", "health"] and not health.liveness
        assert parse_host_port(health.address)[1] == listen_port
        assert health.timeout < readiness["timeoutSeconds"]
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"
    # the image runs a standalone broker with /metrics on the same port, and exposes it
    cmd = dockerfile_exec_form("CMD")
    assert parse_host_port(cmd[cmd.index("--metrics-listen") + 1])[1] == metrics_port
    assert str(metrics_port) in [v for w, v in dockerfile_instructions() if w == "EXPOSE"][0].split()
    advertised = next(e["value"] for e in main["env"] if e["name"] == "LOGBROKER_ADVERTISED_ADDRESS")
    assert advertised == f"$(POD_NAME).{sts['spec']['serviceName']}.$(POD_NAMESPACE).svc:{listen_port}"
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert mounts[cfg["data_dir"]] == sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    assert [v for v in dockerfile_instructions() if v[0] == "VOLUME"] == [("VOLUME", f'["{cfg["data_dir"]}"]')]
    assert pod["serviceAccountName"] == find(resources, "ServiceAccount", "logbroker")["metadata"]["name"]

    headless = find(resources, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert {p["name"]: p["port"] for p in headless["spec"]["ports"]} == ports  # clients reach each pod's data port
    client = find(resources, "Service", "logbroker")
    assert {p["port"] for p in client["spec"]["ports"]} == {listen_port}
    for svc in (headless, client):
        assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]

    zk_host, zk_port = parse_host_port(cfg["zookeeper"].split("/")[0])
    zk_service = find(resources, "Service", zk_host)
    assert zk_port in {p["port"] for p in zk_service["spec"]["ports"]}


def test_replicas_disruption_budgets_and_anti_affinity(overlay):
    name, resources = overlay
    zk_replicas, broker_replicas = EXPECTED_REPLICAS[name]
    for sts_name, replicas in (("zookeeper", zk_replicas), ("logbroker", broker_replicas)):
        sts = find(resources, "StatefulSet", sts_name)
        assert sts["spec"]["replicas"] == replicas
        labels = sts["spec"]["selector"]["matchLabels"]
        pdb = find(resources, "PodDisruptionBudget", sts_name)
        assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": labels}}
        terms = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms == [{"labelSelector": {"matchLabels": labels}, "topologyKey": "kubernetes.io/hostname"}]
        assert sts["spec"]["volumeClaimTemplates"], sts_name

    zk = find(resources, "StatefulSet", "zookeeper")
    servers = find(resources, "ConfigMap", "zookeeper-env")["data"]["ZOO_SERVERS"].split()
    assert servers == [f"server.{i + 1}=zookeeper-{i}.{zk['spec']['serviceName']}:2888:3888;2181"
                       for i in range(zk_replicas)]
    zk_headless = find(resources, "Service", zk["spec"]["serviceName"])
    assert zk_headless["spec"]["publishNotReadyAddresses"] is True


def test_the_grace_period_covers_pre_stop_and_controlled_shutdown(overlay):
    _, resources = overlay
    _, pod, main = broker_parts(resources)
    pre_stop = cli.build_parser().parse_args(main["lifecycle"]["preStop"]["exec"]["command"][1:])
    shutdown_s = settings(resources)["controlled_shutdown_timeout_ms"] / 1000
    assert pod["terminationGracePeriodSeconds"] >= pre_stop.timeout + shutdown_s + SHUTDOWN_GRACE_S + 10


def test_namespace_and_cluster_role_binding(overlay):
    _, resources = overlay
    namespaces = {r["metadata"].get("namespace") for r in resources
                  if r["kind"] not in ("ClusterRole", "ClusterRoleBinding")}
    assert len(namespaces) == 1 and None not in namespaces
    (namespace,) = namespaces
    binding = next(r for r in resources if r["kind"] == "ClusterRoleBinding")
    assert binding["metadata"]["name"].startswith(namespace)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "logbroker", "namespace": namespace}]
    assert binding["roleRef"]["name"] == find(resources, "ClusterRole", "logbroker-node-reader")["metadata"]["name"]


def test_dockerfile():
    instructions = dockerfile_instructions()
    froms = [args for word, args in instructions if word == "FROM"]
    args = dict(a.split("=", 1) for word, a in instructions if word == "ARG" and "=" in a)
    assert "slim" in args["PYTHON_IMAGE"] and all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    (user,) = [a for word, a in instructions if word == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root user (runAsNonRoot can check it)"
    assert any(word == "RUN" and "pip install ." in a for word, a in instructions)
    assert dockerfile_exec_form("ENTRYPOINT") == ["logbroker", "serve"]
    cmd = dockerfile_exec_form("CMD")
    cli.build_parser().parse_args(["serve", *cmd])
    health = next(a for word, a in instructions if word == "HEALTHCHECK")
    assert 'CMD ["logbroker", "health"]' in health
    for _, resources in ((o, render_overlay(o)) for o in OVERLAYS):
        _, pod, main = broker_parts(resources)
        assert pod["securityContext"]["runAsUser"] == int(uid)
        assert main["image"] == container(pod, "rack", init=True)["image"]
    assert (DEPLOY / "Dockerfile.dockerignore").exists()


def test_zookeeper_myid_is_the_ordinal_plus_one(overlay):
    """The ZooKeeper command after the kubelet's `$$` unescaping, run by bash with the entrypoint
    swapped for an echo: zookeeper-N gets myid N + 1, matching server.N+1 in ZOO_SERVERS."""
    _, resources = overlay
    zk = container(find(resources, "StatefulSet", "zookeeper")["spec"]["template"]["spec"], "zookeeper")
    shell, flag, script = (expand(a, {}) for a in zk["command"])
    entry = "exec /docker-entrypoint.sh zkServer.sh start-foreground"
    assert (shell, flag) == ("bash", "-c") and script.endswith(entry)
    for ordinal in range(3):
        proc = subprocess.run([shell, flag, script.replace(entry, 'echo "$ZOO_MY_ID"')], capture_output=True,
                              text=True, timeout=30, env={"HOSTNAME": f"zookeeper-{ordinal}", "PATH": "/usr/bin:/bin"})
        assert proc.stdout.strip() == str(ordinal + 1), proc.stderr
