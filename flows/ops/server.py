"""`make server` / `alignflow server`: the team's servers on one PostgreSQL, on 127.0.0.1 by default.

    alignflow server [--dir .server] [--pg-port 5433] [--prefect-port 4200] [--mlflow-port 5000]

- **PostgreSQL.** Without `ALIGNFLOW_DATABASE_URL`, a project-local cluster in `<dir>/pgdata`
  (Debian's `initdb` and `pg_ctl`; no system service): created on the first start with a user
  `alignflow` and a random password (or `ALIGNFLOW_DB_PASSWORD`), listening on 127.0.0.1 only, no
  Unix socket. `initdb` refuses to run as root, so under root the cluster runs as the `postgres` user.
  With `ALIGNFLOW_DATABASE_URL=postgresql://user:password@host:port`, that server is used instead.
  Either way the databases `alignflow_prefect` and `alignflow_mlflow` are created when missing.
- **Prefect** (`prefect server start`) with `PREFECT_API_DATABASE_CONNECTION_URL` on that database.
- **MLflow** (`mlflow server`) with that database as backend store and `--artifact-root` (a local or
  shared folder by default, or any MLflow artifact URL: s3://, gs://, ...) proxied by the server, so
  clients on other machines log and read artifacts through it.

The password goes into `<dir>/pgpass` (mode 0600) and reaches the servers as `PGPASSFILE`: it is in
no URL, command line, log, MLflow param or artifact. The URLs are printed and written to
`<dir>/server.env` (`source` it, then run with `tracking=server`). Ctrl-C or SIGTERM stops all three
(PostgreSQL with a fast shutdown); the next start finds every run, model version and deployment.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import flows
from stages.runtime.errors import ExpectedFailure

USER = "alignflow"
DATABASES = {"prefect": "alignflow_prefect", "mlflow": "alignflow_mlflow"}


class ServerError(ExpectedFailure, RuntimeError):
    """A server that cannot start: what is missing, or which folder or port."""


@dataclass
class Database:
    host: str
    port: int
    user: str
    password_file: Path  # a libpq passfile: host:port:db:user:password

    def url(self, driver: str, database: str) -> str:
        return f"postgresql+{driver}://{self.user}@{self.host}:{self.port}/{database}"

    def shown(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}"


def _as_postgres() -> list[str]:
    """initdb and the postmaster refuse root; under root they run as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    if not found:
        raise ServerError(f"{name}: not found; install PostgreSQL (Debian: apt-get install postgresql)")
    return str(found)


def _check_reachable(folder: Path) -> None:
    """Under root the cluster's folder must be reachable by `postgres`: every parent searchable."""
    if os.geteuid() != 0:
        return
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            raise ServerError(
                f"{parent}: the postgres user cannot enter this folder (PostgreSQL refuses to run as root, so it "
                f"runs as postgres here); choose --dir elsewhere or `chmod o+x {parent}`"
            )


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


class LocalPostgres:
    def __init__(self, root: Path, host: str, port: int) -> None:
        self.data, self.host, self.port = root / "pgdata", host, port
        self.log = root / "logs" / "postgres.log"
        self.db = Database(host, port, USER, root / "pgpass")

    def start(self) -> Database:
        _check_reachable(self.data.parent)
        if not (self.data / "PG_VERSION").is_file():
            self._init()
        owner = "postgres" if os.geteuid() == 0 else None
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.touch()
        if owner:
            shutil.chown(self.log, owner)
        options = f"-c listen_addresses={self.host} -p {self.port} -c unix_socket_directories=''"
        done = subprocess.run(
            [*_as_postgres(), _binary("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
             "-o", options, "start"], capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            tail = self.log.read_text()[-800:] if self.log.is_file() else ""
            raise ServerError(
                f"PostgreSQL in {self.data} did not start on port {self.port}: {done.stderr.strip()} {tail}"
            )
        return self.db

    def _init(self) -> None:
        password = os.environ.get("ALIGNFLOW_DB_PASSWORD") or secrets.token_urlsafe(24)
        self.data.mkdir(parents=True, exist_ok=True)
        pwfile = self.data.parent / ".initdb-password"
        _write_private(pwfile, password + "\n")
        try:
            if os.geteuid() == 0:
                shutil.chown(self.data, "postgres", "postgres")
                shutil.chown(pwfile, "postgres", "postgres")
            os.chmod(self.data, 0o700)
            done = subprocess.run(
                [*_as_postgres(), _binary("initdb"), "-D", str(self.data), "-U", USER, "--auth=scram-sha-256",
                 f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C"], capture_output=True, text=True,
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            shutil.rmtree(self.data, ignore_errors=True)
            raise ServerError(f"initdb in {self.data} failed: {done.stderr.strip()[-500:]}")
        _write_private(self.db.password_file, f"*:*:*:{USER}:{password}\n")

    def stop(self) -> None:
        subprocess.run([*_as_postgres(), _binary("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                       capture_output=True, text=True)  # fmt: skip


def given_database(url: str, root: Path) -> Database:
    """`ALIGNFLOW_DATABASE_URL`: its password moves to a passfile, never into a URL or command line."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname or not parts.username:
        raise ServerError("ALIGNFLOW_DATABASE_URL: expected postgresql://user:password@host:port")
    passfile = root / "pgpass"
    _write_private(passfile, f"*:*:*:{parts.username}:{urllib.parse.unquote(parts.password or '')}\n")
    return Database(parts.hostname, parts.port or 5432, parts.username, passfile)


def create_databases(db: Database) -> None:
    import psycopg

    try:
        where = {"host": db.host, "port": db.port, "user": db.user, "passfile": str(db.password_file)}
        with psycopg.connect(dbname="postgres", autocommit=True, connect_timeout=10, **where) as conn:
            have = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
            for name in DATABASES.values():
                if name not in have:
                    conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as e:
        raise ServerError(f"cannot connect to {db.shown()}: {refusal(e)}") from None


def refusal(e: Exception) -> str:
    """The database's own reason (`FATAL: password authentication failed for user ...`), not only
    libpq's last line (`Multiple connection attempts failed...`)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    fatal = [line[line.index("FATAL:") :] for line in lines if "FATAL:" in line]
    return "; ".join(dict.fromkeys(fatal)) if fatal else (lines[-1] if lines else type(e).__name__)


def database_down(db: Database) -> str | None:
    """None while PostgreSQL accepts connections on its port; else why not."""
    import socket

    try:
        with socket.create_connection((db.host, db.port), timeout=3):
            return None
    except OSError as e:
        return e.strerror or str(e)


def wait_for(url: str, proc: subprocess.Popen, what: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"{what} exited with code {proc.returncode}; see {log}: {log.read_text()[-800:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise ServerError(f"{what} did not answer at {url} within {timeout:.0f} s; see {log}")


def _spawn(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    out = open(log, "ab")  # noqa: SIM115 (the child keeps it)
    return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="alignflow server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=str(flows.ROOT / ".server"), help="cluster, logs, passfile, artifacts")
    parser.add_argument("--host", default="127.0.0.1", help="where Prefect and MLflow listen")
    parser.add_argument("--pg-port", type=int, default=5433)
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--artifact-root", default=None, help="MLflow artifact store (default <dir>/mlflow-artifacts)")
    parser.add_argument("--debug", action="store_true", help="show an expected failure's stack")
    args = parser.parse_args(argv)
    try:
        serve(args)
    except ExpectedFailure as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def serve(args: argparse.Namespace) -> None:
    root = Path(args.dir).resolve()
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chmod(root, 0o755)  # the postgres user enters it to reach pgdata and its log
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    local = None if os.environ.get("ALIGNFLOW_DATABASE_URL") else LocalPostgres(root, "127.0.0.1", args.pg_port)
    prefect = mlflow = None
    try:
        db = local.start() if local else given_database(os.environ["ALIGNFLOW_DATABASE_URL"], root)
        create_databases(db)
        bin_dir = Path(sys.executable).parent
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
        env |= {"PGPASSFILE": str(db.password_file), "PREFECT_HOME": str(root / "prefect")}
        prefect_env = env | {
            "PREFECT_API_DATABASE_CONNECTION_URL": db.url("asyncpg", DATABASES["prefect"]),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        prefect_url = f"http://{args.host}:{args.prefect_port}/api"
        prefect = _spawn([str(bin_dir / "prefect"), "server", "start", "--host", args.host, "--port",
                          str(args.prefect_port)], prefect_env, logs / "prefect.log")  # fmt: skip
        artifact_root = args.artifact_root or str(root / "mlflow-artifacts")
        mlflow_url = f"http://{args.host}:{args.mlflow_port}"
        store = db.url("psycopg", DATABASES["mlflow"])
        mlflow = _spawn([str(bin_dir / "mlflow"), "server", "--backend-store-uri", store, "--artifacts-destination",
                         artifact_root, "--host", args.host, "--port", str(args.mlflow_port), "--workers", "1"],
                        env, logs / "mlflow.log")  # fmt: skip
        wait_for(f"{prefect_url}/health", prefect, "the Prefect server", logs / "prefect.log")
        wait_for(f"{mlflow_url}/health", mlflow, "the MLflow server", logs / "mlflow.log")
        (root / "server.env").write_text(
            f"export PREFECT_API_URL={prefect_url}\nexport MLFLOW_TRACKING_URI={mlflow_url}\n"
        )
        print(f"postgres  {db.shown()}  (databases {', '.join(DATABASES.values())}; password in {db.password_file})")
        print(f"prefect   {prefect_url}  (UI http://{args.host}:{args.prefect_port})")
        print(f"mlflow    {mlflow_url}  (artifacts {artifact_root})")
        print(f"ready: `source {root / 'server.env'}`, then `make align ARGS=tracking=server`; Ctrl-C stops all three",
              flush=True)  # fmt: skip
        while not stopping:
            for proc, what in ((prefect, "the Prefect server"), (mlflow, "the MLflow server")):
                if proc.poll() is not None:
                    raise ServerError(f"{what} exited with code {proc.returncode}; see {logs}; stopping the others")
            if (why := database_down(db)) is not None:  # Prefect and MLflow answer 500s without it
                raise ServerError(
                    f"PostgreSQL at {db.shown()} stopped answering ({why}); Prefect and MLflow cannot work without "
                    f"it, so all three stop (see {logs}); start `alignflow server` again"
                )
            time.sleep(0.5)
        print("stopping", flush=True)
    finally:
        _stop(prefect)
        _stop(mlflow)
        if local:
            local.stop()


if __name__ == "__main__":
    main()
