"""Exportable Visual Mamba models (Vim, VMamba), named configurations and checkpoint loading."""
from vmq_fx.models.checkpoint import (CheckpointMismatchError, infer_config, load_checkpoint, load_state_dict_strict,
                                     read_state_dict)
from vmq_fx.models.preprocess import Preprocess
from vmq_fx.models.mamba import MambaMixer, RMSNorm
from vmq_fx.models.reference import list_references, load_reference, reference_card
from vmq_fx.models.registry import MODEL_CONFIGS, create_model, list_models, with_overrides
from vmq_fx.models.vim import VimConfig, VisionMamba
from vmq_fx.models.vmamba import VMamba, VMambaConfig
from vmq_fx.models.mamba_ssm import adapt_mamba_ssm

__all__ = [
    "CheckpointMismatchError",
    "MODEL_CONFIGS",
    "MambaMixer",
    "RMSNorm",
    "VMamba",
    "VMambaConfig",
    "VimConfig",
    "VisionMamba",
    "adapt_mamba_ssm",
    "create_model",
    "list_models",
    "list_references",
    "load_reference",
    "reference_card",
    "load_state_dict_strict",
    "load_checkpoint",
    "read_state_dict",
    "infer_config",
    "Preprocess",
    "with_overrides",
]
