"""zoo: trainable structured replacements for the linear maps of causal LMs, repaired by distillation.

Each name below is imported when first used (``zoo.core.lazy``): ``import zoo.core.errors`` costs no torch.
"""
from .core.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".core": ["ActivationStats", "Composite", "DistillationModule", "RepairModule", "Replaced", "Replacement",
              "Student", "Technique", "ZooError", "export_student", "find_targets", "load_causal_lm", "replace",
              "teacher_view", "token_kl"],
    ".fisher_svd": ["FisherSVD", "FisherSVDLinear"],
    ".phd": ["BlockwisePHD", "BlockwisePHDLinear"],
    ".coupled": ["CoupledCore", "Shim", "ShimmedLinear"],
    ".lora": ["LoRA"],
    ".universal_basis_lora": ["UniversalBasis", "UniversalBasisLoRA"],
    ".eigen_attention": ["EigenAttention", "EigenAttentionLayer"],
    ".tase": ["TASECoupledCore", "TASEInterface"],
    ".tase_diagnostic": ["TASEDiagnostic"],
    ".kfac": ["KFACSVD"],
    ".quant": ["Quantize", "QuantizedLinear"],
    ".transplant": ["Transplant", "TransplantedLinear"],
    ".export": ["export_model", "from_pretrained"],
})
