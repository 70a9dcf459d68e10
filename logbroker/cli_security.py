"""`logbroker acls add|remove|list` and `logbroker users add|delete|list`: ACLs and SCRAM users on the
command line, as Kafka's kafka-acls and kafka-configs --alter --entity-type users.

    logbroker acls add --allow-principal User:alice --operation Write --topic orders
    logbroker acls add --deny-principal User:bob --operation Read --topic pay. --resource-pattern-type prefixed
    logbroker acls add --allow-principal User:svc --operation Read --group billing
    logbroker acls add --allow-principal User:ops --operation Alter --cluster
    logbroker acls list [--principal User:alice] [--topic orders]
    logbroker acls remove --principal User:alice --topic orders      (every matching binding)
    logbroker users add alice [--mechanism SCRAM-SHA-512] [--iterations 8192] [--password-stdin]
    logbroker users delete alice
    logbroker users list

A password is read from standard input with --password-stdin, else asked for without echo; it is
never a command-line argument (it would show in `ps`). The credential is salted and hashed here;
the broker never sees the password. Errors are one line, exit 1 (the conventions of cli_groups.py).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from logbroker.errors import LogbrokerError
from logbroker.security.acl import (
    CLUSTER_NAME,
    WILDCARD,
    AclBinding,
    AclError,
    PatternType,
    Permission,
    ResourceType,
    parse_operation,
    parse_pattern_type,
)
from logbroker.security.scram import DEFAULT_ITERATIONS, ScramError


class SecurityCliError(LogbrokerError):
    """A malformed ACL or credential given on the command line."""


def _admin(args: argparse.Namespace) -> Any:
    from logbroker.client import Admin

    return Admin(args.bootstrap)


def _resources(args: argparse.Namespace) -> list[tuple[ResourceType, str]]:
    out = [(ResourceType.TOPIC, t) for t in args.topic] + [(ResourceType.GROUP, g) for g in args.group]
    if args.cluster:
        out.append((ResourceType.CLUSTER, CLUSTER_NAME))
    return out


def _bindings(args: argparse.Namespace) -> list[AclBinding]:
    principals = [(p, Permission.ALLOW) for p in args.allow_principal] + [(p, Permission.DENY) for p in args.deny_principal]
    if not principals:
        raise SecurityCliError("name at least one --allow-principal or --deny-principal")
    if not args.operation:
        raise SecurityCliError("name at least one --operation")
    resources = _resources(args)
    if not resources:
        raise SecurityCliError("name at least one resource: --topic, --group or --cluster")
    try:
        pattern = parse_pattern_type(args.resource_pattern_type)
        ops = [parse_operation(o) for o in args.operation]
        return [AclBinding(p, host, op, perm, rt, name,
                           pattern if rt is not ResourceType.CLUSTER else PatternType.LITERAL)
                for p, perm in principals for host in (args.host or [WILDCARD]) for op in ops for rt, name in resources]
    except AclError as e:
        raise SecurityCliError(str(e)) from None


def _filter(args: argparse.Namespace) -> dict[str, str]:
    match: dict[str, str] = {}
    if args.principal:
        match["principal"] = args.principal
    if len(args.operation) > 1:
        raise SecurityCliError("name at most one --operation to match")
    if args.operation:
        try:
            match["operation"] = parse_operation(args.operation[0]).value
        except AclError as e:
            raise SecurityCliError(str(e)) from None
    resources = _resources(args)
    if len(resources) > 1:
        raise SecurityCliError("name at most one resource to match")
    if resources:
        match["resource_type"], match["name"] = resources[0][0].value, resources[0][1]
    return {k: v for k, v in match.items() if v}


def _print_acls(acls: list[AclBinding], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps([b.to_json() for b in acls], indent=2))
        return
    if not acls:
        print("no ACLs", file=sys.stderr)
    for b in sorted(acls, key=lambda b: (b.resource_type.value, b.name, b.principal, b.operation.value)):
        print(b.describe())


def cmd_acls_add(args: argparse.Namespace) -> int:
    bindings = _bindings(args)
    with _admin(args) as admin:
        created = admin.create_acls(bindings)
    print(f"{created} ACL(s) added ({len(bindings) - created} already present)")
    return 0


def cmd_acls_remove(args: argparse.Namespace) -> int:
    match = _filter(args)
    if not match and not args.all:
        raise SecurityCliError("name what to remove (--principal, --operation, a resource), or --all")
    with _admin(args) as admin:
        removed = admin.delete_acls(**match)
    _print_acls(removed, "text")
    print(f"{len(removed)} ACL(s) removed", file=sys.stderr)
    return 0


def cmd_acls_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        _print_acls(admin.describe_acls(**_filter(args)), args.format)
    return 0


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass(f"password for {args.user}: ")
    if getpass.getpass("again: ") != first:
        raise SecurityCliError("the passwords differ")
    return first


def cmd_users_add(args: argparse.Namespace) -> int:
    password = _password(args)
    try:
        with _admin(args) as admin:
            admin.upsert_user(args.user, password, args.mechanism, args.iterations)
    except ScramError as e:
        raise SecurityCliError(str(e)) from None
    print(f"user {args.user}: {args.mechanism} credential set")
    return 0


def cmd_users_delete(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        deleted = admin.delete_user(args.user)
    print(f"user {args.user} {'deleted' if deleted else 'did not exist'}")
    return 0 if deleted else 1


def cmd_users_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        users = admin.list_users()
    if args.format == "json":
        print(json.dumps(users, indent=2))
    for user, mechanisms in sorted(users.items()) if args.format == "text" else ():
        print(f"{user}\t{','.join(mechanisms)}")
    return 0


def _resource_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topic", action="append", default=[], help="a topic name (or prefix); repeatable")
    p.add_argument("--group", action="append", default=[], help="a group name (or prefix); repeatable")
    p.add_argument("--cluster", action="store_true", help="the cluster resource (ClusterAction, Alter, Create...)")
    p.add_argument("--operation", action="append", default=[],
                   help="Read, Write, Create, Delete, Alter, Describe, ClusterAction, All, ...; repeatable")


def add_security_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register `acls ...` and `users ...` on the top-level subparsers."""
    acls = sub.add_parser("acls", help="add, remove and list ACLs (with serve --authorizer acl)")
    asub = acls.add_subparsers(dest="acls_command", metavar="ACTION", required=True)
    a = asub.add_parser("add", parents=[common], help="allow or deny principals operations on resources")
    a.add_argument("--allow-principal", action="append", default=[], metavar="User:NAME")
    a.add_argument("--deny-principal", action="append", default=[], metavar="User:NAME")
    a.add_argument("--host", action="append", default=[], help="an IP address (default: every host)")
    a.add_argument("--resource-pattern-type", choices=["literal", "prefixed"], default="literal")
    _resource_args(a)
    a.set_defaults(func=cmd_acls_add)
    for name, func, helptext in (("remove", cmd_acls_remove, "remove every matching ACL"),
                                 ("list", cmd_acls_list, "list ACLs, or those matching")):
        a = asub.add_parser(name, parents=[common], help=helptext)
        a.add_argument("--principal", default="", metavar="User:NAME")
        _resource_args(a)
        if name == "remove":
            a.add_argument("--all", action="store_true", help="remove every ACL")
        else:
            a.add_argument("--format", choices=["text", "json"], default="text")
        a.set_defaults(func=func)
    users = sub.add_parser("users", help="add, delete and list SCRAM users")
    usub = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    u = usub.add_parser("add", parents=[common], help="set a user's SCRAM credential (asks for the password)")
    u.add_argument("user")
    u.add_argument("--mechanism", choices=["SCRAM-SHA-256", "SCRAM-SHA-512"], default="SCRAM-SHA-256")
    u.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    u.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    u.set_defaults(func=cmd_users_add)
    u = usub.add_parser("delete", parents=[common], help="delete a user and every credential")
    u.add_argument("user")
    u.set_defaults(func=cmd_users_delete)
    u = usub.add_parser("list", parents=[common], help="list users and their mechanisms (never a secret)")
    u.add_argument("--format", choices=["text", "json"], default="text")
    u.set_defaults(func=cmd_users_list)
