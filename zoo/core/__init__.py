"""What every technique shares: loading, targets, surgery, calibration, loss, state I/O.

Each name below is imported when first used (``zoo.core.lazy``).
"""
from .lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".calibration": ["ActivationStats", "collect"],
    ".errors": ["ZooError"],
    ".losses": ["token_kl"],
    ".models": ["DEFAULT_TEACHER", "load_causal_lm", "load_tokenizer"],
    ".module": ["Composite", "DistillationModule", "RepairModule"],
    ".registry": ["register"],
    ".replacement": ["Replaced", "Replacement"],
    ".state": ["load_state", "save_state"],
    ".student": ["Student"],
    ".surgery": ["export_student", "replace", "teacher_view"],
    ".targets": ["find_targets"],
    ".technique": ["Plan", "Technique"],
})
