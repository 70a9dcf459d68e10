"""The tests' kustomize renderer (tests/kustomize_lite.py): its semantics on a small tree, its refusals,
and — when `kustomize` or `kubectl` is on PATH — identical output to the real thing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy import K8S, OVERLAYS
from tests.kustomize_lite import KustomizeError, render, resource_id

BASE = """
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: app}
spec:
  replicas: 3
  serviceName: app
  selector: {matchLabels: {app: app}}
  template:
    metadata: {labels: {app: app}}
    spec:
      containers:
        - name: main
          image: app:1
          args: ["--a", "1"]
          env:
            - {name: A, value: "1"}
            - {name: B, value: "2"}
          resources: {requests: {cpu: 100m}, limits: {cpu: "1", memory: 1Gi}}
          volumeMounts:
            - {name: data, mountPath: /data}
        - name: side
          image: side:1
        - name: other
          image: other:1
      tolerations: [{key: a, operator: Exists}]
  volumeClaimTemplates:
    - metadata: {name: data}
      spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg}
data: {a: "1", b: "2"}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: reader}
rules: [{apiGroups: [""], resources: [nodes], verbs: [get]}]
"""

PATCH = """
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: app}
spec:
  template:
    spec:
      containers:
        - name: other
          image: other:2
        - name: main
          args: ["--b"]
          env:
            - {name: B, value: "20"}
            - {name: C, value: "3"}
          resources: {requests: {cpu: 2}, limits: {memory: null}}
          volumeMounts:
            - {name: data, mountPath: /data, readOnly: true}
  volumeClaimTemplates:
    - metadata: {name: data}
      spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 9Gi}}}
"""


def write_tree(root: Path, overlay: str, patch: str = PATCH) -> Path:
    (root / "base").mkdir(parents=True)
    (root / "base" / "app.yaml").write_text(BASE)
    (root / "base" / "kustomization.yaml").write_text("resources: [app.yaml]\n")
    (root / "overlay").mkdir()
    (root / "overlay" / "patch.yaml").write_text(patch)
    (root / "overlay" / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {b: '22'}\n")
    (root / "overlay" / "kustomization.yaml").write_text(overlay)
    return root / "overlay"


OVERLAY = """
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: ns1
resources: [../base]
replicas: [{name: app, count: 1}]
images:
  - {name: app, newName: registry.example:5000/team/app, newTag: "2.0"}
  - {name: side, digest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}
patches:
  - path: patch.yaml
  - path: cm.yaml
"""


def by_id(resources: list[dict]) -> dict:
    return {resource_id(r): r for r in resources}


def test_render_semantics(tmp_path: Path):
    out = by_id(render(write_tree(tmp_path, OVERLAY)))
    assert set(out) == {("StatefulSet", "ns1", "app"), ("ConfigMap", "ns1", "cfg"), ("ClusterRole", "", "reader")}
    sts = out[("StatefulSet", "ns1", "app")]
    assert sts["spec"]["replicas"] == 1
    # containers merge by name: the patch's first, in its order, then the others
    other, main, side = sts["spec"]["template"]["spec"]["containers"]
    assert other == {"name": "other", "image": "other:2"}
    assert side == {"name": "side", "image": "side@sha256:" + "0123456789abcdef" * 4}
    assert main["image"] == "registry.example:5000/team/app:2.0"
    assert main["args"] == ["--b"]  # lists of scalars are replaced
    assert main["env"] == [{"name": "B", "value": "20"}, {"name": "C", "value": "3"}, {"name": "A", "value": "1"}]
    assert main["resources"] == {"requests": {"cpu": 2}, "limits": {"cpu": "1"}}  # null deletes
    assert main["volumeMounts"] == [{"name": "data", "mountPath": "/data", "readOnly": True}]
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "9Gi"
    assert out[("ConfigMap", "ns1", "cfg")]["data"] == {"a": "1", "b": "22"}


@pytest.mark.parametrize("overlay, patch, message", [
    (OVERLAY + "labels: [{pairs: {a: b}}]\n", PATCH, "not supported by this renderer"),
    (OVERLAY.replace("- path: patch.yaml", "- path: patch.yaml\n    target: {kind: StatefulSet}"), PATCH,
     "only `patches: - path: FILE`"),
    (OVERLAY, PATCH.replace("name: app}", "name: nope}", 1), "0 targets"),
    (OVERLAY, PATCH + "  $patch: replace\n", "directive"),
    (OVERLAY, PATCH.replace("      containers:", "      tolerations: [{key: b}]\n      containers:"),
     "list field 'tolerations'"),
    (OVERLAY.replace("resources: [../base]", "resources: [../base, ../base/app.yaml]"), PATCH, "appears twice"),
])
def test_render_refuses_what_it_does_not_implement(tmp_path: Path, overlay: str, patch: str, message: str):
    with pytest.raises(KustomizeError, match=message):
        render(write_tree(tmp_path, overlay, patch))


def real_kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def kustomize_build(directory: Path) -> dict:
    cmd = real_kustomize()
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl on PATH: nothing to compare with")
    proc = subprocess.run([*cmd, str(directory)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return by_id([r for r in yaml.safe_load_all(proc.stdout) if r])


def test_same_output_as_real_kustomize_on_the_sample(tmp_path: Path):
    overlay = write_tree(tmp_path, OVERLAY)
    assert by_id(render(overlay)) == kustomize_build(overlay)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_same_output_as_real_kustomize_on_deploy_overlays(overlay: str):
    directory = K8S / "overlays" / overlay
    assert by_id(render(directory)) == kustomize_build(directory)
