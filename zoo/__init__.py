"""zoo: trainable structured replacements for the linear maps of causal LMs, repaired by distillation."""
from .core import (ActivationStats, Composite, DistillationModule, RepairModule, Replaced, Replacement, Student,
                   Technique, ZooError, export_student, find_targets, load_causal_lm, replace, teacher_view, token_kl)
from .coupled import CoupledCore, Shim, ShimmedLinear
from .eigen_attention import EigenAttention, EigenAttentionLayer
from .fisher_svd import FisherSVD, FisherSVDLinear
from .phd import BlockwisePHD, BlockwisePHDLinear
from .lora import LoRA
from .universal_basis_lora import UniversalBasis, UniversalBasisLoRA
from .tase import TASECoupledCore, TASEInterface
from .tase_diagnostic import TASEDiagnostic
from .kfac import KFACSVD
from .quant import Quantize, QuantizedLinear
from .transplant import Transplant, TransplantedLinear
from .export import export_model, from_pretrained

__all__ = [
    "ActivationStats", "Composite", "DistillationModule", "RepairModule", "Replaced", "Replacement", "Student",
    "Technique", "ZooError", "export_student", "find_targets", "load_causal_lm", "replace", "teacher_view", "token_kl",
    "FisherSVD", "FisherSVDLinear", "BlockwisePHD", "BlockwisePHDLinear",
    "CoupledCore", "Shim", "ShimmedLinear", "LoRA", "UniversalBasis", "UniversalBasisLoRA",
    "EigenAttention", "EigenAttentionLayer", "TASECoupledCore", "TASEDiagnostic", "TASEInterface",
    "KFACSVD", "Quantize", "QuantizedLinear", "Transplant", "TransplantedLinear", "export_model", "from_pretrained",
]
