"""Backbones (timm, torchvision, our small nets), projection heads, weight loading and export.

Importing this package registers ``look_cnn_small`` and ``look_resnet_tiny`` in timm's registry.
"""

from look.models.backbones import (
    TORCHVISION_PREFIX,
    apply_small_stem,
    count_parameters,
    create_backbone,
    list_backbone_names,
)
from look.models.export import (
    EXPORT_FORMAT,
    export_backbone,
    load_exported_backbone,
    read_export_metadata,
)
from look.models.heads import ProjectionHead, build_projection_head
from look.models.input_size import InputSizeCheck, check_input_size
from look.models.small_nets import SmallResNet, look_cnn_small, look_resnet_tiny
from look.models.weights import (
    KNOWN_KEY_PREFIXES,
    WeightLoadReport,
    check_finite,
    describe_torch_load_error,
    load_backbone_state,
    load_backbone_weights,
    read_safetensors,
    read_state_dict,
    resolve_weight_file,
    strip_known_prefixes,
    strip_prefix,
)

__all__ = [
    "EXPORT_FORMAT",
    "KNOWN_KEY_PREFIXES",
    "TORCHVISION_PREFIX",
    "InputSizeCheck",
    "ProjectionHead",
    "SmallResNet",
    "WeightLoadReport",
    "apply_small_stem",
    "build_projection_head",
    "check_finite",
    "check_input_size",
    "count_parameters",
    "create_backbone",
    "describe_torch_load_error",
    "export_backbone",
    "list_backbone_names",
    "load_backbone_state",
    "load_backbone_weights",
    "load_exported_backbone",
    "look_cnn_small",
    "look_resnet_tiny",
    "read_export_metadata",
    "read_safetensors",
    "read_state_dict",
    "resolve_weight_file",
    "strip_known_prefixes",
    "strip_prefix",
]
