"""Models, registered by name. Importing this package registers every model."""

from recforge.models.base import Model, ModelConfig, build_model, register, registered

__all__ = ["Model", "ModelConfig", "build_model", "register", "registered"]
