"""A renderer for the subset of kustomize that deploy/k8s uses, so tests can render the overlays on a
machine without kustomize or kubectl (neither is in Debian bookworm in a usable form, nor on PyPI).

Supported, with kustomize's semantics (tests/unit/test_kustomize_lite.py compares the output with a
real `kustomize build` / `kubectl kustomize` whenever one is on PATH):

- `resources:` files (one or more YAML documents) and directories holding a kustomization.yaml,
  rendered recursively; two resources with the same kind, namespace and name are an error.
- `patches:` entries with only `path:`: a strategic-merge patch, its target found by kind and name.
  Maps merge recursively and `null` deletes a key. Lists merge by key only where Kubernetes defines a
  merge key and this renderer knows it (MERGE_KEYS): the patch's items come first, in its order, then
  the base's other items; the lists in REPLACED_LISTS are replaced whole (no merge key in the
  Kubernetes schema). Any other list, and any `$patch`-style directive, is an
  error: better to refuse than to render something kustomize would not.
- `namespace:` sets metadata.namespace on every namespaced resource (not on CLUSTER_SCOPED kinds),
  applied after the patches, as kustomize does.
- `replicas:` `{name, count}` sets spec.replicas of the workload with that name.
- `images:` `{name, newName?, newTag?, digest?}` rewrites the image of every container and init
  container (in a workload's pod template) whose image, without tag or digest, is `name`.

Any other kustomization field is an error.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = frozenset({"apiVersion", "kind", "resources", "patches", "namespace", "replicas", "images"})
CLUSTER_SCOPED = frozenset({
    "ClusterRole", "ClusterRoleBinding", "Namespace", "PersistentVolume", "StorageClass",
    "CustomResourceDefinition", "PriorityClass",
})
# list field name -> the key its items merge on (Kubernetes' x-kubernetes-patch-merge-key)
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
}
REPLACED_LISTS = frozenset({"volumeClaimTemplates", "accessModes", "args", "command"})
WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "ReplicaSet", "ReplicationController"})


class KustomizeError(Exception):
    pass


Resource = dict[str, Any]


def _load_documents(path: Path) -> list[Resource]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "metadata" not in d:
            raise KustomizeError(f"{path}: not a Kubernetes resource: {str(d)[:80]}")
    return docs


def resource_id(r: Resource) -> tuple[str, str, str]:
    return (r["kind"], r["metadata"].get("namespace", ""), r["metadata"]["name"])


def _merge(base: Any, patch: Any, field: str, where: str) -> Any:
    if isinstance(patch, dict):
        if not isinstance(base, dict):
            return _strip_nulls(copy.deepcopy(patch), where)
        out = dict(base)
        for key, value in patch.items():
            if key.startswith("$"):
                raise KustomizeError(f"{where}: patch directive {key!r} is not supported")
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = _merge(out[key], value, key, f"{where}.{key}")
            else:
                out[key] = _strip_nulls(copy.deepcopy(value), f"{where}.{key}")
        return out
    if isinstance(patch, list):
        if field in MERGE_KEYS and isinstance(base, list):
            # kustomize's order: the patch's items first, in the patch's order (each merged into the
            # base item with the same key, if any), then the base items the patch does not name.
            key = MERGE_KEYS[field]
            base_by_key = {item.get(key): item for item in base if isinstance(item, dict)}
            out_list = []
            for item in patch:
                if not isinstance(item, dict) or key not in item:
                    raise KustomizeError(f"{where}: every item needs its merge key {key!r}")
                existing = base_by_key.get(item[key])
                out_list.append(_merge(existing, item, "", f"{where}[{key}={item[key]}]")
                                if existing is not None else _strip_nulls(copy.deepcopy(item), where))
            named = {item[key] for item in patch}
            out_list.extend(copy.deepcopy(item) for item in base if not (isinstance(item, dict) and item.get(key) in named))
            return out_list
        if field in REPLACED_LISTS or field in MERGE_KEYS:
            return copy.deepcopy(patch)
        raise KustomizeError(f"{where}: patching list field {field!r} is not supported by this renderer")
    return patch


def _strip_nulls(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        for key in value:
            if key.startswith("$"):
                raise KustomizeError(f"{where}: patch directive {key!r} is not supported")
        return {k: _strip_nulls(v, f"{where}.{k}") for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v, where) for v in value]
    return value


def strategic_merge(base: Resource, patch: Resource, where: str = "patch") -> Resource:
    return _merge(base, patch, "", where)


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise KustomizeError(f"{directory}: no kustomization.yaml")


def render(directory: Path) -> list[Resource]:
    """The resources `kustomize build <directory>` would print (compare as a set: order differs)."""
    kfile = _kustomization_file(directory)
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - SUPPORTED_FIELDS
    if unknown:
        raise KustomizeError(f"{kfile}: fields not supported by this renderer: {sorted(unknown)}")
    resources: list[Resource] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        resources.extend(render(path) if path.is_dir() else _load_documents(path))
    seen: set[tuple[str, str, str]] = set()
    for r in resources:
        rid = resource_id(r)
        if rid in seen:
            raise KustomizeError(f"{kfile}: resource {rid} appears twice")
        seen.add(rid)

    for entry in k.get("patches", []):
        if set(entry) != {"path"}:
            raise KustomizeError(f"{kfile}: only `patches: - path: FILE` is supported, got {entry}")
        for patch in _load_documents(directory / entry["path"]):
            targets = [i for i, r in enumerate(resources)
                       if r["kind"] == patch["kind"] and r["metadata"]["name"] == patch["metadata"]["name"]]
            if len(targets) != 1:
                raise KustomizeError(f"{entry['path']}: {len(targets)} targets for {patch['kind']}/"
                                     f"{patch['metadata']['name']}")
            i = targets[0]
            resources[i] = strategic_merge(resources[i], patch, entry["path"])

    namespace = k.get("namespace")
    if namespace:
        for r in resources:
            if r["kind"] not in CLUSTER_SCOPED:
                r["metadata"]["namespace"] = namespace

    for entry in k.get("replicas", []):
        workloads = [r for r in resources if r["kind"] in WORKLOAD_KINDS and r["metadata"]["name"] == entry["name"]]
        if not workloads:
            raise KustomizeError(f"{kfile}: replicas: no workload named {entry['name']!r}")
        for workload in workloads:
            workload.setdefault("spec", {})["replicas"] = int(entry["count"])

    for entry in k.get("images", []):
        if not set(entry) <= {"name", "newName", "newTag", "digest"}:
            raise KustomizeError(f"{kfile}: images: unsupported keys in {entry}")
        for r in resources:
            pod_spec = r.get("spec", {}).get("template", {}).get("spec", {})
            for c in [*pod_spec.get("containers", []), *pod_spec.get("initContainers", [])]:
                c["image"] = _set_image(c["image"], entry)
    return resources


def _split_image(image: str) -> tuple[str, str]:
    """'registry:5000/app:1.0' -> ('registry:5000/app', ':1.0'); digests stay with their '@'."""
    if "@" in image:
        name, _, digest = image.partition("@")
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    return (image[:colon], image[colon:]) if colon > slash else (image, "")


def _set_image(image: str, entry: dict[str, str]) -> str:
    name, suffix = _split_image(image)
    if name != entry["name"]:
        return image
    if "digest" in entry:
        suffix = "@" + entry["digest"]
    elif "newTag" in entry:
        suffix = ":" + str(entry["newTag"])
    return entry.get("newName", name) + suffix
