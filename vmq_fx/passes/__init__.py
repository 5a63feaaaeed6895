"""Graph and module passes."""
from vmq_fx.passes.lowering import lower
from vmq_fx.passes.mamba_ssm import adapt_mamba_ssm

__all__ = ["adapt_mamba_ssm", "lower"]
