"""The deployment check of trained networks: a study's members (after a sweep with a chip
constraint, and by `synops deploy`) or any tracked run, each checked for a chip (`pipeline.deploy`),
logged to its MLflow run and, for a study's members, kept in the study for the report."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable

import optuna

from pipeline.config import SNNConfig, config_from_dict
from pipeline.data import Split, load_dataset
from pipeline.deploy import deploy
from pipeline.evaluate import Deployment
from pipeline.front import DEPLOY_ATTR_PREFIX, StudyRecord, TrialRecord
from pipeline.members import member_network
from pipeline.model import build_model
from pipeline.tracking import Tracker

DEPLOY_ARTIFACT = "deploy/{chip}.json"


def log_deployment(tracker: Tracker, run_id: str, deployment: Deployment) -> None:
    """The check's metrics (`<chip>_...`), its fit as the tag `synops.<chip>`, and the whole record
    as `deploy/<chip>.json` on the network's run."""
    run = tracker.run(run_id)
    run.log_metrics(deployment.metrics())
    run.set_tags({f"synops.{deployment.chip}": deployment.summary[:5000]})
    run.log_json(deployment.to_record(), DEPLOY_ARTIFACT.format(chip=deployment.chip))


def deploy_members(study: optuna.Study, members: list[TrialRecord], chip: str, tests: dict[int, Split],
                   tracker: Tracker, spiking: SNNConfig | None = None,
                   on_member: Callable[[TrialRecord, Deployment], None] | None = None,
                   before_record: Callable[[], None] = lambda: None) -> list[Deployment]:
    """Check `members` for `chip` on their test data (`tests`, by trial number; see
    `members_test_data`), with `spiking` settings also as spiking networks; log each to its run
    and keep it in the study (`deploy.<trial>`), replacing an earlier check. `before_record` runs
    right before each is kept (a lease's `verify`); `on_member` gets each result."""
    record = StudyRecord.load(study)
    results = []
    for member in members:
        model = member_network(record.config, member)
        model.load_state_dict(tracker.load_checkpoint(member.run_id))
        deployment = deploy(model, member.input_shape, tests[member.number], chip, spiking)
        log_deployment(tracker, member.run_id, deployment)
        before_record()
        study.set_user_attr(f"{DEPLOY_ATTR_PREFIX}{member.number}", deployment.to_record())
        if on_member is not None:
            on_member(member, deployment)
        results.append(deployment)
    return results


def deploy_run(run_id: str, tracker: Tracker, chip: str, spiking: SNNConfig | None,
               data_root: str | None = None) -> Deployment:
    """Check the network of any tracked run (a `synops train` run or a trial) for `chip`, on the
    test data its logged `config.toml` describes (its data root replaced by `data_root`), and log
    the result to that run."""
    stored = config_from_dict(tomllib.loads(tracker.load_text(run_id, "config.toml")))
    data_config = stored.data if data_root is None else dataclasses.replace(stored.data, root=data_root)
    dataset = load_dataset(data_config)
    model = build_model(stored.model, dataset.input_shape, dataset.num_classes)
    model.load_state_dict(tracker.load_checkpoint(run_id))
    deployment = deploy(model, dataset.input_shape, dataset.test, chip, spiking)
    log_deployment(tracker, run_id, deployment)
    return deployment

