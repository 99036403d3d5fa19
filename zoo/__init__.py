"""zoo: trainable structured replacements for the linear maps of causal LMs, repaired by distillation."""
from .core import (ActivationStats, Composite, DistillationModule, Replaced, Technique, ZooError,
                   export_student, find_targets, load_causal_lm, replace, teacher_view, token_kl)
from .coupled import CoupledCore, CoupledCoreRepair, Shim, ShimmedLinear
from .eigen_attention import EigenAttention, EigenAttentionLayer, EigenAttentionRepair
from .fisher_svd import FisherSVD, FisherSVDLinear, FisherSVDRepair
from .phd import BlockwisePHD, BlockwisePHDLinear, BlockwisePHDRepair
from .lora import LoRA, LoRAFineTune
from .universal_basis import UniversalBasis, UniversalBasisCoefficients, UniversalBasisLoRA
from .tase import TASECoupledCore, TASECoupledRepair, TASEDiagnostic, TASEInterface
from .export import export_model, from_pretrained

__all__ = [
    "ActivationStats", "Composite", "DistillationModule", "Replaced", "Technique", "ZooError",
    "export_student", "find_targets", "load_causal_lm", "replace", "teacher_view", "token_kl",
    "FisherSVD", "FisherSVDLinear", "FisherSVDRepair",
    "BlockwisePHD", "BlockwisePHDLinear", "BlockwisePHDRepair",
    "CoupledCore", "CoupledCoreRepair", "Shim", "ShimmedLinear",
    "LoRA", "LoRAFineTune", "UniversalBasis", "UniversalBasisCoefficients", "UniversalBasisLoRA",
    "EigenAttention", "EigenAttentionLayer", "EigenAttentionRepair",
    "TASECoupledCore", "TASECoupledRepair", "TASEDiagnostic", "TASEInterface",
    "export_model", "from_pretrained",
]
