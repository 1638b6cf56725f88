"""store.runs.fit_workers: the one place train, tune and pformer run their Ray Train workers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from store.errors import FacetclipError, InputError
from store.runs import METRICS_FILE, NAN_FILE, fit_workers


@dataclass
class Options:  # the fields every trainer's run options have
    workers: int = 2
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0
    max_failures: int = 0


class Failed(FacetclipError):
    pass


def _raise_input_error(config: dict) -> None:
    raise InputError(f"column {config['column']!r} is missing")


def _rank0_logs_then_records_nan(config: dict) -> None:
    from ray import train

    if train.get_context().get_world_rank() == 0:
        run = Path(config["run"])
        (run / METRICS_FILE).write_text(json.dumps({"step": 7, "loss": 1.5}) + "\n")
        (run / NAN_FILE).write_text(json.dumps({"step": 8, "loss": "nan"}))


def _ok(config: dict) -> None:
    pass


def _writes_a_relative_path(config: dict) -> None:
    Path(config["file"]).write_text("written")


def test_an_error_in_a_worker_becomes_one_line_of_the_callers_error(tmp_path, ray_session):
    with pytest.raises(Failed) as info:
        fit_workers(_raise_input_error, {"column": "long_caption"}, tmp_path, Options(), 3,
                    progress=False, failed=lambda cause: Failed(f"run failed: {cause}"))  # fmt: skip
    # The worker's own message, not Ray's pages of traceback, inside the caller's words.
    assert str(info.value) == "run failed: column 'long_caption' is missing"


def test_a_workers_nan_record_is_returned_and_none_when_there_is_none(tmp_path, ray_session):
    nan = fit_workers(_rank0_logs_then_records_nan, {"run": str(tmp_path)}, tmp_path, Options(),
                      9, progress=True, failed=Failed)  # fmt: skip
    assert nan == {"step": 8, "loss": "nan"}
    (tmp_path / NAN_FILE).unlink()  # a run that ends without one (the bar off this time)
    assert (
        fit_workers(_ok, {}, tmp_path, Options(workers=1), 9, progress=False, failed=Failed) is None
    )


def test_a_relative_path_in_a_worker_means_what_it_means_to_the_driver(
    tmp_path, ray_session, monkeypatch
):
    # Ray Train starts workers in a folder of its own; `--out demo-out` must still name
    # ./demo-out, or a relative model folder reads as a hub id (the demo's tune failed so).
    monkeypatch.chdir(tmp_path)
    fit_workers(_writes_a_relative_path, {"file": "out.txt"}, tmp_path / "run", Options(workers=1),
                1, progress=False, failed=Failed)  # fmt: skip
    assert (tmp_path / "out.txt").read_text() == "written"
