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

__all__ = [
    "BatchDecomposition",
    "ClusterConfig",
    "ConfigError",
    "ElasticPlan",
    "Schedule",
    "ScheduleConfig",
    "Segment",
    "Stage",
    "StagePlan",
    "build_plan",
    "build_schedule",
    "decompose",
]
