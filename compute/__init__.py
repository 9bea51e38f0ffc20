"""The compute room: the control plane, a PostgreSQL server per active branch, its lifecycle and
its size."""

from compute.control import ComputeAddress, ControlPlane, Endpoints, EndpointStatus, UnknownBranch
from compute.endpoint import ComputeConfigError, EndpointConfig, EndpointState, IllegalTransition, WakeError
from compute.node import ComputeNode, ComputeStartError
from compute.signals import LoadSignals
from compute.sizes import SizeError

__all__ = [
    "ComputeAddress", "ComputeConfigError", "ComputeNode", "ComputeStartError", "ControlPlane", "EndpointConfig",
    "EndpointState", "EndpointStatus", "Endpoints", "IllegalTransition", "LoadSignals", "SizeError",
    "UnknownBranch", "WakeError",
]
