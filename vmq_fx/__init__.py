"""vmq_fx: post-training quantization and export of Visual Mamba models on torch.export and torchao PT2E."""
from vmq_fx import _quiet

_quiet.install()  # before torchao is imported: it logs harmless failures on CPU machines

from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: E402

from vmq_fx import models, ops, recipes  # noqa: E402
from vmq_fx.calibration import calibrate  # noqa: E402
from vmq_fx.export import export_model, export_onnx  # noqa: E402
from vmq_fx.flow import QuantizeResult, quantize  # noqa: E402
from vmq_fx.joint_learning import JLSSReport, jlss  # noqa: E402
from vmq_fx.passes import adapt_mamba_ssm, lower  # noqa: E402
from vmq_fx.quantizer import VisualMambaQuantizer  # noqa: E402
from vmq_fx.recipes import PTQ4VMRecipe, Schedule, VQRecipe  # noqa: E402
from vmq_fx.serialization import load_quantized, save_quantized  # noqa: E402
from vmq_fx.vq import VQReport, vector_quantize  # noqa: E402

__all__ = [
    "JLSSReport",
    "PTQ4VMRecipe",
    "QuantizeResult",
    "Schedule",
    "VQRecipe",
    "VQReport",
    "VisualMambaQuantizer",
    "adapt_mamba_ssm",
    "calibrate",
    "convert_pt2e",
    "export_model",
    "export_onnx",
    "jlss",
    "load_quantized",
    "lower",
    "models",
    "ops",
    "prepare_pt2e",
    "quantize",
    "recipes",
    "save_quantized",
    "vector_quantize",
]
__version__ = "0.1.0"
