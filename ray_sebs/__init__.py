"""ray-sebs: Stagewise Enlargement of Batch Size on Ray Train, with workers that grow by stage."""

from ray_sebs.errors import ConfigError
from ray_sebs.plan import (
    BatchDecomposition,
    ClusterConfig,
    ElasticPlan,
    Segment,
    StagePlan,
    build_plan,
    decompose,
)
from ray_sebs.schedule import Schedule, ScheduleConfig, Stage, build_schedule

# The Ray-facing names import ray and torch; load them on first use so that planning (and
# `import ray_sebs.schedule`) stays free of both.
_LAZY = {
    "SEBSTrainer": "ray_sebs.trainer",
    "SEBSResult": "ray_sebs.trainer",
    "OptimizerConfig": "ray_sebs.optim",
    "Objective": "ray_sebs.objective",
    "Summed": "ray_sebs.objective",
    "DatasetConfig": "ray_sebs.data",
    "load_data": "ray_sebs.data",
    "build_model": "ray_sebs.models",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ray_sebs' has no attribute {name!r}")


__all__ = [
    "BatchDecomposition",
    "ClusterConfig",
    "ConfigError",
    "DatasetConfig",
    "ElasticPlan",
    "Objective",
    "OptimizerConfig",
    "SEBSResult",
    "SEBSTrainer",
    "Schedule",
    "ScheduleConfig",
    "Segment",
    "Stage",
    "StagePlan",
    "Summed",
    "build_model",
    "build_plan",
    "build_schedule",
    "decompose",
    "load_data",
]
