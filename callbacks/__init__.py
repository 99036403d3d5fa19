"""Lightning callbacks that gate and checkpoint repair runs (DESIGN.md, "Callbacks")."""
from .checkpoint import MetricsJSON, RepairStateCheckpoint
from .gates import GateFailed, HeldoutKLGate

__all__ = ["GateFailed", "HeldoutKLGate", "MetricsJSON", "RepairStateCheckpoint"]
