"""Lightning callbacks that gate and checkpoint repair runs (source 000, section 3.2 "Gates")."""
from .checkpoint import MetricsJSON, RepairStateCheckpoint
from .curve import RepairCurve
from .evalplus_gate import EvalPlusGate
from .gates import GateFailed, HeldoutKLGate, IdentityGate, ShimDominanceGate

__all__ = ["EvalPlusGate", "GateFailed", "HeldoutKLGate", "IdentityGate", "MetricsJSON", "RepairCurve", "RepairStateCheckpoint", "ShimDominanceGate"]
