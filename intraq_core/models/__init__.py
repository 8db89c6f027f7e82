"""Classifier models: registry, CIFAR ResNets, torchvision models, checkpoints, introspection."""

from intraq_core.models.checkpoint import (
    MODEL_CHECKPOINT_FORMAT,
    CheckpointError,
    CheckpointMismatchError,
    adapt_state_dict,
    extract_state_dict,
    is_model_checkpoint,
    load_state_dict_file,
    load_weights,
    read_model_checkpoint,
    save_model_checkpoint,
)
from intraq_core.models.cifar_resnet import (
    CIFAR_RESNET_DEPTHS,
    BasicBlock,
    CifarResNet,
    PadShortcut,
    cifar_resnet,
)
from intraq_core.models.introspect import FeatureTap, bn_layers, classifier_layer, flatten_feature
from intraq_core.models.registry import (
    CIFAR_DEFAULTS,
    ModelSpec,
    UnknownModelError,
    create_model,
    get_model_spec,
    list_models,
    model_from_checkpoint,
    register_model,
    resolve_model_config,
)
from intraq_core.models.torchvision_models import TORCHVISION_PREFIX, torchvision_model_names

__all__ = [
    "CIFAR_DEFAULTS",
    "CIFAR_RESNET_DEPTHS",
    "MODEL_CHECKPOINT_FORMAT",
    "TORCHVISION_PREFIX",
    "BasicBlock",
    "CheckpointError",
    "CheckpointMismatchError",
    "CifarResNet",
    "FeatureTap",
    "ModelSpec",
    "PadShortcut",
    "UnknownModelError",
    "adapt_state_dict",
    "bn_layers",
    "cifar_resnet",
    "classifier_layer",
    "create_model",
    "extract_state_dict",
    "flatten_feature",
    "get_model_spec",
    "is_model_checkpoint",
    "list_models",
    "load_state_dict_file",
    "load_weights",
    "model_from_checkpoint",
    "read_model_checkpoint",
    "register_model",
    "resolve_model_config",
    "save_model_checkpoint",
    "torchvision_model_names",
]
