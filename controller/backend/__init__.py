"""Where the controller reads and writes rollouts, traffic splits, pools and adapter
ConfigMaps: the interface and its data types (`base`), the Kubernetes implementation
(`kube`), and the local one over a directory of YAML files (`local`)."""

from controller.backend.base import (
    ROLLOUT_API_VERSION,
    ROLLOUT_GROUP,
    ROLLOUT_KIND,
    ROLLOUT_PLURAL,
    ROLLOUT_VERSION,
    AlreadyExistsError,
    Backend,
    BackendError,
    ConflictError,
    EventType,
    NotFoundError,
    ObjectRef,
    StaleError,
    StoredRollout,
    TrafficSplit,
)

__all__ = [
    "ROLLOUT_API_VERSION",
    "ROLLOUT_GROUP",
    "ROLLOUT_KIND",
    "ROLLOUT_PLURAL",
    "ROLLOUT_VERSION",
    "AlreadyExistsError",
    "Backend",
    "BackendError",
    "ConflictError",
    "EventType",
    "NotFoundError",
    "ObjectRef",
    "StaleError",
    "StoredRollout",
    "TrafficSplit",
]
