"""How a failed run ends on the command line: one line naming the root cause, exit 1, no
traceback, for every error type the CLI catches (caught by type, never by class name).

The commands are replaced by stubs that raise: no cluster is started.
"""

from __future__ import annotations

import pytest
from ray.train import TrainingFailedError, WorkerGroupError

from ray_sebs import cli
from ray_sebs.errors import CheckpointError, InvariantError, NonFiniteLossError


def fail_with(monkeypatch: pytest.MonkeyPatch, command: str, error: BaseException) -> None:
    def raise_it(args: object) -> int:
        raise error

    monkeypatch.setitem(cli.COMMANDS, command, raise_it)


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_a_worker_group_error_is_one_line_with_the_workers_error(monkeypatch, capsys):
    error = WorkerGroupError("msg", {0: ValueError("boom")})
    assert isinstance(error, TrainingFailedError)  # a subclass, not the class name matched before
    fail_with(monkeypatch, "train", error)
    assert cli.main(["train"]) == 1
    line = one_line(capsys)
    assert line.startswith("ray-sebs train: failed: ") and "boom" in line, line


@pytest.mark.parametrize("error", [
    NonFiniteLossError(stage=2, update=7, global_batch_size=32, epoch=3),
    InvariantError("epoch 3 used 30 samples for 1 updates of 32"),
    CheckpointError("the checkpoint does not fit this model"),
    TrainingFailedError("the controller failed"),
], ids=lambda error: type(error).__name__)
def test_ray_sebs_and_ray_train_failures_are_one_line(error, monkeypatch, capsys):
    fail_with(monkeypatch, "tune", error)
    assert cli.main(["tune"]) == 1
    line = one_line(capsys)
    assert line.startswith("ray-sebs tune: failed: ") and str(error).splitlines()[0] in line, line


def test_a_worker_group_error_carrying_a_ray_sebs_error_names_it(monkeypatch, capsys):
    inner = NonFiniteLossError(stage=1, update=3, global_batch_size=8, epoch=0)
    fail_with(monkeypatch, "train", WorkerGroupError("msg", {1: ValueError("other"), 0: inner}))
    assert cli.main(["train"]) == 1
    # The lowest rank's error, whole: a ray-sebs error is the answer itself.
    assert one_line(capsys) == f"ray-sebs train: failed: {inner}"


REMOTE_TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/app/ray_sebs/loop.py", line 120, in train_segment\n'
    "    model = ray.train.torch.prepare_model(model)\n"
    "            ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    "torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:3356, invalid usage\n"
    "ncclInvalidUsage: Duplicate GPU detected : rank 0 and rank 1 both on CUDA device 1000")


@pytest.mark.parametrize("with_cause", [True, False], ids=["with-cause", "cause-lost"])
def test_a_remote_task_error_is_its_exception_line(with_cause, monkeypatch, capsys):
    from ray.exceptions import RayTaskError

    # What a worker that died in prepare_model hands back: Ray titles the traceback
    # "ray::RayTrainWorker...() (pid=.., ip=..)" in colour, and the cause may not survive pickling.
    cause = RuntimeError(REMOTE_TRACEBACK.splitlines()[-2].split(": ", 1)[1]) if with_cause else None
    task_error = RayTaskError("RayTrainWorker.run_train_fn", REMOTE_TRACEBACK, cause,
                              proctitle="ray::RayTrainWorker.run_train_fn()", pid=7, ip="10.0.0.2")
    fail_with(monkeypatch, "train", WorkerGroupError("rank 0 failed", {1: ValueError("other"),
                                                                       0: task_error}))
    assert cli.main(["train"]) == 1
    assert one_line(capsys) == (
        "ray-sebs train: failed: torch.distributed.DistBackendError: NCCL error in: "
        "ProcessGroupNCCL.cpp:3356, invalid usage ncclInvalidUsage: Duplicate GPU detected : rank 0 "
        "and rank 1 both on CUDA device 1000")


def test_other_errors_are_not_swallowed(monkeypatch):
    fail_with(monkeypatch, "train", KeyError("a bug"))
    with pytest.raises(KeyError):
        cli.main(["train"])
