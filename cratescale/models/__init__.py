"""cratescale.models: CRATE-MAE and the ViT-MAE baseline as pure torch nn.Modules.

Public API: create_model, from_pretrained, list_models, model_from_config, param_counts,
load_reference_state_dict, to_reference_state_dict, train_flops_per_image; the fine-tuning classifier: Classifier,
from_encoder, scratch_classifier, classifier_from_config.
"""

from .base import MaskedAutoencoder, ModelConfigError, ModelInputError
from .classifier import Classifier, classifier_from_config, from_encoder, scratch_classifier
from .crate_mae import CrateMAE
from .flops import forward_flops_per_image, train_flops_per_image
from .pretrained import PretrainedError, from_pretrained
from .reference import ReferenceLoadError, load_reference_state_dict, to_reference_state_dict
from .registry import create_model, list_models, model_from_config, param_counts, reference_param_count
from .vit_mae import ViTMAE

__all__ = [
    "Classifier",
    "CrateMAE",
    "MaskedAutoencoder",
    "ModelConfigError",
    "ModelInputError",
    "PretrainedError",
    "ReferenceLoadError",
    "ViTMAE",
    "classifier_from_config",
    "create_model",
    "forward_flops_per_image",
    "from_encoder",
    "from_pretrained",
    "list_models",
    "load_reference_state_dict",
    "model_from_config",
    "param_counts",
    "reference_param_count",
    "scratch_classifier",
    "to_reference_state_dict",
    "train_flops_per_image",
]
