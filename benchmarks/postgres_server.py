"""A throwaway PostgreSQL server on loopback, for the tests and benchmarks that run the gateway on
PostgreSQL: ``initdb`` into a temporary directory and ``pg_ctl start`` on a free port, from the
machine's PostgreSQL binaries (Debian's ``postgresql`` package: ``/usr/lib/postgresql/<v>/bin``).

PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` user (which the
Debian package creates), through ``runuser``. Nothing listens beyond 127.0.0.1, and every
connection from there is trusted (a test server, never a deployment's).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks import free_port


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                      key=lambda p: int(Path(p).parent.parent.name))
    return Path(versions[-1]).parent if versions else None


def unavailable() -> str | None:
    """None when a server can be started here, else why not."""
    if _bin_dir() is None:
        return "PostgreSQL's server binaries (initdb, pg_ctl) are not installed"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no postgres user to run the server as"
        if shutil.which("runuser") is None:
            return "running as root, and runuser (util-linux) is missing"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'redaction-gateway[postgres]')"
    return None


class PostgresServer:
    """``start()`` a server, ``database()`` a new empty database on it (its URL), ``stop()``.
    ``durable=False`` turns off fsync (tests: faster, and nothing they check survives a crash
    of the machine)."""

    def __init__(self, durable: bool = False, listen: tuple[str, ...] = ("127.0.0.1",),
                 trust: tuple[str, ...] = ()) -> None:
        """``listen``: the addresses it listens on; ``trust``: networks (CIDR) beyond loopback
        whose connections it takes (test hosts in network namespaces)."""
        self.listen = listen
        self.trust = trust
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise RuntimeError(unavailable() or "no PostgreSQL")
        self.bin = bin_dir
        self.durable = durable
        self.port = 0
        self.root = Path(tempfile.mkdtemp(prefix="redact-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_postgres = os.geteuid() == 0

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def start(self) -> PostgresServer:
        self.root.chmod(0o755)
        self.data.mkdir()
        self.log.touch()
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            for p in (self.data, self.log):
                os.chown(p, user.pw_uid, user.pw_gid)
        init = self._run("initdb", "-D", str(self.data), "-U", "redact", "-A", "trust",
                         "-E", "UTF8", "--no-sync")
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr[-2000:]}")
        if self.trust:
            with open(self.data / "pg_hba.conf", "a") as hba:
                for net in self.trust:
                    hba.write(f"host all all {net} trust\n")
        options = [f"-p {{port}} -k {self.data} -c listen_addresses={','.join(self.listen)}",
                   "-c max_connections=200"]
        if not self.durable:
            options.append("-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._options = " ".join(options)
        for _ in range(3):  # a port taken between choosing it and binding it: another one
            self.port = free_port()
            started = self._pg_ctl("start")
            if started.returncode == 0:
                return self
        raise RuntimeError(f"pg_ctl start failed: {started.stderr[-1000:]}\n"
                           f"{self.log.read_text()[-2000:]}")

    def _pg_ctl(self, action: str) -> subprocess.CompletedProcess[str]:
        # the server's output goes to its log (-l): a pipe it inherited would never close
        return self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                         "-m", "fast", "-o", self._options.format(port=self.port), action)

    def restart(self) -> None:
        """Stop the server (fast: connections are cut) and start it again on the same port."""
        done = self._pg_ctl("restart")
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl restart failed: {done.stderr[-1000:]}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://redact@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its files."""
        if self.port:
            self._pg_ctl("stop")
        for _ in range(20):
            try:
                shutil.rmtree(self.root)
                return
            except OSError:
                time.sleep(0.1)
        with contextlib.suppress(OSError):
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
