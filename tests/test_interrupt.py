"""Graceful stops: a Ctrl-C or SIGTERM is never lost, stops training at the next step, and a
repeated one interrupts at once except where the end of a run is being recorded."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from pipeline.config import TrainConfig, load_config
from pipeline.data import load_dataset
from pipeline.interrupt import raise_if_stop_requested, shielded, stop_on_signals, stop_requested
from pipeline.model import build_model
from pipeline.train import train
from tests.conftest import EXPERIMENTS, smoke_overrides


class SignalledWhileCollected:
    """Receives SIGTERM in its finaliser, where a raising handler's KeyboardInterrupt is printed
    and dropped by Python: how CI once lost a stop inside a SQLAlchemy weakref callback."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGTERM)


def test_a_stop_signal_is_never_lost_and_stops_training_at_the_next_step(
    idx_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(EXPERIMENTS / "smoke.toml", smoke_overrides(idx_root))
    data = load_dataset(config.data)
    dropped: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", dropped.append)
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals():
        SignalledWhileCollected()  # collected at once
        with pytest.raises(KeyboardInterrupt, match="stop requested at epoch 1, step 1"):
            train(build_model(config.model, (1, 28, 28), 10), data, TrainConfig(epochs=1), progress=False,
                  should_stop=stop_requested)
    assert dropped == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_stop_signal_interrupts_at_once_but_not_while_shielded() -> None:
    with stop_on_signals():
        signal.raise_signal(signal.SIGINT)
        with shielded():
            signal.raise_signal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt, match="SIGINT"):
            signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt, match="SIGINT"):
            raise_if_stop_requested()  # the first signal is the one reported


def test_a_worker_waits_for_its_next_step_however_many_signals_arrive() -> None:
    with stop_on_signals(repeat_interrupts=False):
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGTERM):
            signal.raise_signal(signum)
        with pytest.raises(KeyboardInterrupt, match="SIGINT"):
            raise_if_stop_requested()
    raise_if_stop_requested()  # outside, nothing is pending
