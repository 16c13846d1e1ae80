"""The servers a study on several machines shares: PostgreSQL for the Optuna storage and an
`mlflow server` whose backend store is in PostgreSQL and which proxies artifacts, so workers need
no shared disk, only two URLs.

Everything lives in one folder (default `.services/`): the database cluster, the artifacts, the
logs, `services.json` (ports, password, the MLflow server's process id and start) and
`services.pgpass`, the password in libpq's password-file format (mode 600). The password is on no
command line: workers are given a URL without it and `PGPASSFILE` (psycopg, through libpq, reads
the file itself), and `mlflow server` gets its backend store (also without the password) and
`PGPASSFILE` through its environment. Both servers listen on 127.0.0.1 unless told otherwise.
PostgreSQL refuses to run as root, so as root the cluster runs as Debian's `postgres` user.
`stop` signals only processes it can tell are the services' own (the MLflow server by the boot and
start time recorded when it started, PostgreSQL by its process name and working folder), never a
process whose id merely appears in a stale file.

Hand-written: neither Optuna nor MLflow starts the servers they use, and the standard library has
no way to tell whether a process id still names the process it named (Linux's /proc is read).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
PGPASS_FILE = "services.pgpass"  # not `.pgpass`: a --dir of ~ must not overwrite the user's own
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
    mlflow_started: str = ""  # the MLflow server's boot id and start time (`_process_start`)

    @property
    def storage_url(self) -> str:
        """Optuna's database through the psycopg (v3) driver, password included, for use inside
        this process only (e.g. `optuna.load_study`): never print, log or pass it on a command line,
        which every user sees in `ps`; workers get `worker_storage_url`."""
        return (f"postgresql+psycopg://{DB_USER}:{self.password}@{self.host}:"
                f"{self.postgres_port}/optuna")

    @property
    def worker_storage_url(self) -> str:
        """`--storage` for every worker: Optuna's database without the password, which psycopg
        (libpq) reads from the file `PGPASSFILE` names (`pgpass_file`) or from `PGPASSWORD`."""
        return f"postgresql+psycopg://{DB_USER}@{self.host}:{self.postgres_port}/optuna"

    @property
    def pgpass_file(self) -> Path:
        """The password file for `PGPASSFILE` (libpq's format, mode 600), in the services' folder."""
        return Path(self.folder) / PGPASS_FILE

    @property
    def tracking_uri(self) -> str:
        """`--tracking-uri` for every worker."""
        return f"http://{self.host}:{self.mlflow_port}"

    def backend_store_uri(self) -> str:
        """The MLflow server's backend store, without the password (it reads `pgpass_file`)."""
        return f"postgresql+psycopg://{DB_USER}@{self.host}:{self.postgres_port}/mlflow"


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
               "--serve-artifacts", "--artifacts-destination", str((folder / "artifacts").resolve()),
               "--host", services.host, "--port", str(services.mlflow_port),
               "--workers", str(workers)]
    if services.host not in ("127.0.0.1", "localhost"):  # its security middleware checks Host
        command += ["--allowed-hosts", f"{services.host},{services.host}:{services.mlflow_port}"]
    # The backend store through the environment (MLflow reads MLFLOW_BACKEND_STORE_URI), not the
    # arguments, and its password from the file: PGPASSWORD, which libpq would prefer, is dropped.
    env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"} | {
        "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_BACKEND_STORE_URI": services.backend_store_uri(),
        "PGPASSFILE": str(services.pgpass_file)}
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
    """Whether some process has id `pid`, whoever it is."""
    if pid <= 0:  # none recorded (0 would mean this process group)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _process_start(pid: int) -> str | None:
    """`<boot id>:<start time in clock ticks since boot>` of process `pid`, which no other process
    shares (a reboot changes the boot id; a reused id starts later); None if there is no such
    process, or no /proc to read it from."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 of /proc/<pid>/stat is the start time; the name (field 2) may hold spaces and ")".
    return f"{boot}:{stat[stat.rindex(')') + 2:].split()[19]}"


def _is_ours(pid: int, started: str) -> bool:
    """Whether `pid` is still the process whose `_process_start` was recorded as `started`."""
    return pid > 0 and bool(started) and _process_start(pid) == started


def _postmaster_of(data: Path) -> tuple[int, bool] | None:
    """The process id in `data`'s postmaster.pid (None without one), and whether that process is
    this cluster's server: named postgres and working in `data` (a server chdirs to its data
    folder), not whatever took the id after a crash or reboot."""
    try:
        pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:  # gone, or not ours to inspect
        return pid, False
    return pid, name in ("postgres", "postmaster") and Path(cwd) == data.resolve()


def start_services(folder: Path = DEFAULT_FOLDER, host: str = "127.0.0.1", postgres_port: int = 0,
                   mlflow_port: int = 0, mlflow_workers: int = 2, install: bool = True,
                   echo: Callable[[str], None] = print) -> Services:
    """Start PostgreSQL and the MLflow server in `folder` (created; ports 0 = the previous start's
    if free, else free ones), or return them if they already run. A cluster made by an earlier
    start is reused, data and password kept. Writes `services.json` and the password file
    `services.pgpass` (mode 600). A folder it creates gets mode 755 (PostgreSQL, run as `postgres`
    under root, must enter it); an existing folder's mode is never changed. Raises
    `ServicesError` when a server cannot be installed, started or reached."""
    folder = folder.resolve()  # PostgreSQL reads relative paths from its data folder
    if not folder.exists():
        folder.mkdir(parents=True)
        folder.chmod(0o755)  # ours: the user's umask may be 077
    known = load_services(folder)
    if known is not None and _is_ours(known.mlflow_pid, known.mlflow_started):
        return known
    bindir = postgres_bin(install, echo)
    password = known.password if known else secrets.token_urlsafe(18)  # the cluster's, once made
    # A restart keeps the ports workers were given, when they are still free.
    services = Services(str(folder), host,
                        postgres_port or free_port(host, known.postgres_port if known else 0),
                        mlflow_port or free_port(host, known.mlflow_port if known else 0),
                        password, mlflow_pid=0)
    _save(services)
    _write_private(services.pgpass_file, f"*:{services.postgres_port}:*:{DB_USER}:"
                   f"{_pgpass_escape(password)}\n")
    _start_postgres(bindir, folder, host, services.postgres_port, password)
    try:
        process = _start_mlflow(services, folder, mlflow_workers)
    except BaseException:
        _stop_postgres(folder)
        raise
    services = dataclasses.replace(services, mlflow_pid=process.pid,
                                   mlflow_started=_process_start(process.pid) or "")
    _save(services)
    return services


def _pgpass_escape(field: str) -> str:
    """A field of a libpq password file: `:` and `\\` escaped with a backslash."""
    return field.replace("\\", "\\\\").replace(":", "\\:")


def _write_private(path: Path, text: str) -> None:
    """Write `path` readable by its owner only (mode 600, as libpq demands of a password file),
    whatever mode an older file had: a new file is written and renamed over it."""
    fresh = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    descriptor = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(text)
    os.replace(fresh, path)


def _save(services: Services) -> None:
    _write_private(Path(services.folder) / STATE_FILE,  # it holds the database password
                   json.dumps(asdict(services), indent=2) + "\n")


def _stop_postgres(folder: Path, echo: Callable[[str], None] = print) -> bool:
    """Stop the cluster in `folder` with `pg_ctl stop` if its postmaster.pid names its own server;
    True if it was running."""
    data = folder / "postgres"
    postmaster = _postmaster_of(data)
    if postmaster is None:
        return False
    pid, ours = postmaster
    if not ours:
        echo(f"PostgreSQL is not running: {data / 'postmaster.pid'} names process {pid}, which is "
             "not this cluster's server (the file outlived a crash or reboot): left alone")
        return False
    bindir = postgres_bin(install=False, echo=echo)
    _run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
         "stopping PostgreSQL")
    return True


def _stop_mlflow(known: Services) -> None:
    """Stop the MLflow server `known` records, which must be the process started (`_is_ours`):
    SIGTERM to its process group, SIGKILL after 30 s."""
    # It leads a session of its own (started so), so its group is its workers and nothing else.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(known.mlflow_pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _is_ours(known.mlflow_pid, known.mlflow_started) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(known.mlflow_pid, os.WNOHANG)
        time.sleep(0.2)
    if _is_ours(known.mlflow_pid, known.mlflow_started):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(known.mlflow_pid, signal.SIGKILL)


def stop_services(folder: Path = DEFAULT_FOLDER, echo: Callable[[str], None] = print) -> bool:
    """Stop both servers of `folder` (their data stays); False if none was running. A process
    named by a stale record (after a reboot its id may belong to anything) is never signalled:
    `echo` gets a line saying so. Raises `ServicesError` if `pg_ctl stop` fails."""
    folder = folder.resolve()
    known = load_services(folder)
    running = known is not None and _is_ours(known.mlflow_pid, known.mlflow_started)
    if known is not None and not running and _alive(known.mlflow_pid):
        echo(f"process {known.mlflow_pid} is not the MLflow server these services started (the "
             f"record in {folder / STATE_FILE} is stale, e.g. after a reboot, or lacks its start "
             "time): left alone")
    if running:
        _stop_mlflow(known)
    stopped_postgres = _stop_postgres(folder, echo)
    return running or stopped_postgres


def _running(folder: Path) -> Services:
    """The services recorded in `folder`, whose MLflow server still runs; `ServicesError` if not."""
    known = load_services(folder)
    if known is None or not _is_ours(known.mlflow_pid, known.mlflow_started):
        raise ServicesError(f"the services in {folder} are not running: `synops services start` first")
    return known


def restart_postgres(folder: Path = DEFAULT_FOLDER, downtime: float = 0.0,
                     echo: Callable[[str], None] = print) -> None:
    """Stop the services' PostgreSQL (`pg_ctl stop -m fast`, which ends every session, only if its
    postmaster.pid names its own server), leave it down for `downtime` seconds, and start it
    again: same port, password and data. The MLflow server keeps running (its requests fail
    meanwhile). What a database restart does to the workers of a study; used by the tests.
    Raises `ServicesError` when the services do not run or PostgreSQL cannot be stopped or
    started."""
    folder = folder.resolve()
    known = _running(folder)
    if not _stop_postgres(folder, echo):
        raise ServicesError(f"PostgreSQL of the services in {folder} is not running")
    time.sleep(downtime)
    _start_postgres(postgres_bin(install=False, echo=echo), folder, known.host, known.postgres_port,
                    known.password)


def restart_mlflow(folder: Path = DEFAULT_FOLDER, downtime: float = 0.0,
                   mlflow_workers: int = 2) -> Services:
    """Stop the services' MLflow server (the process they started, never another holding its
    recorded id), leave it down for `downtime` seconds, and start a new one on the same port;
    PostgreSQL keeps running. Records the new server's process id and returns the services.
    What a tracking-server restart does to the workers of a study; used by the tests. Raises
    `ServicesError` when the services do not run or the server cannot be started again."""
    folder = folder.resolve()
    known = _running(folder)
    _stop_mlflow(known)
    time.sleep(downtime)
    process = _start_mlflow(known, folder, mlflow_workers)
    services = dataclasses.replace(known, mlflow_pid=process.pid,
                                   mlflow_started=_process_start(process.pid) or "")
    _save(services)
    return services
