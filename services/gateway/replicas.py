"""Gateway replicas sharing one workflow database: heartbeats, and who is taken for dead.

DBOS recovers at launch the unfinished workflows of its own executor id; those of a replica that
died and does not come back (a pod replaced under another name) are recovered only when a live
replica asks for them. Each replica writes a heartbeat row; a replica that owns unfinished
workflows and has been silent for `dead_s` is dead, and any live replica re-enqueues its workflows
(DBOS's recovery is idempotent: one runner wins the re-enqueued workflow, so two replicas doing
it at once is harmless)."""

from __future__ import annotations

import time
from pathlib import Path

import sqlalchemy as sa

TABLE = "cmrvl_gateway_replicas"


def database_url(url: str, state_dir: Path) -> str:
    """The workflow database: the configured URL, or an SQLite file in the gateway's state folder."""
    if url:
        return url
    state_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{state_dir / 'workflow.sqlite'}"


def sqlalchemy_url(url: str) -> str:
    """The same database for SQLAlchemy with the psycopg 3 driver DBOS brings (not psycopg2)."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def redacted(url: str) -> str:
    """The URL without its password (for messages)."""
    return sa.engine.make_url(sqlalchemy_url(url)).render_as_string(hide_password=True)


class Replicas:
    def __init__(self, url: str, name: str, dead_s: float):
        self.name, self.dead_s = name, dead_s
        connect_args = {"timeout": 30} if url.startswith("sqlite") else {"connect_timeout": 10}
        self.engine = sa.create_engine(sqlalchemy_url(url), connect_args=connect_args, pool_pre_ping=True)
        self.table = sa.Table(TABLE, sa.MetaData(), sa.Column("name", sa.String(255), primary_key=True),
                              sa.Column("seen_at", sa.Float, nullable=False))

    def beat(self) -> None:
        """This replica is alive now (creates the table on first use)."""
        self.table.create(self.engine, checkfirst=True)
        with self.engine.begin() as conn:
            updated = conn.execute(sa.update(self.table).where(self.table.c.name == self.name)
                                   .values(seen_at=time.time())).rowcount
            if not updated:
                conn.execute(sa.insert(self.table).values(name=self.name, seen_at=time.time()))

    def dead(self, names: set[str]) -> list[str]:
        """Those of `names` (replicas with unfinished workflows) silent for `dead_s` or never seen."""
        cutoff = time.time() - self.dead_s
        with self.engine.connect() as conn:
            alive = {row.name for row in conn.execute(
                sa.select(self.table.c.name).where(self.table.c.seen_at >= cutoff))}
        return sorted(names - alive - {self.name})

    def close(self) -> None:
        self.engine.dispose()
