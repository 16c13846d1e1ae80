"""The servers a study on several machines shares: PostgreSQL for the Optuna storage and an
`mlflow server` whose backend store is in PostgreSQL and which proxies artifacts, so workers need
no shared disk, only two URLs.

Everything lives in one folder (default `.services/`): the database cluster, the artifacts, the
logs and `services.json` (ports, password, process ids). Both servers listen on 127.0.0.1 unless
told otherwise. PostgreSQL refuses to run as root, so as root the cluster runs as Debian's
`postgres` user. Hand-written: neither Optuna nor MLflow starts the servers they use.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import PipelineError

DEFAULT_FOLDER = Path(".services")
STATE_FILE = "services.json"
DB_USER = "synops"
DATABASES = ("optuna", "mlflow")
POSTGRES_PACKAGE = "postgresql"
SYSTEM_USER = "postgres"  # Debian's package creates it
START_TIMEOUT = 180  # seconds for the MLflow server's first start (it migrates its database)


class ServicesError(PipelineError, RuntimeError):
    """A server cannot be started or reached; the message says why and what to do."""


@dataclass(frozen=True)
class Services:
    """Two running servers and the URLs workers use to reach them."""

    folder: str
    host: str
    postgres_port: int
    mlflow_port: int
    password: str
    mlflow_pid: int

    @property
    def storage_url(self) -> str:
        """`--storage` for every worker: Optuna's database, through the psycopg (v3) driver."""
        return (f"postgresql+psycopg://{DB_USER}:{self.password}@{self.host}:"
                f"{self.postgres_port}/optuna")

    @property
    def tracking_uri(self) -> str:
        """`--tracking-uri` for every worker."""
        return f"http://{self.host}:{self.mlflow_port}"

    def backend_store_uri(self) -> str:
        return (f"postgresql+psycopg://{DB_USER}:{self.password}@{self.host}:"
                f"{self.postgres_port}/mlflow")


def free_port(host: str, preferred: int = 0) -> int:
    """`preferred` if nothing listens on it now, else a port the OS picks."""
    with socket.socket() as probe:
        # as the servers bind: a port its last clients left in TIME_WAIT is free to them
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, preferred))
        except OSError:
            probe.bind((host, 0))
        return probe.getsockname()[1]


def postgres_bin(install: bool, echo: Callable[[str], None]) -> Path:
    """The folder of PostgreSQL's server programs; with `install`, Debian's package is installed
    when there is none (as root)."""
    for _ in range(2):
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if found:
            return found[-1].parent
        if shutil.which("initdb"):
            return Path(shutil.which("initdb")).resolve().parent
        if not (install and os.geteuid() == 0 and shutil.which("apt-get")):
            break
        echo(f"installing Debian's {POSTGRES_PACKAGE} package")
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update", "-qq"],
                        ["apt-get", "install", "-y", "-qq", POSTGRES_PACKAGE]):
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise ServicesError(f"`{' '.join(command)}` failed:\n{done.stderr[-2000:]}")
    raise ServicesError(f"PostgreSQL is not installed: `apt-get install {POSTGRES_PACKAGE}` (as "
                        "root), or put its bin folder (with initdb and pg_ctl) on PATH")


def _as_cluster_owner(command: list[str]) -> list[str]:
    """PostgreSQL will not run as root: run its programs as the `postgres` user there."""
    return ["runuser", "-u", SYSTEM_USER, "--", *command] if os.geteuid() == 0 else command


def _run(command: list[str], what: str, env: dict[str, str] | None = None,
         unless: str | None = None) -> None:
    """Run a PostgreSQL program; a failure whose message holds `unless` is none."""
    done = subprocess.run(_as_cluster_owner(command), capture_output=True, text=True,
                          env=os.environ | (env or {}))
    if done.returncode != 0 and not (unless and unless in done.stderr):
        raise ServicesError(f"{what} failed ({' '.join(command[:2])} ...):\n"
                            f"{(done.stderr or done.stdout)[-2000:]}")


def _check_reachable(folder: Path) -> None:
    """As root, the cluster runs as `postgres`, which must be able to enter `folder` from `/`."""
    if os.geteuid() != 0:
        return
    for parent in [folder.resolve(), *folder.resolve().parents]:
        if not parent.stat().st_mode & stat.S_IXOTH:
            raise ServicesError(f"{parent} cannot be entered by other users, so PostgreSQL (run "
                                f"as `{SYSTEM_USER}`) cannot reach {folder}: choose a services "
                                "folder elsewhere (--dir)")


def _give_to_cluster_owner(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, user=SYSTEM_USER, group=SYSTEM_USER)


def _start_postgres(bindir: Path, folder: Path, host: str, port: int, password: str) -> None:
    _check_reachable(folder)
    data, run_dir = folder / "postgres", folder / "postgres-run"  # socket and log
    fresh = not (data / "PG_VERSION").is_file()
    for path in (data, run_dir):
        path.mkdir(mode=0o700, exist_ok=True)
        _give_to_cluster_owner(path)
    if fresh:
        password_file = run_dir / "password"
        password_file.write_text(password + "\n")
        _give_to_cluster_owner(password_file)
        try:
            _run([str(bindir / "initdb"), "-D", str(data), "-U", DB_USER,
                  f"--pwfile={password_file}", "--auth=scram-sha-256", "--encoding=UTF8"],
                 "creating the PostgreSQL cluster")
        finally:
            password_file.unlink()
    options = f"-p {port} -c listen_addresses={host} -c unix_socket_directories={run_dir}"
    log = run_dir / "postgres.log"
    _run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o", options, "start"],
         f"starting PostgreSQL (log: {log})")
    for database in DATABASES:  # also after a first start that failed half-way
        _run([str(bindir / "createdb"), "-h", host, "-p", str(port), "-U", DB_USER, database],
             f"creating database {database}", env={"PGPASSWORD": password}, unless="already exists")


def _wait_for_mlflow(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServicesError(f"the MLflow server exited ({process.returncode}):\n"
                                f"{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health",
                                                                  timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    raise ServicesError(f"the MLflow server did not answer {url}/health within {START_TIMEOUT} s "
                        f"(log: {log})")


def _start_mlflow(services: Services, folder: Path, workers: int) -> subprocess.Popen:
    log = folder / "mlflow.log"
    command = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", services.backend_store_uri(),
               "--serve-artifacts", "--artifacts-destination", str((folder / "artifacts").resolve()),
               "--host", services.host, "--port", str(services.mlflow_port),
               "--workers", str(workers)]
    if services.host not in ("127.0.0.1", "localhost"):  # its security middleware checks Host
        command += ["--allowed-hosts", f"{services.host},{services.host}:{services.mlflow_port}"]
    env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)  # not stopped by the terminal's Ctrl-C
    _wait_for_mlflow(process, services.tracking_uri, log)
    return process


def load_services(folder: Path = DEFAULT_FOLDER) -> Services | None:
    """The services recorded in `folder`, or None."""
    state = folder / STATE_FILE
    return Services(**json.loads(state.read_text())) if state.is_file() else None


def _alive(pid: int) -> bool:
    if pid <= 0:  # none recorded (0 would mean this process group)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_services(folder: Path = DEFAULT_FOLDER, host: str = "127.0.0.1", postgres_port: int = 0,
                   mlflow_port: int = 0, mlflow_workers: int = 2, install: bool = True,
                   echo: Callable[[str], None] = print) -> Services:
    """Start PostgreSQL and the MLflow server in `folder` (created; ports 0 = the previous start's
    if free, else free ones), or return them if they already run. A cluster made by an earlier
    start is reused, data and password kept."""
    folder = folder.resolve()  # PostgreSQL reads relative paths from its data folder
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    known = load_services(folder)
    if known is not None and _alive(known.mlflow_pid):
        return known
    bindir = postgres_bin(install, echo)
    password = known.password if known else secrets.token_urlsafe(18)  # the cluster's, once made
    # A restart keeps the ports workers were given, when they are still free.
    services = Services(str(folder), host,
                        postgres_port or free_port(host, known.postgres_port if known else 0),
                        mlflow_port or free_port(host, known.mlflow_port if known else 0),
                        password, mlflow_pid=0)
    _save(services)
    _start_postgres(bindir, folder, host, services.postgres_port, password)
    try:
        process = _start_mlflow(services, folder, mlflow_workers)
    except BaseException:
        _stop_postgres(folder)
        raise
    services = Services(**(asdict(services) | {"mlflow_pid": process.pid}))
    _save(services)
    return services


def _save(services: Services) -> None:
    state = Path(services.folder) / STATE_FILE
    state.touch(mode=0o600)  # it holds the database password
    state.write_text(json.dumps(asdict(services), indent=2) + "\n")


def _stop_postgres(folder: Path) -> None:
    data = folder / "postgres"
    if (data / "postmaster.pid").is_file():
        bindir = postgres_bin(install=False, echo=print)
        _run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
             "stopping PostgreSQL")


def stop_services(folder: Path = DEFAULT_FOLDER) -> bool:
    """Stop both servers of `folder` (their data stays); False if none was running."""
    folder = folder.resolve()
    known = load_services(folder)
    running = known is not None and _alive(known.mlflow_pid)
    if running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(known.mlflow_pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _alive(known.mlflow_pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(known.mlflow_pid, os.WNOHANG)
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(known.mlflow_pid, signal.SIGKILL)
    stopped_postgres = (folder / "postgres" / "postmaster.pid").is_file()
    _stop_postgres(folder)
    return running or stopped_postgres
