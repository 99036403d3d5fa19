"""Deployable students (issue 15): ``export_model`` writes a directory transformers loads without the
teacher; ``from_pretrained`` reads it back. Replacements describe themselves (``zoo.export.spec``) in the
primitive ops of ``zoo.export.modeling_zoo``, the file an export ships for ``trust_remote_code``."""
from .load import check_export_dir, from_pretrained
from .writer import export_model

__all__ = ["check_export_dir", "export_model", "from_pretrained"]
