"""A study's members as the checks after a sweep use them (`synops export`, `snn`, `deploy`, the
report): which finished trials were asked for, each one's network rebuilt from the study's record,
and each one's test data in its own variant."""

from __future__ import annotations

import dataclasses

import optuna
from torch import nn

from pipeline.config import ExperimentConfig
from pipeline.data import Split, load_pixels
from pipeline.front import NoSuchTrialError, StudyRecord, TrialRecord, choose, finished_trials
from pipeline.model import build_model


def chosen_member(study: optuna.Study, trial: int | None) -> tuple[TrialRecord, str]:
    """The finished trial `trial`, or the front's knee when it is None, and why it was chosen.
    Raises `NoSuchTrialError` when there is no such finished trial."""
    records = {r.number: r for r in finished_trials(study)}
    if not records:
        raise NoSuchTrialError(f"study '{study.study_name}' has no finished trial yet")
    if trial is None:
        choice = choose(study)
        return (records[int(choice.knee_member["trial"])],
                f"the front's knee ({choice.knee.rule} rule, on the validation seed means)")
    if trial not in records:
        raise NoSuchTrialError(f"trial {trial} is not a finished trial "
                               f"(finished: {', '.join(map(str, sorted(records)))})")
    return records[trial], "asked for by number"


def chosen_members(study: optuna.Study, trial: int | None, knee: bool) -> list[TrialRecord]:
    """The finished trial `trial`, the knee (`knee`), or else every front member."""
    if trial is not None or knee:
        return [chosen_member(study, trial)[0]]
    records = {r.number: r for r in finished_trials(study)}
    return [records[int(n)] for n in choose(study).members["trial"]]


def member_network(config: ExperimentConfig, member: TrialRecord) -> nn.Module:
    """A fresh network of the member's variant (of the study's `config`), for its data's shape and
    classes: what its checkpoint loads into."""
    return build_model(member.variant.apply(config).model, member.input_shape, member.num_classes)


def members_test_data(record: StudyRecord, members: list[TrialRecord], root: str,
                      verify_checksums: bool) -> dict[int, Split]:
    """Each member's test split in its own variant (data arguments and encoding), read from
    `root`, by trial number; the data of one set of source arguments is loaded once."""
    loaded = {}
    tests = {}
    for member in members:
        data = member.variant.apply(record.config).data
        data = dataclasses.replace(data, root=root, verify_checksums=verify_checksums)
        key = member.variant.data_key(record.config)
        if key not in loaded:
            loaded[key] = load_pixels(data)
        raw = loaded[key]
        tests[member.number] = (raw if member.spikes_per_pixel is None
                                else raw.encoded(member.spikes_per_pixel)).test
    return tests
