"""Backbones (any timm model), the DINO head, and the student/teacher networks built from them."""

from unsupdistill.models.backbone import BackboneSpec, create_backbone
from unsupdistill.models.dino import DINONetwork, build_student_teacher

__all__ = ["BackboneSpec", "DINONetwork", "build_student_teacher", "create_backbone"]
