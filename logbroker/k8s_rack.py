"""Write a Kubernetes pod's rack — its node's zone label — as a `logbroker serve --config` file.

The downward API cannot read node labels (until Kubernetes' pod topology labels, KEP-4742, beta in
1.35, copy the zone onto the pod), so the broker StatefulSet runs this as an init container:

    python -m logbroker.k8s_rack --node $(NODE_NAME) --output /var/run/logbroker/rack.toml

It asks the API server for the node (`GET /api/v1/nodes/<node>` with the pod's service-account token,
so the pod needs `get` on `nodes`: a ClusterRole), takes the first of ZONE_LABELS that is set and
writes `rack = "<zone>"` atomically. A node without a zone label gives `rack = ""` and a warning: the
broker then runs rack-unaware rather than not at all. Any other failure (no permission, API server
unreachable) exits non-zero, so the init container fails loudly and the kubelet retries it.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

ZONE_LABELS = ("topology.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/zone")
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
REQUEST_TIMEOUT_S = 10.0


class RackError(Exception):
    """The node's labels could not be read."""


def api_url_from_env(environ: Mapping[str, str]) -> str:
    """The in-cluster API server address, from the variables the kubelet sets in every pod."""
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port = environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise RackError("KUBERNETES_SERVICE_HOST is not set: not in a pod? pass --api-url")
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def fetch_node_labels(api_url: str, node: str, token: str, ca_file: Path | None,
                      timeout_s: float = REQUEST_TIMEOUT_S) -> dict[str, str]:
    url = f"{api_url.rstrip('/')}/api/v1/nodes/{urllib.parse.quote(node, safe='')}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
    context = ssl.create_default_context(cafile=str(ca_file)) if url.startswith("https:") and ca_file else None
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        hint = " (does the service account have `get` on `nodes`?)" if exc.code in (401, 403) else ""
        raise RackError(f"GET {url}: HTTP {exc.code}{hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RackError(f"GET {url}: {exc}") from None
    labels = body.get("metadata", {}).get("labels", {}) if isinstance(body, dict) else {}
    return {str(k): str(v) for k, v in labels.items()}


def zone_of(labels: Mapping[str, str]) -> str:
    for label in ZONE_LABELS:
        if labels.get(label):
            return labels[label]
    return ""


def rack_config(zone: str) -> str:
    """The TOML config file that sets `rack` (a JSON string is a valid TOML basic string)."""
    return f"# written by logbroker.k8s_rack from the node's zone label\nrack = {json.dumps(zone)}\n"


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m logbroker.k8s_rack",
                                     description="Write the node's zone label as a `logbroker serve --config` file.")
    parser.add_argument("--node", required=True, help="the node's name (downward API: spec.nodeName)")
    parser.add_argument("--output", required=True, type=Path, help="the config file to write")
    parser.add_argument("--api-url", default=None, help="API server (default: from KUBERNETES_SERVICE_HOST/PORT)")
    parser.add_argument("--token-file", type=Path, default=SERVICE_ACCOUNT_DIR / "token")
    parser.add_argument("--ca-file", type=Path, default=SERVICE_ACCOUNT_DIR / "ca.crt")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        api_url = args.api_url or api_url_from_env(os.environ)
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise RackError(f"cannot read the service-account token {args.token_file}: {exc.strerror}") from None
        labels = fetch_node_labels(api_url, args.node, token, args.ca_file if args.ca_file.exists() else None)
    except RackError as exc:
        print(f"k8s_rack: error: {exc}", file=sys.stderr)
        return 1
    zone = zone_of(labels)
    if not zone:
        print(f"k8s_rack: warning: node {args.node} has none of the labels {', '.join(ZONE_LABELS)}; "
              "the broker runs without a rack", file=sys.stderr)
    write_atomically(args.output, rack_config(zone))
    print(f"k8s_rack: node {args.node}: rack {zone!r} written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
