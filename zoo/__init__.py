"""zoo: trainable structured replacements for the linear maps of causal LMs, repaired by distillation."""
from .core import (ActivationStats, Composite, DistillationModule, Replaced, Technique, ZooError,
                   export_student, find_targets, load_causal_lm, replace, teacher_view, token_kl)
from .eigen_attention import EigenAttention, EigenAttentionLayer, EigenAttentionRepair
from .fisher_svd import FisherSVD, FisherSVDLinear, FisherSVDRepair

__all__ = [
    "ActivationStats", "Composite", "DistillationModule", "Replaced", "Technique", "ZooError",
    "export_student", "find_targets", "load_causal_lm", "replace", "teacher_view", "token_kl",
    "FisherSVD", "FisherSVDLinear", "FisherSVDRepair",
    "EigenAttention", "EigenAttentionLayer", "EigenAttentionRepair",
]
