"""Operator CLI: migrate the database, add tenants, create, revoke and list API keys.

    python -m service.admin migrate
    python -m service.admin create-tenant acme
    python -m service.admin create-key --tenant acme --name ci     # prints the key once
    python -m service.admin revoke-key 3fa85f6457b2
    python -m service.admin list-keys --tenant acme

The database is `LPD_DATABASE_URL` (via Settings) unless `--database-url` is given. Exit codes:
0 done, 2 bad input (unknown tenant, bad name, ...), 1 anything else (database down, ...).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service.auth import (
    create_api_key,
    create_tenant,
    find_tenant,
    list_api_keys,
    revoke_api_key,
)
from service.config import get_settings
from service.db import create_db_engine, create_session_factory, migrate, session_scope
from service.models import Tenant
from service.webhooks import webhook_secret


class UsageError(Exception):
    """Bad input from the operator: exit code 2."""


def _tenant(session: Session, name: str) -> Tenant:
    tenant = find_tenant(session, name)
    if tenant is None:
        raise UsageError(f"no tenant named {name!r} (create it with create-tenant)")
    return tenant


def _run(args: argparse.Namespace, url: str) -> None:
    if args.command == "migrate":
        migrate(url)
        print("database is at the latest revision")
        return
    engine = create_db_engine(url)
    try:
        with session_scope(create_session_factory(engine)) as session:
            _run_in_session(args, session)
    finally:
        engine.dispose()


def _run_in_session(args: argparse.Namespace, session: Session) -> None:
    try:
        if args.command == "create-tenant":
            tenant = create_tenant(session, args.name)
            print(f"created tenant {tenant.name} ({tenant.id})")
        elif args.command == "create-key":
            plaintext, key = create_api_key(
                session, _tenant(session, args.tenant), args.name, rate_limit_per_minute=args.rate
            )
            session.commit()  # stored before it is shown
            print(plaintext)  # stdout holds only the key, for scripts
            print(
                f"created key {key.name!r} (prefix {key.prefix}) for tenant {args.tenant}; "
                "store it now, it is not shown again",
                file=sys.stderr,
            )
        elif args.command == "revoke-key":
            try:
                key = revoke_api_key(session, args.prefix)
            except LookupError as exc:
                raise UsageError(str(exc)) from None
            assert key.revoked_at is not None
            since = f"{key.revoked_at:%Y-%m-%dT%H:%M:%SZ}"
            print(f"key {key.prefix} ({key.name}) is revoked since {since}")
        elif args.command == "list-keys":
            tenant = _tenant(session, args.tenant)
            keys = list_api_keys(session, tenant.id)
            print(f"{'PREFIX':<14}{'NAME':<24}{'CREATED':<22}{'REVOKED':<22}RATE/MIN")
            for key in keys:
                revoked = f"{key.revoked_at:%Y-%m-%dT%H:%M:%SZ}" if key.revoked_at else "-"
                rate = key.rate_limit_per_minute or "default"
                print(
                    f"{key.prefix:<14}{key.name[:23]:<24}"
                    f"{key.created_at:%Y-%m-%dT%H:%M:%SZ}  {revoked:<22}{rate}"
                )
        elif args.command == "webhook-secret":
            secret = webhook_secret(get_settings(), _tenant(session, args.tenant).id)
            if not secret:
                raise UsageError("set LPD_SIGNED_URL_SECRET first: webhook keys derive from it")
            print(secret)  # what the tenant's receiver verifies X-LPD-Signature with
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.admin", description="Manage the service's database and API keys."
    )
    parser.add_argument("--database-url", help="SQLAlchemy URL (default: LPD_DATABASE_URL)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("migrate", help="create or upgrade the tables (Alembic upgrade head)")
    p = sub.add_parser("create-tenant", help="add a tenant")
    p.add_argument("name", help="letters, digits, '.', '_' or '-'; up to 64 characters")
    p = sub.add_parser("create-key", help="create an API key and print it (once)")
    p.add_argument("--tenant", required=True, help="tenant name")
    p.add_argument("--name", required=True, help="what the key is for, e.g. 'ci'")
    p.add_argument("--rate", type=int, help="requests per minute (default: the service's)")
    p = sub.add_parser("revoke-key", help="revoke an API key; it stops working at once")
    p.add_argument("prefix", help="the 12 characters after 'lpd_' (see list-keys)")
    p = sub.add_parser("list-keys", help="a tenant's keys, revoked ones included")
    p.add_argument("--tenant", required=True, help="tenant name")
    p = sub.add_parser(
        "webhook-secret", help="print the key a tenant's webhook receiver verifies with"
    )
    p.add_argument("--tenant", required=True, help="tenant name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code."""
    args = build_parser().parse_args(argv)
    url = args.database_url or get_settings().database_url
    try:
        _run(args, url)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None)
        reason = str(orig or exc).strip().splitlines()[0]
        missing = "no such table" in reason or ("relation" in reason and "does not exist" in reason)
        hint = " (run `python -m service.admin migrate` first)" if missing else ""
        print(f"error: database: {reason}{hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
