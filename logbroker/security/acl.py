"""ACLs and the authorizer's decision, as Kafka has them (pure: the broker feeds it the bindings it
caches from the metadata store and asks it one question per operation a request performs).

A binding says: principal P from host H may (ALLOW) or may not (DENY) perform operation O on the
resources of type T whose name matches N (LITERAL: equal, or every name when N is ``*``; PREFIXED:
starting with N). Principals are written ``User:NAME`` (``User:*`` is every user); hosts are an IP
address or ``*``.

`Authorizer.authorize(principal, host, operation, resource_type, name)` answers, in this order:

1. a super user (``--super-users``) may do anything;
2. any DENY binding that matches (principal or ``User:*``; host or ``*``; the operation or ALL)
   refuses — a deny beats every allow;
3. any ALLOW binding that matches allows; an ALLOW of READ, WRITE, DELETE or ALTER also allows
   DESCRIBE, and one of ALTER_CONFIGS allows DESCRIBE_CONFIGS (Kafka's implied operations);
4. otherwise refuse: when no ACL matches, the answer is no.

Bindings are kept per resource type in a dict of literal names and a list of prefixes, so one
decision costs a dict lookup plus a scan of the prefixes of that type (bounded by `MAX_ACLS`).

The stored form (`to_json` / `from_json`) is one JSON object per binding, all fields strings.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

MAX_ACLS = 10_000  # ZooKeeper lists them as children of one znode (1 MiB jute buffer)
MAX_NAME_CHARS = 249  # a topic name's limit; group names and principals share it
CLUSTER_NAME = "logbroker-cluster"
WILDCARD = "*"
ANY_USER = "User:*"


class AclError(ValueError):
    """A binding refused as malformed; the message says which field and why."""


class ResourceType(Enum):
    TOPIC = "Topic"
    GROUP = "Group"
    CLUSTER = "Cluster"
    TRANSACTIONAL_ID = "TransactionalId"


class PatternType(Enum):
    LITERAL = "literal"
    PREFIXED = "prefixed"


class Operation(Enum):
    ALL = "All"
    READ = "Read"
    WRITE = "Write"
    CREATE = "Create"
    DELETE = "Delete"
    ALTER = "Alter"
    DESCRIBE = "Describe"
    CLUSTER_ACTION = "ClusterAction"
    DESCRIBE_CONFIGS = "DescribeConfigs"
    ALTER_CONFIGS = "AlterConfigs"
    IDEMPOTENT_WRITE = "IdempotentWrite"


class Permission(Enum):
    ALLOW = "Allow"
    DENY = "Deny"


# an ALLOW of any of these also allows the key (Kafka's implied operations)
_IMPLIED_BY: dict[Operation, frozenset[Operation]] = {
    Operation.DESCRIBE: frozenset({Operation.READ, Operation.WRITE, Operation.DELETE, Operation.ALTER}),
    Operation.DESCRIBE_CONFIGS: frozenset({Operation.ALTER_CONFIGS}),
}


E = TypeVar("E", bound=Enum)


def _parse_enum(cls: type[E], text: str, what: str) -> E:
    wanted = text.replace("_", "").replace("-", "").lower()
    for member in cls:
        if str(member.value).lower() == wanted or member.name.replace("_", "").lower() == wanted:
            return member
    names = ", ".join(str(m.value) for m in cls)
    raise AclError(f"unknown {what} {text[:40]!r}: one of {names}")


def parse_operation(text: str) -> Operation:
    return _parse_enum(Operation, text, "operation")


def parse_resource_type(text: str) -> ResourceType:
    return _parse_enum(ResourceType, text, "resource type")


def parse_pattern_type(text: str) -> PatternType:
    return _parse_enum(PatternType, text, "resource pattern type")


def parse_permission(text: str) -> Permission:
    return _parse_enum(Permission, text, "permission")


def check_principal(principal: str) -> str:
    kind, sep, name = principal.partition(":")
    if kind != "User" or not sep or not name or len(principal) > MAX_NAME_CHARS:
        raise AclError(f"principal {principal[:60]!r} must be written User:NAME (at most {MAX_NAME_CHARS} characters)")
    if any(ord(c) < 0x20 for c in name):
        raise AclError("principal has a control character")
    return principal


def check_host(host: str) -> str:
    if host == WILDCARD:
        return host
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise AclError(f"host {host[:60]!r} must be an IP address or *") from None


@dataclass(frozen=True)
class AclBinding:
    principal: str
    host: str
    operation: Operation
    permission: Permission
    resource_type: ResourceType
    name: str
    pattern_type: PatternType = PatternType.LITERAL

    def __post_init__(self) -> None:
        check_principal(self.principal)
        check_host(self.host)
        if not self.name or len(self.name) > MAX_NAME_CHARS or any(ord(c) < 0x20 for c in self.name):
            raise AclError(f"resource name must be 1..{MAX_NAME_CHARS} printable characters")
        if self.pattern_type is PatternType.PREFIXED and self.name == WILDCARD:
            raise AclError("a prefixed pattern cannot be '*': use a literal '*' for every name")
        if self.resource_type is ResourceType.CLUSTER and self.name != CLUSTER_NAME:
            raise AclError(f"the Cluster resource is named {CLUSTER_NAME!r}")

    def to_json(self) -> dict[str, str]:
        return {"principal": self.principal, "host": self.host, "operation": self.operation.value,
                "permission": self.permission.value, "resource_type": self.resource_type.value,
                "name": self.name, "pattern_type": self.pattern_type.value}

    @classmethod
    def from_json(cls, obj: dict[str, object]) -> AclBinding:
        try:
            return cls(str(obj["principal"]), str(obj["host"]), parse_operation(str(obj["operation"])),
                       parse_permission(str(obj["permission"])), parse_resource_type(str(obj["resource_type"])),
                       str(obj["name"]), parse_pattern_type(str(obj.get("pattern_type", "literal"))))
        except KeyError as e:
            raise AclError(f"stored ACL has no field {e.args[0]!r}") from None

    def describe(self) -> str:
        return (f"{self.permission.value} {self.principal} from {self.host} to {self.operation.value} "
                f"{self.resource_type.value}:{self.pattern_type.value}:{self.name}")


class Authorizer:
    """The decision over one snapshot of the bindings; build a new one when they change."""

    def __init__(self, bindings: Iterable[AclBinding], super_users: Iterable[str] = ()) -> None:
        self.super_users = frozenset(check_principal(p) for p in super_users)
        self._literal: dict[ResourceType, dict[str, list[AclBinding]]] = defaultdict(lambda: defaultdict(list))
        self._prefixed: dict[ResourceType, list[AclBinding]] = defaultdict(list)
        count = 0
        for b in bindings:
            count += 1
            if count > MAX_ACLS:
                raise AclError(f"more than {MAX_ACLS} ACLs")
            if b.pattern_type is PatternType.LITERAL:
                self._literal[b.resource_type][b.name].append(b)
            else:
                self._prefixed[b.resource_type].append(b)
        self.size = count

    def _matching(self, resource_type: ResourceType, name: str) -> list[AclBinding]:
        literal = self._literal.get(resource_type, {})
        out = list(literal.get(name, ())) + (list(literal.get(WILDCARD, ())) if name != WILDCARD else [])
        out.extend(b for b in self._prefixed.get(resource_type, ()) if name.startswith(b.name))
        return out

    def authorize(self, principal: str, host: str, operation: Operation, resource_type: ResourceType,
                  name: str) -> bool:
        if principal in self.super_users:
            return True
        bindings = [b for b in self._matching(resource_type, name)
                    if b.principal in (principal, ANY_USER) and b.host in (host, WILDCARD)]
        if any(b.permission is Permission.DENY and b.operation in (operation, Operation.ALL) for b in bindings):
            return False
        granting = {operation, Operation.ALL} | _IMPLIED_BY.get(operation, frozenset())
        return any(b.permission is Permission.ALLOW and b.operation in granting for b in bindings)
