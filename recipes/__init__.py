"""Recipes: the distillation DataModules (and the ``zoo`` CLI in ``recipes.cli``)."""
from .data import (
    CodeConfig,
    CodeDataModule,
    DistillationDataModule,
    HologramConfig,
    HologramDataModule,
    TeacherLogitsConfig,
    TokenDataModule,
)

__all__ = [
    "CodeConfig",
    "CodeDataModule",
    "DistillationDataModule",
    "HologramConfig",
    "HologramDataModule",
    "TeacherLogitsConfig",
    "TokenDataModule",
]
