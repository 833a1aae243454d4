"""Backbones (any timm model), the DINO head, the student/teacher networks built from them, and frozen
models loaded from a MODEL argument (evaluation's feature extractors, distillation's teachers)."""

from unsupdistill.models.backbone import BackboneSpec, create_backbone, pooled_and_spatial
from unsupdistill.models.dino import DINONetwork, build_dino_head, build_dino_network, build_student_teacher
from unsupdistill.models.load import FeatureModel, ModelSpecError, load_model
from unsupdistill.models.teachers import Teacher, TeacherError, load_teacher

__all__ = ["BackboneSpec", "DINONetwork", "FeatureModel", "ModelSpecError", "Teacher", "TeacherError",
           "build_dino_head", "build_dino_network", "build_student_teacher", "create_backbone", "load_model",
           "load_teacher", "pooled_and_spatial"]
