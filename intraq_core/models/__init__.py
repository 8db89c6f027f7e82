"""Classifier models: registry, CIFAR ResNets, torchvision/timm/imported models, checkpoints, introspection,
multi-output models (``model.output``)."""

from intraq_core.errors import CheckpointError, CheckpointMismatchError, ModelError, UnknownModelError
from intraq_core.models.checkpoint import (
    MODEL_CHECKPOINT_FORMAT,
    adapt_state_dict,
    checkpoint_bytes,
    extract_state_dict,
    is_model_checkpoint,
    load_state_dict_file,
    load_weights,
    read_model_checkpoint,
    write_checkpoint,
)
from intraq_core.models.cifar_resnet import (
    CIFAR_RESNET_DEPTHS,
    BasicBlock,
    CifarResNet,
    PadShortcut,
    cifar_resnet,
)
from intraq_core.models.imported import is_import_path, local_source
from intraq_core.models.introspect import (
    ActivationSite,
    FeatureTap,
    activation_site,
    bn_layers,
    classifier_layer,
    flatten_feature,
)
from intraq_core.models.output import SelectOutput
from intraq_core.models.registry import (
    CIFAR_DEFAULTS,
    ModelSpec,
    create_model,
    get_model_spec,
    list_models,
    model_from_checkpoint,
    register_model,
    resolve_model_config,
    save_model_checkpoint,
)
from intraq_core.models.timm_models import TIMM_PREFIX
from intraq_core.models.torchvision_models import TORCHVISION_PREFIX, torchvision_model_names

__all__ = [
    "CIFAR_DEFAULTS",
    "CIFAR_RESNET_DEPTHS",
    "MODEL_CHECKPOINT_FORMAT",
    "TIMM_PREFIX",
    "TORCHVISION_PREFIX",
    "ActivationSite",
    "BasicBlock",
    "CheckpointError",
    "CheckpointMismatchError",
    "CifarResNet",
    "FeatureTap",
    "ModelError",
    "ModelSpec",
    "PadShortcut",
    "SelectOutput",
    "UnknownModelError",
    "activation_site",
    "adapt_state_dict",
    "bn_layers",
    "checkpoint_bytes",
    "cifar_resnet",
    "classifier_layer",
    "create_model",
    "extract_state_dict",
    "flatten_feature",
    "get_model_spec",
    "is_import_path",
    "is_model_checkpoint",
    "list_models",
    "load_state_dict_file",
    "load_weights",
    "local_source",
    "model_from_checkpoint",
    "read_model_checkpoint",
    "register_model",
    "resolve_model_config",
    "save_model_checkpoint",
    "torchvision_model_names",
    "write_checkpoint",
]
