"""The diffusion model memrl fine-tunes (``unet``) and the base model it starts from (``base``)."""

from memrl.errors import ModelError
from memrl.models.base import base_model_key, get_base_model, pretrain_base_model
from memrl.models.unet import DiffusionModel, build_unet, install_groupnorm_guard, load_model

__all__ = [
    "DiffusionModel",
    "ModelError",
    "base_model_key",
    "build_unet",
    "get_base_model",
    "install_groupnorm_guard",
    "load_model",
    "pretrain_base_model",
]
