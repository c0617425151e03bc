"""cratescale.models: CRATE-MAE and the ViT-MAE baseline as pure torch nn.Modules.

Public API: create_model, from_pretrained, list_models, model_from_config, param_counts,
load_reference_state_dict, to_reference_state_dict, train_flops_per_image.
"""

from .base import MaskedAutoencoder, ModelConfigError, ModelInputError
from .crate_mae import CrateMAE
from .flops import forward_flops_per_image, train_flops_per_image
from .pretrained import PretrainedError, from_pretrained
from .reference import ReferenceLoadError, load_reference_state_dict, to_reference_state_dict
from .registry import create_model, list_models, model_from_config, param_counts, reference_param_count
from .vit_mae import ViTMAE

__all__ = [
    "CrateMAE",
    "MaskedAutoencoder",
    "ModelConfigError",
    "ModelInputError",
    "PretrainedError",
    "ReferenceLoadError",
    "ViTMAE",
    "create_model",
    "forward_flops_per_image",
    "from_pretrained",
    "list_models",
    "load_reference_state_dict",
    "model_from_config",
    "param_counts",
    "reference_param_count",
    "to_reference_state_dict",
    "train_flops_per_image",
]
