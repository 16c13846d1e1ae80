"""Tracking: the one module that talks to MLflow.

A `Tracker` is built from a tracking URI and passed to whoever records or reads runs; nothing here
sets MLflow's process-global URI or uses its "active run", so two stores can be used side by side
and no run is closed behind the pipeline's back at exit. The default store is SQLite at
`mlruns/mlflow.db` with artifacts beside it in `mlruns/artifacts` (MLflow's plain file store is
deprecated).

A tracking server that stops answering (it restarts, its database restarts) is waited for by
MLflow's own client, which retries every request that got no answer or a 408/429/5xx, 7 times with
exponential backoff (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, `MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`: after
0, 4, 8, ... 120 s, about 4 minutes in all), so a restart of a minute or two is only a pause. When
those retries give up on a server that does not answer, the call raises `ServerUnavailableError`
naming the server, and so does every later call, at once, until its `/health` answers again. A
request the server answered with an error (a full artifact store: HTTP 500 after the retries; on a
local store an `OSError`) fails that call only: the run records why and the trial fails.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# A progress bar per downloaded checkpoint would interleave with the pipeline's own output, and
# MLflow's telemetry thread edits os.environ while `requests` iterates it in the logging thread (a
# KeyError that kills the run): an offline or private cluster wants telemetry off anyway.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# The pipeline prints its own links; MLflow's "View run ... at" line per run through a server is noise.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# MLflow's own retries of a request to a tracking server (its defaults, pinned: see above).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2")

import requests  # noqa: E402
import torch  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline.errors import PipelineError
from pipeline.retry import ServerUnavailableError, first_line
from pipeline.secrets import redact_text, redact_url

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
CHECKPOINT_ARTIFACT = "model/state_dict.pt"
TAG_ROLE = "synops.role"  # "base", "trial", "reference", "study" or "train"
TAG_BASE_KEY = "synops.base_model_key"
TAG_FAILURE = "synops.failure_reason"
PARENT_TAG = "mlflow.parentRunId"  # how MLflow nests runs in its UI
# MLflow 3's UI opens an experiment on its GenAI overview unless it is tagged as model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log-batch call


class TrackingError(PipelineError, RuntimeError):
    """A run or artifact the pipeline needs cannot be read from the tracking store."""


class PublishError(PipelineError, RuntimeError):
    """What the pipeline finished could not be written to the tracking store (the study's front
    to its parent run); the finished work itself is kept."""


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """`--tracking-uri`, else `MLFLOW_TRACKING_URI`, else the project's SQLite store."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _no_answer(err: BaseException) -> bool:
    """Whether `err` (or an error it was raised from) means the server gave no answer at all:
    refused or dropped connections, timeouts. An answer with an error status is not that."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _ServerClient:
    """An `MlflowClient` for a tracking server, whose calls raise `ServerUnavailableError` when
    MLflow's own retries gave up on a server that does not answer, and then at once (without
    another round of retries) until the server's `/health` answers again.

    Hand-written: MLflow retries each request on its own and has no notion of a server that is
    down for every request."""

    HEALTH_TIMEOUT = 5  # seconds for the /health check of a server that gave no answer last time

    def __init__(self, uri: str) -> None:
        self._client = MlflowClient(uri)
        self._uri = uri
        self._down: str | None = None  # why the last call found the server unavailable

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        return self._guarded(method) if callable(method) else method

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self._uri.rstrip('/')}/health",
                                        timeout=self.HEALTH_TIMEOUT) as response:
                return response.status == 200
        except OSError:
            return False

    def _unavailable(self, detail: str) -> ServerUnavailableError:
        return ServerUnavailableError(
            f"the MLflow tracking server at {redact_url(self._uri)} does not answer ({detail}); "
            "finished work is kept: start the server again and re-run the command to continue")

    def _guarded(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            if self._down is not None:
                if not self._answers():
                    raise self._unavailable(self._down)
                self._down = None
            started = time.monotonic()
            try:
                return method(*args, **kwargs)
            except (MlflowException, requests.exceptions.RequestException) as err:
                if not _no_answer(err):
                    raise
                self._down = (f"MLflow's retries gave up after {time.monotonic() - started:.0f} s; "
                              f"last: {redact_text(first_line(err), self._uri)}")
                raise self._unavailable(self._down) from err

        return call


class TrackedRun:
    """One MLflow run being written; ends with `finish()` or `fail()`."""

    def __init__(self, client: MlflowClient | _ServerClient, run_id: str) -> None:
        self._client = client
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = _now_ms()
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=items[start : start + MAX_PARAMS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def log_json(self, record: Mapping[str, Any], artifact_file: str) -> None:
        self._client.log_dict(self.run_id, dict(record), artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self._client.log_figure(self.run_id, figure, artifact_file)

    def log_folder(self, folder: Path, artifact_path: str | None = None) -> None:
        self._client.log_artifacts(self.run_id, str(folder), artifact_path=artifact_path)

    def log_checkpoint(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """A state dict as an artifact (load it with `weights_only=True`); cheaper than
        `mlflow.pytorch.log_model`, which infers requirements in a subprocess."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(CHECKPOINT_ARTIFACT).name
            torch.save(dict(state_dict), path)
            self._client.log_artifact(self.run_id, str(path), str(Path(CHECKPOINT_ARTIFACT).parent))

    def finish(self) -> None:
        self._client.set_terminated(self.run_id, status="FINISHED")

    def fail(self, reason: str, status: str = "FAILED") -> None:
        """End the run as FAILED (or KILLED) with `reason` in the tag `synops.failure_reason`."""
        self._client.set_tag(self.run_id, TAG_FAILURE, reason[:5000])
        self._client.set_terminated(self.run_id, status=status)


class Tracker:
    """The MLflow store at `uri`: experiments, runs, and the artifacts the pipeline reads back."""

    def __init__(self, uri: str) -> None:
        """Open the store and create (or migrate) its schema now, once, before any worker starts:
        several processes first touching a fresh SQLite file race on the schema."""
        self.uri = uri
        db = _sqlite_path(uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        self._client = _ServerClient(uri) if uri.startswith(("http://", "https://")) else MlflowClient(uri)
        self._client.search_experiments(max_results=1)
        self.started_runs: list[str] = []  # the runs this tracker created, oldest first

    def experiment(self, name: str) -> str:
        """Id of the experiment `name`, created if needed (artifacts next to a SQLite store)."""
        existing = self._client.get_experiment_by_name(name)
        if existing is None:
            db = _sqlite_path(self.uri)
            location = (db.parent / "artifacts").resolve().as_uri() if db is not None else None
            try:
                return self._client.create_experiment(name, artifact_location=location,
                                                      tags=EXPERIMENT_KIND)
            except MlflowException:  # another worker created it first
                existing = self._client.get_experiment_by_name(name)
        if existing.tags.get("mlflow.experimentKind") is None:  # made by an older version
            for key, value in EXPERIMENT_KIND.items():
                self._client.set_experiment_tag(existing.experiment_id, key, value)
        return existing.experiment_id

    def start_run(self, experiment_id: str, name: str, tags: Mapping[str, str],
                  parent_run_id: str | None = None) -> TrackedRun:
        """Open a run named `name` with `tags`, nested under `parent_run_id` if given, and note
        its id in `started_runs`. Raises `ServerUnavailableError` when the server does not answer."""
        tags = dict(tags) | ({PARENT_TAG: parent_run_id} if parent_run_id else {})
        run = self._client.create_run(experiment_id, run_name=name, tags=tags)
        self.started_runs.append(run.info.run_id)
        return TrackedRun(self._client, run.info.run_id)

    def run(self, run_id: str) -> TrackedRun:
        """A handle to write more to an existing run (a study's parent run)."""
        return TrackedRun(self._client, run_id)

    def reopen(self, run_id: str) -> None:
        self._client.update_run(run_id, status="RUNNING")

    def status(self, run_id: str) -> str:
        return self._client.get_run(run_id).info.status

    def experiment_of(self, run_id: str) -> str:
        return self._client.get_run(run_id).info.experiment_id

    def find_finished_run(self, experiment_id: str, tags: Mapping[str, str]) -> str | None:
        """Id of the newest FINISHED run of the experiment carrying all `tags`, or None."""
        conditions = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        conditions.append("attributes.status = 'FINISHED'")
        runs = self._client.search_runs(
            [experiment_id], filter_string=" and ".join(conditions),
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def download(self, run_id: str, artifact_path: str, folder: Path) -> Path:
        """Copy one artifact of a run into `folder`; `TrackingError` if it cannot be read."""
        try:
            return Path(self._client.download_artifacts(run_id, artifact_path, str(folder)))
        except (MlflowException, OSError) as err:
            raise TrackingError(f"run {run_id}: cannot read artifact {artifact_path}: {err}") from err

    def load_checkpoint(self, run_id: str) -> dict[str, torch.Tensor]:
        """The state dict logged by `TrackedRun.log_checkpoint`; `TrackingError` if it is missing
        or unreadable (a truncated file included)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = self.download(run_id, CHECKPOINT_ARTIFACT, Path(tmp))
            try:
                return torch.load(path, weights_only=True, map_location="cpu")
            except (RuntimeError, OSError, EOFError, ValueError) as err:
                raise TrackingError(f"run {run_id}: checkpoint {CHECKPOINT_ARTIFACT} is "
                                    f"unreadable: {err}") from err

    def load_text(self, run_id: str, artifact_file: str) -> str:
        """A text artifact of a run (its `config.toml`, say); `TrackingError` if it cannot be read."""
        with tempfile.TemporaryDirectory() as tmp:
            return self.download(run_id, artifact_file, Path(tmp)).read_text()

    def load_json(self, run_id: str, artifact_file: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            path = self.download(run_id, artifact_file, Path(tmp))
            try:
                return json.loads(path.read_text())
            except ValueError as err:
                raise TrackingError(f"run {run_id}: {artifact_file} is not JSON: {err}") from err

    def has_artifact(self, run_id: str, artifact_path: str) -> bool:
        folder = str(Path(artifact_path).parent) if Path(artifact_path).parent != Path(".") else None
        return any(item.path == artifact_path for item in self._client.list_artifacts(run_id, folder))

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self._client.set_tag(run_id, key, value)

    def close(self, run_id: str, status: str, reason: str | None = None) -> None:
        """End a run someone else left open (its process died), with the reason if given."""
        run = TrackedRun(self._client, run_id)
        if reason:
            run.fail(reason, status)
        else:
            self._client.set_terminated(run_id, status=status)

    def run_url(self, experiment_id: str, run_id: str) -> str:
        """Where the run opens in `make ui` (or the server's UI), in the UI's model-training
        workspace (without `workflowType` MLflow 3 opens its GenAI one)."""
        base = redact_url(self.uri) if self.uri.startswith("http") else "http://127.0.0.1:5000"
        return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
                "?workflowType=machine_learning")
