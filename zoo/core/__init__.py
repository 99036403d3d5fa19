"""What every technique shares: loading, targets, surgery, calibration, loss, state I/O."""
from .calibration import ActivationStats, collect
from .errors import ZooError
from .losses import token_kl
from .models import DEFAULT_TEACHER, load_causal_lm, load_tokenizer
from .module import Composite, DistillationModule, RepairModule
from .registry import register
from .replacement import Replaced, Replacement
from .state import load_state, save_state
from .student import Student
from .surgery import export_student, replace, teacher_view
from .targets import find_targets
from .technique import Plan, Technique
