"""A throw-away PostgreSQL cluster for the tests' PostgreSQL leg.

``initdb`` + ``pg_ctl`` in a temporary folder on a free loopback port, once per test
session, as the ``postgres`` user when the tests run as root (PostgreSQL refuses to run
as root); every test gets a database of its own (``CREATE DATABASE``, dropped after).
Durability is off (``fsync``, ``synchronous_commit``): the cluster lives as long as the
session (``durable=True``, for the benchmarks, keeps PostgreSQL's defaults). Without
PostgreSQL binaries the PostgreSQL leg is skipped with the reason, except under CI
(``CI=true``), where ``make install`` installs them and a missing binary is a failure.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from benchmarks._common import free_port


def find_bin(name: str) -> str | None:
    """A PostgreSQL server binary: on PATH, or where Debian's postgresql puts it."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return candidates[-1] if candidates else None


def require_postgres() -> tuple[str, str]:
    initdb, pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        reason = ("PostgreSQL server binaries (initdb, pg_ctl) not installed: "
                  "'make install' installs Debian postgresql")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return initdb, pg_ctl


class PostgresCluster:
    """One running cluster; :meth:`create_database` hands out empty databases."""

    def __init__(self, durable: bool = False) -> None:
        self.initdb, self.pg_ctl = require_postgres()
        self.durable = durable
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
        self.data = self.folder / "data"
        self._names = itertools.count(1)
        self._user = "postgres" if os.geteuid() == 0 else None

    def _run(self, *args: str, timeout: float = 120) -> None:
        command = list(args)
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {result.stdout}{result.stderr}")

    def start(self) -> PostgresCluster:
        if self._user is not None:
            shutil.chown(self.folder, self._user, self._user)
        self._run(self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        durability = ("" if self.durable else
                      "-c fsync=off -c synchronous_commit=off -c full_page_writes=off ")
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                   f"{durability}-c max_connections=300 -c shared_buffers=32MB "
                   # a hospital's server is rarely on UTC: aware datetimes come back in it
                   "-c timezone=Europe/Zurich")
        self._run(self.pg_ctl, "-D", str(self.data), "-o", options, "-l",
                  str(self.folder / "server.log"), "-w", "-t", "60", "start")
        self._admin = sa.create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT",
                                       poolclass=sa.NullPool)
        return self

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        name = f"t{next(self._names)}"
        with self._admin.connect() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        with self._admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        try:
            self._admin.dispose()
            self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
