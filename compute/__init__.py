"""The compute room: a PostgreSQL server per active branch, its lifecycle and its size."""

from compute.endpoint import ComputeConfigError, EndpointConfig, WakeError
from compute.manager import ComputeAddress, Endpoints, EndpointStatus, UnknownBranch
from compute.node import ComputeNode, ComputeStartError
from compute.signals import LoadSignals
from compute.sizes import SizeError

__all__ = [
    "ComputeAddress", "ComputeConfigError", "ComputeNode", "ComputeStartError", "EndpointConfig",
    "EndpointStatus", "Endpoints", "LoadSignals", "SizeError", "UnknownBranch", "WakeError",
]
