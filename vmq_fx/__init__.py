"""vmq_fx: post-training quantization and export of Visual Mamba models on torch.export and torchao PT2E."""
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from vmq_fx import models, ops
from vmq_fx.calibrate import calibrate
from vmq_fx.export import export_model
from vmq_fx.joint_learning import JLSSConfig, jlss
from vmq_fx.passes import adapt_mamba_ssm, lower
from vmq_fx.quantizer import PTQ4VMRecipe, VisualMambaQuantizer, recipes

__all__ = [
    "JLSSConfig",
    "PTQ4VMRecipe",
    "VisualMambaQuantizer",
    "adapt_mamba_ssm",
    "calibrate",
    "convert_pt2e",
    "export_model",
    "jlss",
    "lower",
    "models",
    "ops",
    "prepare_pt2e",
    "recipes",
]
__version__ = "0.1.0"
