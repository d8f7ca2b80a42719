"""Every output of a run goes through the run's storage (``file://`` here, ``s3://`` against a
local S3 server): nothing lands in the working directory, and the printed paths are the URIs."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
from processes import run_in_session

from ray_sebs.cli import main

RAY_SEBS = Path(sys.executable).with_name("ray-sebs")
OUTPUTS = ("history.json", "history.csv", "curves.png", "sebs_run.json")
SMALL_RUN = ["--dataset", "synthetic", "--synthetic-rows", "80", "--batch-size", "8", "--ratio", "1",
             "--stages", "1", "--epochs-per-stage", "1", "--max-workers", "1"]


@pytest.mark.timeout(300)
def test_a_file_uri_run_writes_every_output_under_the_storage_path_and_nothing_in_the_cwd(
        tmp_path, ray_cluster, monkeypatch, capsys):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    storage = tmp_path / "storage"
    assert main(["train", *SMALL_RUN, "--storage-path", f"file://{storage}", "--name", "uri"]) == 0
    assert sorted(os.listdir(work)) == [], "nothing (no 'file:' folder) in the working directory"
    run_dir = storage / "uri"
    for name in OUTPUTS:
        assert (run_dir / name).stat().st_size > 0, name
    assert len(json.loads((run_dir / "history.json").read_text())) == 1
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert not (run_dir / ".lock").exists(), "the lock is released when the run ends"
    output = capsys.readouterr().out
    assert (f"run directory: file://{run_dir} (history.json, history.csv, curves.png, tensorboard)"
            in output), output[-2000:]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.timeout(300)
def test_an_s3_run_writes_every_output_to_the_bucket(tmp_path):
    """Against moto's S3 server on 127.0.0.1. The CLI runs as its own process with its own
    local Ray, so that Ray's workers get the endpoint and the credentials from its environment
    (pyarrow reads ``AWS_ENDPOINT_URL``)."""
    moto_server = pytest.importorskip("moto.server")
    import pyarrow.fs

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                   "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        bucket = pyarrow.fs.S3FileSystem(access_key="testing", secret_key="testing",
                                         region="us-east-1", scheme="http",
                                         endpoint_override=f"127.0.0.1:{port}", allow_bucket_creation=True)
        bucket.create_dir("sebs")
        work = tmp_path / "cwd"
        work.mkdir()
        env = os.environ | credentials | {"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
        command = [str(RAY_SEBS), "train", *SMALL_RUN, "--storage-path", "s3://sebs/runs",
                   "--name", "bucket", "--num-cpus", "2"]
        driver = run_in_session(command, env=env, cwd=work, timeout=240)
        assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]
        assert "run directory: s3://sebs/runs/bucket (history.json, history.csv, curves.png, " \
               "tensorboard)" in driver.stdout, driver.stdout[-2000:]
        listed = {info.path.removeprefix("sebs/runs/bucket/"): info for info in bucket.get_file_info(
            pyarrow.fs.FileSelector("sebs/runs/bucket", recursive=True))}
        for name in OUTPUTS:
            assert listed[name].size > 0, (name, sorted(listed))
        assert any(path.startswith("tensorboard/events.out.tfevents.") for path in listed), sorted(listed)
        assert ".lock" not in listed
        assert sorted(os.listdir(work)) == []
    finally:
        server.stop()
