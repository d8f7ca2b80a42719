"""Checks before a run starts: what ``ray-sebs train`` and ``ray-sebs tune`` verify, in order,
so that bad input fails in seconds with one line instead of after workers start.

The sequence is two calls: :func:`check_before_ray` (the model name, the run flags, the dataset
config and its paths, the storage path: nothing needs a cluster), then :func:`connect_and_load`
(join or start Ray, check the storage is shared, load the data, check it fills the first batch and
fits the model). A command does its own checks around them.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from typing import TYPE_CHECKING

from ray_sebs.autoscale import LEAD_TIME_FIX
from ray_sebs.errors import ConfigError, require_seconds
from ray_sebs.flags import dataset_config_from_args

if TYPE_CHECKING:
    from ray_sebs.data import DatasetConfig, PreparedData


def check_before_ray(args: argparse.Namespace) -> DatasetConfig:
    """Every check that needs no cluster; returns the dataset config the flags describe. A
    built-in dataset's shape is known without reading it, so the model is checked against it
    here; a user's files are checked for existence, size and permissions (not yet contents)."""
    from ray_sebs.models import check_model, check_model_name

    check_model_name(args.model)
    check_run_flags(args)
    dataset_config = dataset_config_from_args(args)
    if dataset_config.input_shape is not None:
        check_model(args.model, dataset_config.input_shape)
    check_data_paths(dataset_config)
    check_storage_path(args.storage_path)
    return dataset_config


def connect_and_load(args: argparse.Namespace, dataset_config: DatasetConfig, first_batch: int, *,
                     batch_field: str | None = None) -> PreparedData:
    """Connect to Ray, then load and check the data: it must fill ``first_batch`` (the largest
    first-stage global batch of the run) and fit the model. ``batch_field`` names the batch in
    the error when the data is too small (``None``: the error names the data)."""
    import ray

    from ray_sebs.data import check_min_rows, load_data
    from ray_sebs.models import check_model

    connect_ray(args)
    check_storage_shared(args.storage_path, sum(1 for node in ray.nodes() if node["Alive"]))
    data = load_data(dataset_config)
    try:
        check_min_rows(data, first_batch)
    except ConfigError as error:
        if batch_field is None:
            raise
        raise ConfigError(batch_field, first_batch,
                          f"is more than the {data.train_rows} training rows of the data, so no "
                          "epoch would make an update", error.fix) from None
    if dataset_config.input_shape is None:  # a user's files: the shape is known now
        check_model(args.model, data.input_shape)
    return data


ADDRESS_PROBE_TIMEOUT_S = 5.0
"""How long ``--address`` may take to accept a TCP connection. ``ray.init`` itself keeps retrying
an address where nothing listens for minutes."""


def probe_address(address: str, timeout_s: float = ADDRESS_PROBE_TIMEOUT_S) -> None:
    """Fail fast when nothing listens at a ``host:port`` or ``ray://host:port`` address.

    ``auto``, ``local`` and other forms are left to ``ray.init``, which judges them quickly.
    """
    host, separator, port = address.removeprefix("ray://").rpartition(":")
    if not separator or not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as error:
        raise ConfigError("address", address,
                          f"no Ray cluster answers there ({error.strerror or error or 'timed out'})",
                          "start one with `ray start --head`, or pass its address (HOST:6379, or "
                          "ray://HOST:10001 for Ray Client)") from None


def connect_ray(args: argparse.Namespace) -> None:
    """Join ``--address`` (or the job's cluster), else start a local Ray in this process."""
    import ray

    if ray.is_initialized():
        return
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        probe_address(address)
    try:
        start_or_join_ray(address, num_cpus=args.num_cpus, verbose=getattr(args, "verbose", False))
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise ConfigError("address", address, f"no Ray cluster could be reached ({error})",
                          "start one with `ray start --head` or pass the right --address") from None


def start_or_join_ray(address: str | None, *, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Join the Ray cluster at ``address``, else start a local Ray in this process; Ray's own INFO
    output goes to its log files unless ``verbose`` (:mod:`ray_sebs.console`). A script's way to
    start Ray as ``ray-sebs train`` does (the examples use it)."""
    import ray

    from ray_sebs.console import quiet_ray_driver, ray_init_options

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, **ray_init_options(verbose))
    else:
        # "local": a new Ray in this process even when `ray start` left a cluster on this
        # machine, which ray.init() would otherwise join (and refuse num_cpus for).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **ray_init_options(verbose))
    quiet_ray_driver(verbose)


def check_storage_path(storage_path: str) -> None:
    """A local storage path must be writable before any resources are requested."""
    if "://" in storage_path:
        return
    path = os.path.abspath(os.path.expanduser(storage_path))
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ConfigError("storage_path", storage_path, f"is not writable ({error.strerror})",
                          "pass a writable directory or a shared URI (s3://, gs://)") from None


def check_storage_shared(storage_path: str, alive_nodes: int) -> None:
    """On a multi-node cluster, workers on other nodes cannot see a local checkpoint directory."""
    if alive_nodes > 1 and "://" not in storage_path:
        raise ConfigError("storage_path", storage_path,
                          f"is a local path but the cluster has {alive_nodes} nodes",
                          "use storage every node reaches: s3://..., gs://..., or file:///path for "
                          "an NFS mount shared by all nodes")


def check_run_flags(args: argparse.Namespace) -> None:
    """Run flags that would otherwise fail late (``--num-cpus 0`` starts a Ray that never runs a
    task) or silently mean something else (Ray reads a negative ``--max-failures`` as no limit)."""
    if args.max_failures < -1:
        raise ConfigError("max_failures", args.max_failures, "must be >= 0, or -1 for no limit",
                          "use e.g. 1 to recover from one worker-group failure")
    if args.num_cpus is not None and args.num_cpus < 1:
        raise ConfigError("num_cpus", args.num_cpus, "must be >= 1",
                          "give the local Ray at least 1 CPU, or leave it unset for all")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise ConfigError("checkpoint_every_epochs", args.checkpoint_every, "must be >= 1",
                          "use e.g. 1 to checkpoint every epoch, or leave it unset")
    require_seconds("checkpoint_every_s", args.checkpoint_every_s,
                    fix="use e.g. 60, or 0 to checkpoint every epoch")
    require_seconds("prefetch_lead_time_s", args.prefetch_lead_time, fix=LEAD_TIME_FIX)


def check_data_paths(dataset_config: DatasetConfig) -> None:
    """Missing, empty or unreadable ``--data``/``--validation-data`` fail before Ray starts (the
    columns and values are checked after, by :func:`ray_sebs.data.load_data`)."""
    from ray_sebs.data_files import resolve_source

    if dataset_config.path is not None:
        resolve_source(dataset_config.path, "data_path", "data")
    if dataset_config.validation_path is not None:
        resolve_source(dataset_config.validation_path, "validation_path", "validation data")
