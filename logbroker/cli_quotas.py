"""`logbroker quotas set|list|delete`: client quotas (security/quotas.py) on the command line, as
Kafka's kafka-configs --entity-type users/clients.

    logbroker quotas set --user alice --producer-byte-rate 1048576
    logbroker quotas set --user alice --client-id app --consumer-byte-rate 5e6 --request-percentage 50
    logbroker quotas set --default-user --producer-byte-rate 10485760     (every user without its own)
    logbroker quotas set --default-client-id --request-percentage 20
    logbroker quotas list [--format json]
    logbroker quotas delete --user alice [--client-id app]

An entity is a user (`--user NAME` or `--default-user`), a client id (`--client-id ID` or
`--default-client-id`), or both. `set` changes only the rates it names. Rates are numbers > 0:
bytes per second, or percent of one event loop's time. Errors are one line, exit 1; nothing is
stored then.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from logbroker.errors import LogbrokerError
from logbroker.security.quotas import DEFAULT, QuotaEntity, QuotaError, QuotaKind, check_rate


class QuotaCliError(LogbrokerError):
    """A malformed quota given on the command line."""


def _admin(args: argparse.Namespace) -> Any:
    from logbroker.client import Admin

    return Admin(args.bootstrap)


def _entity(args: argparse.Namespace) -> QuotaEntity:
    if args.user is not None and args.default_user:
        raise QuotaCliError("give --user or --default-user, not both")
    if args.client_id is not None and args.default_client_id:
        raise QuotaCliError("give --client-id or --default-client-id, not both")
    user = DEFAULT if args.default_user else args.user
    client_id = DEFAULT if args.default_client_id else args.client_id
    try:
        return QuotaEntity(user, client_id).validated()
    except QuotaError as e:
        raise QuotaCliError(str(e)) from None


def _rates(args: argparse.Namespace) -> dict[str, float]:
    rates = {k.value: getattr(args, k.value) for k in QuotaKind if getattr(args, k.value) is not None}
    if not rates:
        raise QuotaCliError("name at least one rate: --producer-byte-rate, --consumer-byte-rate, --request-percentage")
    try:
        return {name: check_rate(QuotaKind(name), value) for name, value in rates.items()}
    except QuotaError as e:
        raise QuotaCliError(str(e)) from None


def cmd_quotas_set(args: argparse.Namespace) -> int:
    entity, rates = _entity(args), _rates(args)
    with _admin(args) as admin:
        admin.set_quota(entity.user, entity.client_id, **rates)
    print(f"quota {entity.describe()}: " + " ".join(f"{k}={v:g}" for k, v in rates.items()))
    return 0


def cmd_quotas_delete(args: argparse.Namespace) -> int:
    entity = _entity(args)
    with _admin(args) as admin:
        deleted = admin.delete_quota(entity.user, entity.client_id)
    print(f"quota {entity.describe()} {'deleted' if deleted else 'did not exist'}")
    return 0 if deleted else 1


def cmd_quotas_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        quotas = admin.describe_quotas()
    if args.format == "json":
        print(json.dumps(quotas, indent=2))
        return 0
    if not quotas:
        print("no quotas", file=sys.stderr)
    for q in quotas:
        entity = QuotaEntity(q.get("user"), q.get("client_id")).describe()
        print(entity + "\t" + " ".join(f"{k.value}={q[k.value]:g}" for k in QuotaKind if k.value in q))
    return 0


def _rate(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _entity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", default=None, metavar="NAME", help="a user (the principal's name, without User:)")
    p.add_argument("--default-user", action="store_true", help="every user without a quota of its own")
    p.add_argument("--client-id", default=None, metavar="ID", help="a client id (Producer/Consumer client_id)")
    p.add_argument("--default-client-id", action="store_true", help="every client id without a quota of its own")


def add_quotas_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register `quotas ...` on the top-level subparsers."""
    quotas = sub.add_parser("quotas", help="set, list and delete client quotas (produce/fetch bytes/s, request time)")
    qsub = quotas.add_subparsers(dest="quotas_command", metavar="ACTION", required=True)
    s = qsub.add_parser("set", parents=[common], help="set rates of a user and/or client id (others kept)")
    _entity_args(s)
    s.add_argument("--producer-byte-rate", dest="producer_byte_rate", type=_rate, metavar="BYTES_PER_SEC")
    s.add_argument("--consumer-byte-rate", dest="consumer_byte_rate", type=_rate, metavar="BYTES_PER_SEC")
    s.add_argument("--request-percentage", dest="request_percentage", type=_rate, metavar="PERCENT")
    s.set_defaults(func=cmd_quotas_set)
    d = qsub.add_parser("delete", parents=[common], help="delete every quota of a user and/or client id")
    _entity_args(d)
    d.set_defaults(func=cmd_quotas_delete)
    ls = qsub.add_parser("list", parents=[common], help="list the stored quotas")
    ls.add_argument("--format", choices=["text", "json"], default="text")
    ls.set_defaults(func=cmd_quotas_list)
