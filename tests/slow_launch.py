"""Ray's fake multi-node provider with a cloud's launch delay, for :mod:`tests.autoscaling_cluster`.

The fake provider "launches" a node by starting a raylet on this machine, up within seconds; a
cloud VM or a KubeRay pod on a new Kubernetes node takes minutes. This provider sleeps
``RAY_SEBS_FAKE_LAUNCH_DELAY_S`` seconds (read from the autoscaler's environment, 0 if unset)
before each launch. The v2 autoscaler launches from a thread pool of its own, so the sleep delays
only the node, not the autoscaler's loop. Imported by the autoscaler process, so it imports only
Ray.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

LAUNCH_DELAY_ENV = "RAY_SEBS_FAKE_LAUNCH_DELAY_S"


class SlowLaunchProvider(FakeMultiNodeProvider):
    """:class:`FakeMultiNodeProvider` whose nodes take ``RAY_SEBS_FAKE_LAUNCH_DELAY_S`` to launch."""

    def create_node_with_resources_and_labels(self, node_config: dict[str, Any], tags: dict[str, str],
                                              count: int, resources: dict[str, float],
                                              labels: dict[str, str]) -> Any:
        time.sleep(float(os.environ.get(LAUNCH_DELAY_ENV, "0")))
        return super().create_node_with_resources_and_labels(node_config, tags, count, resources,
                                                             labels)
