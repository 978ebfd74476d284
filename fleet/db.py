"""Database engine, migrations (alembic, run programmatically at start) and sessions.

SQLite file by default (WAL, so API reads do not block the engine's writes); PostgreSQL by URL,
optionally inside its own schema (`database_schema`), which is created if absent.
"""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from fleet.errors import ConfigError

MIGRATIONS = Path(__file__).parent / "migrations"
SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# user:password@ after a scheme, a quote, a space or at the start; greedy to the last '@' (a raw '@' in a password)
_USERINFO_RE = re.compile(r"((?:://|^|[\s'\"])[^:/@\s'\"]*:)(?!//)[^\s'\"]*@")


def redact(text: str, url: str) -> str:
    """`text` with the password of `url` replaced by ***, also when SQLAlchemy cannot parse `url`."""
    try:
        password = make_url(url).password
    except Exception:  # unparseable: the pattern below still hides what sits where a password would
        password = None
    if password:
        text = text.replace(str(password), "***")
    return _USERINFO_RE.sub(r"\1***@", text)


def _why(exc: BaseException) -> str:
    """The driver's reason, on one line."""
    return str(exc.__cause__ or exc).strip().splitlines()[0]


def make_engine(url: str, *, schema: str | None = None) -> Engine:
    """An engine for `url`; for SQLite the file's directory is created."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    if schema is not None and not SCHEMA_RE.match(schema):
        raise ConfigError(f"database_schema {schema!r} must be a lowercase SQL identifier like 'edgeship'")
    args = {"options": f"-csearch_path={schema}"} if schema else {}
    try:
        engine = create_engine(url, connect_args=args, pool_size=10, max_overflow=10, pool_pre_ping=True)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise ConfigError(redact(f"database_url {url!r} is not usable: {_why(exc)}; use e.g. "
                                 "postgresql+psycopg://user@host/db", url)) from None
    if schema:
        try:
            with engine.begin() as conn:
                conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        except SQLAlchemyError as exc:
            raise ConfigError(redact(f"cannot reach the database at {engine.url.render_as_string()}: {_why(exc)}", url)) from None
    return engine


def migrate(engine: Engine, *, revision: str = "head") -> None:
    """Bring the schema to `revision`, by default the newest migration (idempotent)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except SQLAlchemyError as exc:
        url = engine.url.render_as_string(hide_password=False)
        raise ConfigError(redact(f"cannot migrate the database at {engine.url.render_as_string()}: {_why(exc)}", url)) from None


def sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
