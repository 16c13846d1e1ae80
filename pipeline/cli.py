"""`synops` command line: parse and validate, then call the stages. No pipeline logic lives here."""

from __future__ import annotations

import datetime
import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from pipeline.chip_profiles import CHIP_NAMES
from pipeline.config import PENALTIES, ExperimentConfig, load_config, parse_override
from pipeline.errors import EXIT_BAD_INPUT, ConfigError, PipelineError
from pipeline.interrupt import stop_on_signals, stop_requested
from pipeline.memory import keep_freed_memory
from pipeline.secrets import redact_url

# Named flags of `synops train` and the config keys they set.
TRAIN_FLAGS = {
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "penalty": "train.penalty",
    "penalty_weight": "train.penalty_weight",
    "target": "train.target_synops",
    "seed": "train.seed",
    "device": "device",
}


def _resolve_config(path: str, assignments: tuple[str, ...], flags: dict[str, Any]) -> ExperimentConfig:
    """Load the config with `--set` overrides and named flags (which win). A `ConfigError` here
    becomes exit code 2 through `_fail_cleanly`."""
    import torch

    overrides = dict(parse_override(a) for a in assignments)
    overrides |= {TRAIN_FLAGS[k]: v for k, v in flags.items() if v is not None}
    config = load_config(path, overrides)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"'{config.device}' requested but no CUDA device is available")
    return config


def _fail_cleanly(command: Callable) -> Callable:
    """Turn the pipeline's errors (`PipelineError`) into a one-line message and their exit status
    (2 with click's usage line for bad input, else 1), and an interruption into exit status 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PipelineError as err:
            if err.exit_code == EXIT_BAD_INPUT:
                prefix = "invalid config: " if isinstance(err, ConfigError) else ""
                raise click.UsageError(f"{prefix}{err}") from None
            click.secho(f"error: {err}", fg="red", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            click.secho("interrupted: finished work is kept, the running run is marked KILLED",
                        fg="yellow", err=True)
            sys.exit(130)

    return wrapper


config_option = click.option(
    "--config", "config_path", required=True, type=click.Path(dir_okay=False),
    help="Experiment TOML, e.g. experiments/mnist.toml.",
)
set_option = click.option(
    "--set", "assignments", multiple=True, metavar="KEY=VALUE",
    help="Override any config value, e.g. --set train.epochs=3 (repeatable).",
)
tracking_option = click.option(
    "--tracking-uri", default=None,
    help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db].",
)


def _warn_of_password(context: click.Context, parameter: click.Parameter, url: str | None) -> str | None:
    """`--storage` as given; a password in it (visible in `ps` to every user) gets a warning that
    does not repeat it."""
    from pipeline.secrets import has_password

    if url is not None and has_password(url):
        click.secho("warning: the password in --storage is visible to every user of this machine "
                    "(`ps`): leave it out of the URL and let PostgreSQL's client read it from "
                    "PGPASSWORD or a password file (PGPASSFILE, else ~/.pgpass)", fg="yellow", err=True)
    return url


storage_option = click.option(
    "--storage", default=None, callback=_warn_of_password,
    help="Optuna storage URL [default: sqlite:///mlruns/optuna.db]; use "
         "postgresql+psycopg://user@host:port/db to share one study between machines, with the "
         "password in PGPASSWORD or the file PGPASSFILE names (not in the URL: `ps` shows it).")
quiet_option = click.option(
    "--quiet", is_flag=True,
    help="No progress bars, timestamped log lines instead (automatic when not on a terminal).")


def study_options(command: Callable) -> Callable:
    """The options of every command that reads a study: its config and where its stores are."""
    for option in (storage_option, tracking_option, set_option, config_option):
        command = option(command)
    return command


def trial_option(help_text: str) -> Callable:
    return click.option("--trial", "trial_number", type=click.IntRange(min=0), default=None,
                        help=help_text)


def member_options(command: Callable) -> Callable:
    """The options of commands that check a study's members (`snn`, `deploy`): which members,
    and on how many test samples the spiking simulation runs."""
    for option in (
        click.option("--max-samples", type=click.IntRange(min=0), default=None,
                     help="Test samples to simulate as a spiking network [default: snn.max_samples; "
                          "0 = all]."),
        click.option("--front", "whole_front", is_flag=True, help="Check every front member."),
        click.option("--knee", is_flag=True, help="Check the front's knee."),
        trial_option("Check this finished trial."),
    ):
        command = option(command)
    return command


def _output(quiet: bool) -> tuple[bool, Callable[[str], None]]:
    """Progress bars only on a terminal; elsewhere (a log file, CI, a scheduler) timestamped lines,
    so that a log reads like the terminal's summary and holds no control characters."""
    if not quiet and sys.stderr.isatty():
        return True, click.echo
    return False, lambda line: click.echo(f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S} {line}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train networks that need fewer synaptic operations and trace the accuracy-vs-SynOps front."""
    keep_freed_memory()


@main.command()
@config_option
@set_option
@_fail_cleanly
def data(config_path: str, assignments: tuple[str, ...]) -> None:
    """Load and check the config's data (fetching a built-in dataset: torchvision, else the
    offline sources) and say what the network will see."""
    from pipeline.data import load_dataset

    config = _resolve_config(config_path, assignments, {})
    dataset = load_dataset(config.data)
    shape = "x".join(map(str, dataset.input_shape))
    encoding = (f"encoded to 0..{dataset.spikes_per_pixel} spikes per pixel"
                if dataset.spikes_per_pixel is not None else "used as they are")
    click.echo(f"{config.data.source}: {len(dataset.train)} training, {len(dataset.val)} validation, "
               f"{len(dataset.test)} test samples of {shape}, {dataset.num_classes} classes; "
               f"{dataset.kind} ({encoding}); fingerprint {dataset.fingerprint}")


@main.command()
@config_option
@set_option
@tracking_option
@click.option("--epochs", type=click.IntRange(min=0), default=None, help="train.epochs")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="train.batch_size")
@click.option("--lr", type=float, default=None, help="train.lr")
@click.option("--penalty", type=click.Choice(PENALTIES), default=None,
              help="train.penalty")
@click.option("--penalty-weight", type=float, default=None, help="train.penalty_weight")
@click.option("--target", type=float, default=None, help="train.target_synops")
@click.option("--seed", type=int, default=None, help="train.seed")
@click.option("--device", default=None, help="cpu or cuda[:N]")
@quiet_option
@_fail_cleanly
def train(config_path: str, assignments: tuple[str, ...], tracking_uri: str | None,
          quiet: bool, **flags: Any) -> None:
    """Train one config (warm-started from its base model if it has [pretrain]); log to MLflow."""
    from pipeline.run import run_experiment
    from pipeline.tracking import resolve_tracking_uri
    from pipeline.train import epoch_line

    config = _resolve_config(config_path, assignments, flags)
    uri = resolve_tracking_uri(tracking_uri)
    progress, echo = _output(quiet)
    epochs = {"base model": config.pretrain.epochs if config.pretrain else 0, "train": config.train.epochs}
    with stop_on_signals():
        result = run_experiment(
            config, uri, progress=progress, should_stop=stop_requested,
            on_epoch=None if progress else lambda stage, s: echo(f"{stage} {epoch_line(s, epochs[stage])}"))
    click.echo(
        f"{config.name}: test accuracy {result.test.accuracy:.2%} at "
        f"{result.test.synops_mean:.3g} SynOps/sample (val {result.val.accuracy:.2%} at "
        f"{result.val.synops_mean:.3g}); {result.seconds:.0f} s; MLflow run {result.run_id} in "
        f"{redact_url(uri)}"
    )


@main.command()
@click.option("--config", "config_path", default="experiments/seed.toml", show_default=True,
              type=click.Path(dir_okay=False), help="Model, data and penalty to benchmark.")
@set_option
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Alternating rounds; medians are reported.")
@click.option("--study", "study_path", default="experiments/mnist.toml", show_default=True,
              type=click.Path(dir_okay=False),
              help="The study whose time to its first point is measured ('' to skip it).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_fail_cleanly
def bench(config_path: str, assignments: tuple[str, ...], rounds: int, study_path: str,
          as_json: bool) -> None:
    """Epoch time vs the tutorial's loop, the SynOps counter's overhead, bfloat16 vs float32, and
    the time from `synops sweep` to the study's first point."""
    from pipeline.bench import run_bench, to_json

    config = _resolve_config(config_path, assignments, {})
    study = _resolve_config(study_path, assignments, {}) if study_path else None
    result = run_bench(config, rounds=rounds, study_config=study)
    if as_json:
        click.echo(to_json(result))
        return
    click.echo(
        f"epoch: tutorial loop {result.tutorial_epoch_seconds:.1f} s, ours "
        f"{result.our_epoch_seconds:.1f} s in {result.default_precision} (the default here) -> "
        f"speedup {result.speedup_vs_tutorial_loop:.2f}x (per training sample, median of "
        f"{result.rounds}; rounds {_span(result.speedup_range)}); ours in float32 "
        f"{result.our_float32_epoch_seconds:.1f} s -> {result.float32_speedup_vs_tutorial_loop:.2f}x "
        f"(rounds {_span(result.float32_speedup_range)})\n"
        f"step (batch {result.batch_size}): {result.step_ms_with_counter:.1f} ms with the SynOps "
        f"counter, {result.step_ms_without_counter:.1f} ms without -> overhead "
        f"{result.synops_overhead:.3f} (comparisons {_span(result.synops_overhead_range, 3)})\n"
        f"bfloat16 autocast: step {result.bfloat16_step_speedup:.2f}x faster "
        f"(rounds {_span(result.bfloat16_step_speedup_range)}); an epoch trained in bfloat16 vs "
        f"float32: test accuracy {result.bfloat16_training_accuracy_change:+.2f} points (one "
        f"accuracy's standard error {result.accuracy_standard_error:.2f}); evaluated in bfloat16, "
        f"{result.bfloat16_equal_synops:.1%} of test samples would keep their SynOps count (mean "
        f"SynOps {result.bfloat16_synops_change:+.2%}, accuracy "
        f"{result.bfloat16_accuracy_change:+.2f} points), so evaluation stays float32\n"
        + (f"first point of {study_path}: {result.first_point_seconds:.0f} s after `synops sweep` "
           "started\n" if result.first_point_seconds is not None else "")
        + f"torch {result.torch_version}, {result.machine}"
    )


def _span(low_high: tuple[float, float], digits: int = 2) -> str:
    """A measured range, as "low..high"."""
    low, high = low_high
    return f"{low:.{digits}f}..{high:.{digits}f}"


@main.command("bench-workers")
@click.option("--trials", type=click.IntRange(min=1), default=12, show_default=True,
              help="Trials per study (one study per cell).")
@click.option("--workers", "worker_counts", type=click.IntRange(min=1), multiple=True,
              default=(1, 2, 3), show_default=True, help="Worker counts to measure (repeatable).")
@click.option("--data-root", type=click.Path(file_okay=False), default="data", show_default=True,
              help="Where MNIST is (`make data`).")
@set_option
@_fail_cleanly
def bench_workers(trials: int, worker_counts: tuple[int, ...], data_root: str,
                  assignments: tuple[str, ...]) -> None:
    """Trials per minute with N workers on SQLite vs PostgreSQL + an MLflow server (smoke.toml)."""
    from pathlib import Path

    from pipeline.bench_workers import markdown_table, run_bench_workers

    results = run_bench_workers(trials, list(worker_counts), list(assignments), Path(data_root),
                                echo=click.echo)
    click.echo(markdown_table(results))


@main.command()
@config_option
@set_option
@tracking_option
@storage_option
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes on this machine (torch threads are split between them).")
@quiet_option
@_fail_cleanly
def sweep(config_path: str, assignments: tuple[str, ...], tracking_uri: str | None,
          storage: str | None, workers: int, quiet: bool) -> None:
    """Run the config's Optuna study up to study.n_trials finished trials (resumes if re-run)."""
    from pipeline.sweep.storage import resolve_storage
    from pipeline.sweep.workers import run_sweep
    from pipeline.tracking import resolve_tracking_uri

    config = _resolve_config(config_path, assignments, {})
    uri, storage_url = resolve_tracking_uri(tracking_uri), resolve_storage(storage)
    with stop_on_signals():
        progress, echo = _output(quiet)
        study = run_sweep(config, storage_url, uri, workers=workers, progress=progress, echo=echo)
    front = len(study.best_trials)
    click.echo(f"{config.name}: {front} trials on the front; study in {redact_url(storage_url)}, runs "
               f"in {redact_url(uri)}. Next: synops report --config {config_path}")



@main.group()
def services() -> None:
    """PostgreSQL and an MLflow server for a study shared by several machines."""


services_dir_option = click.option(
    "--dir", "folder", type=click.Path(file_okay=False), default=".services", show_default=True,
    help="Folder of the database cluster, artifacts, logs and services.json.")


@services.command("start")
@services_dir_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface both servers listen on: loopback, or a private network's address.")
@click.option("--postgres-port", type=click.IntRange(min=0, max=65535), default=0,
              help="[default: a free port]")
@click.option("--mlflow-port", type=click.IntRange(min=0, max=65535), default=0,
              help="[default: a free port]")
@_fail_cleanly
def services_start(folder: str, host: str, postgres_port: int, mlflow_port: int) -> None:
    """Start both servers (installing Debian's postgresql as root when missing); print the URLs
    (without the password: workers read it from the password file the `export` line names)."""
    from pathlib import Path

    from pipeline.services import start_services

    started = start_services(Path(folder), host, postgres_port, mlflow_port, echo=click.echo)
    click.echo(f"PostgreSQL and the MLflow server run (state in {folder}/services.json). On every "
               f"worker machine, with a copy of the password file {started.pgpass_file} (mode 600, "
               "the same path or another):\n"
               f"  export PGPASSFILE={started.pgpass_file}\n"
               f"  synops sweep --config <config> --storage '{started.worker_storage_url}' "
               f"--tracking-uri {started.tracking_uri}\n"
               f"MLflow UI: {started.tracking_uri}; stop with `synops services stop --dir {folder}`")


@services.command("stop")
@services_dir_option
@_fail_cleanly
def services_stop(folder: str) -> None:
    """Stop both servers; their data stays in the folder. A process named by a stale record is
    left alone, with a line saying so."""
    from pathlib import Path

    from pipeline.services import stop_services

    stopped = stop_services(Path(folder), echo=click.echo)
    click.echo("services stopped" if stopped else f"no services were running in {folder}")


def _open_study(config: ExperimentConfig, storage: str | None, tracking_uri: str | None):
    """The config's study (read-only use) and a tracker on its MLflow store."""
    from pipeline.sweep.storage import load_study, resolve_storage
    from pipeline.tracking import Tracker, resolve_tracking_uri

    return load_study(config.name, resolve_storage(storage)), Tracker(resolve_tracking_uri(tracking_uri))


@main.command()
@study_options
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder [default: reports/<study name>].")
@_fail_cleanly
def report(config_path: str, assignments: tuple[str, ...], tracking_uri: str | None,
           storage: str | None, out: str | None) -> None:
    """Pareto-front report of the config's study: figures, front.csv, report.md, index.html.
    Everything but `report.budgets` is read from the study's own record, whatever the config says."""
    from pathlib import Path

    from pipeline.report import write_report

    config = _resolve_config(config_path, assignments, {})
    study, tracker = _open_study(config, storage, tracking_uri)
    folder = write_report(study, Path(out or Path("reports") / config.name), tracker,
                          config.report.budgets)
    click.echo(f"report written to {folder}/ (open index.html) and logged to the study's "
               "MLflow run")


@main.command()
@study_options
@trial_option("Trial number to export.")
@click.option("--knee", is_flag=True, help="Export the front's knee point.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder [default: exports/<study>-trial-<N>].")
@click.option("--format", "formats", type=click.Choice(["state-dict", "nir"]), multiple=True,
              default=("state-dict",), show_default=True,
              help="nir adds model.nir, the spiking network (settings from [snn]) for chip toolchains.")
@_fail_cleanly
def export(config_path: str, assignments: tuple[str, ...], tracking_uri: str | None,
           storage: str | None, trial_number: int | None, knee: bool, out: str | None,
           formats: tuple[str, ...]) -> None:
    """Write one trial's checkpoint, config and a JSON card (accuracy, SynOps, energy), and with
    --format nir its spiking network as NIR."""
    from pathlib import Path

    from pipeline.export import export_trial

    if knee == (trial_number is not None):
        raise click.UsageError("give exactly one of --trial N or --knee")
    config = _resolve_config(config_path, assignments, {})
    study, tracker = _open_study(config, storage, tracking_uri)
    folder = Path(out or Path("exports") / f"{config.name}-{'knee' if knee else trial_number}")
    card = export_trial(study, folder, tracker, trial_number,
                        nir_settings=config.snn if "nir" in formats else None)
    written = "model.pt, config.toml, card.json" + (", model.nir" if "nir" in formats else "")
    click.echo(f"exported to {card.parent}/: {written}")


@main.command()
@study_options
@member_options
@quiet_option
@_fail_cleanly
def snn(config_path: str, assignments: tuple[str, ...], tracking_uri: str | None,
        storage: str | None, trial_number: int | None, knee: bool, whole_front: bool,
        max_samples: int | None, quiet: bool) -> None:
    """Simulate study members as spiking networks (settings in [snn]) and log what the ANN's
    SynOps estimate and predictions become; the report shows it."""
    from pipeline.members import chosen_members
    from pipeline.snn_check import check_members, describe

    if sum([trial_number is not None, knee, whole_front]) != 1:
        raise click.UsageError("give exactly one of --trial N, --knee or --front")
    if max_samples is not None:
        assignments += (f"snn.max_samples={max_samples}",)
    config = _resolve_config(config_path, assignments, {})
    study, tracker = _open_study(config, storage, tracking_uri)
    members = chosen_members(study, trial_number, knee)
    subset = (f"the first {config.snn.max_samples} test images" if config.snn.max_samples
              else "the whole test set")
    click.echo(f"simulating {len(members)} member(s) on {subset} (set --max-samples 0 for all)")
    progress, _ = _output(quiet)
    results = check_members(study, members, config.snn, config.data.root,
                            config.data.verify_checksums, tracker, progress=progress)
    for member, result in zip(members, results, strict=True):
        click.echo(describe(member, result))


@main.command()
@click.argument("run_id", required=False)
@click.option("--chip", type=click.Choice(CHIP_NAMES), default=CHIP_NAMES[0], show_default=True,
              help="The chip profile to check against.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="A study's experiment TOML, to check its members (with --trial, --knee or --front).")
@set_option
@tracking_option
@storage_option
@member_options
@click.option("--data-root", default=None,
              help="With a RUN_ID: where its data lives, if not where it was trained.")
@_fail_cleanly
def deploy(run_id: str | None, chip: str, config_path: str | None, assignments: tuple[str, ...],
           tracking_uri: str | None, storage: str | None, trial_number: int | None, knee: bool,
           whole_front: bool, max_samples: int | None, data_root: str | None) -> None:
    """Will it run on the chip? Per layer, the core it takes and its memory use, or why it cannot;
    then the network on the chip's 8-bit weights and integer thresholds, evaluated on the test set
    (as an ANN and as an integrate-and-fire network, `[snn]` settings) beside the float numbers,
    logged to its run. Give --config with --trial N, --knee or --front (a study's members), or a
    RUN_ID (any tracked run; add --config when its network or data come from a `.py` next to that
    config, which makes the file importable and gives the `[snn]` settings)."""
    from pipeline.config import SNNConfig
    from pipeline.deploy_check import deploy_members, deploy_run
    from pipeline.front import StudyRecord
    from pipeline.members import chosen_members, members_test_data
    from pipeline.sweep.storage import load_study, resolve_storage
    from pipeline.tracking import Tracker, resolve_tracking_uri

    chosen = sum([trial_number is not None, knee, whole_front])
    if run_id is not None and (chosen or storage):
        raise click.UsageError("a RUN_ID names the network: --trial, --knee, --front and --storage are "
                               "for a study's members")
    if run_id is None and (config_path is None or chosen != 1 or data_root):
        raise click.UsageError("give a RUN_ID, or --config with exactly one of --trial N, --knee or "
                               "--front (its data root is data.root: --set data.root=...)")
    if max_samples is not None:
        assignments += (f"snn.max_samples={max_samples}",)
    config = _resolve_config(config_path, assignments, {}) if config_path else None
    tracker = Tracker(resolve_tracking_uri(tracking_uri))
    if run_id is not None:
        spiking = config.snn if config else SNNConfig(**(
            {"max_samples": max_samples} if max_samples is not None else {}))
        for line in deploy_run(run_id, tracker, chip, spiking, data_root).lines():
            click.echo(line)
        return
    study = load_study(config.name, resolve_storage(storage))
    members = chosen_members(study, trial_number, knee)
    tests = members_test_data(StudyRecord.load(study), members, config.data.root,
                              config.data.verify_checksums)
    for member, deployment in zip(members, deploy_members(study, members, chip, tests, tracker, config.snn),
                                  strict=True):
        click.echo(f"trial {member.number} ({member.variant.label}; float: test {member.test.accuracy:.2%} "
                   f"at {member.test.synops_mean:.4g} SynOps):")
        for line in deployment.lines():
            click.echo(f"  {line}")
