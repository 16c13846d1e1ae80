"""The deployment stage: once the study has `n_trials` finished trials (and its confirmations),
each front member is checked for the study's chip (`[study.constraints] chip`): its fit, and its
test accuracy and SynOps on the chip's integers, logged to its run and kept in the study for the
report. Done once, under a lease, whichever worker gets there first; members already checked are
skipped."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import ExperimentConfig
from pipeline.deploy_check import deploy_members
from pipeline.evaluate import Deployment
from pipeline.front import TrialRecord, choose, deployments, finished_trials
from pipeline.inputs import StudyInputs
from pipeline.sweep.lease import lease, lease_name
from pipeline.sweep.storage import PreparedStudy
from pipeline.tracking import Tracker


def deployment_line(member: TrialRecord, deployment: Deployment) -> str:
    return (f"deploy trial {member.number:3d} | {deployment.summary} | 8-bit test "
            f"{deployment.quantized.accuracy:.2%} {deployment.quantized.synops_mean:.3g} "
            f"(float {member.test.accuracy:.2%} {member.test.synops_mean:.3g})")


def deploy_front(config: ExperimentConfig, prepared: PreparedStudy, inputs: StudyInputs,
                 tracker: Tracker, should_stop: Callable[[], bool], echo: Callable[[str], None]) -> int:
    """Check the front members not yet checked for the study's chip; returns how many."""
    study = prepared.study
    with lease(prepared.storage, lease_name(config.name, "deploy"), config.study.wait_timeout, echo,
               should_stop) as held:
        done = deployments(study)
        records = {r.number: r for r in finished_trials(study)}
        if not records:  # every trial was infeasible: there is no front to check
            echo(f"no trial of the study fits {config.study.constraints.chip}: no front to check")
            return 0
        members = [records[int(n)] for n in choose(study).members["trial"] if int(n) not in done]
        tests = {m.number: inputs.dataset(m.variant).test.to("cpu") for m in members}
        deploy_members(study, members, config.study.constraints.chip, tests, tracker,
                       on_member=lambda member, deployment: echo(deployment_line(member, deployment)),
                       before_record=held.verify)
    return len(members)
