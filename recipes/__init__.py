"""Recipes: the distillation DataModules (and the ``zoo`` CLI in ``recipes.cli``).

The DataModules are imported when first used (``zoo.core.lazy``): ``zoo --help`` loads none of them.
"""
from zoo.core.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".data": ["CodeConfig", "CodeDataModule", "DistillationDataModule", "HologramConfig", "HologramDataModule",
              "TeacherLogitsConfig", "TokenDataModule"],
})
