"""Lightning callbacks that gate and checkpoint repair runs (DESIGN.md, "Callbacks")."""
from .checkpoint import MetricsJSON, RepairStateCheckpoint
from .evalplus_gate import EvalPlusGate
from .gates import GateFailed, HeldoutKLGate, IdentityGate, ShimDominanceGate

__all__ = ["EvalPlusGate", "GateFailed", "HeldoutKLGate", "IdentityGate", "MetricsJSON", "RepairStateCheckpoint", "ShimDominanceGate"]
