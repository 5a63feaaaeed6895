"""vmq_fx: post-training quantization and export of Visual Mamba models on torch.export and torchao PT2E."""
from vmq_fx import models, ops
from vmq_fx.export import export_model
from vmq_fx.passes import adapt_mamba_ssm

__all__ = ["adapt_mamba_ssm", "export_model", "models", "ops"]
__version__ = "0.1.0"
