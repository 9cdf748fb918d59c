"""Alembic environment: the models' metadata, and a connection from `service.db.migrate` or
else the URL in Settings (so the `alembic` command line works too without an alembic.ini)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from service.config import get_settings
from service.db import create_db_engine
from service.models import Base

target_metadata = Base.metadata


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run(connection)
        return
    engine = create_db_engine(get_settings().database_url)
    try:
        with engine.begin() as conn:
            run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_online()
