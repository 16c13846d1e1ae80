"""The spiking check of a study's members: simulate each chosen member as a spiking network on the
test set, log the result to its MLflow run, and keep it in the study for the report. A member that
cannot be simulated gets its reason recorded instead (which layer, why)."""

from __future__ import annotations

import optuna

from pipeline.config import SNNConfig
from pipeline.evaluate import SpikingEvaluation, SpikingFailure
from pipeline.front import StudyRecord, TrialRecord, snn_attr
from pipeline.members import member_network, members_test_data
from pipeline.snn import check_spiking, require_enough_steps
from pipeline.tracking import Tracker


def check_members(study: optuna.Study, members: list[TrialRecord], settings: SNNConfig, root: str,
                  verify_checksums: bool, tracker: Tracker, progress: bool = True
                  ) -> list[SpikingEvaluation | SpikingFailure]:
    """Simulate `members` with `settings` on the study's test set (read from `root`) in each
    member's own variant, log each result to the member's run (metrics `snn_*`, settings as
    `snn.*` tags; a failure as the tag `snn.failure`) and store it in the study
    (`snn_check.<trial>`), replacing an earlier check of the same member."""
    record = StudyRecord.load(study)
    tests = members_test_data(record, members, root, verify_checksums)
    require_enough_steps(settings, {n: int(test.images.max()) for n, test in tests.items()})
    results: list[SpikingEvaluation | SpikingFailure] = []
    for member in members:
        model = member_network(record.config, member)
        model.load_state_dict(tracker.load_checkpoint(member.run_id))
        result = check_spiking(model, tests[member.number], settings, f"trial {member.number}", progress)
        run = tracker.run(member.run_id)
        if isinstance(result, SpikingFailure):
            run.set_tags({"snn.failure": result.reason[:5000]})
        else:
            run.log_metrics(result.metrics())
            run.set_tags({f"snn.{k}": v for k, v in result.settings.items()})
        study.set_user_attr(snn_attr(member.number), result.to_record())
        results.append(result)
    return results


def describe(member: TrialRecord, result: SpikingEvaluation | SpikingFailure) -> str:
    """One line for people: accuracy, agreement and the SynOps measured against the estimate,
    or why the member could not be simulated."""
    if isinstance(result, SpikingFailure):
        return f"trial {member.number}: not simulated as a spiking network: {result.reason}"
    layers = ", ".join(f"{name} {v / result.ann_synops_per_layer[name]:.4f}"
                       for name, v in result.synops_per_layer.items())
    settings = result.settings
    return (f"trial {member.number}: SNN {result.accuracy:.2%} (ANN {result.ann_accuracy:.2%}, "
            f"{result.agreement:.1%} same predictions) at {result.synops_mean:.4g} SynOps = "
            f"{result.synops_ratio:.4f} x the ANN estimate (per layer: {layers}); "
            f"{result.samples} test images, {settings['encoding']} encoding, {settings['steps']} "
            f"steps, {settings['spike_fn']}-spike")
