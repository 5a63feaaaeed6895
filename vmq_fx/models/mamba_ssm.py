"""Make models built from mamba-ssm's ``Mamba`` module exportable through ``vmq::selective_scan``.

mamba-ssm's ``Mamba.forward`` calls CUDA-only kernels (``selective_scan_cuda``, ``causal_conv1d``) that neither run on
a CPU nor trace under ``torch.export``. :func:`adapt_mamba_ssm` swaps every such module for a
:class:`~vmq_fx.models.MambaMixer` holding the same parameters (same names, so the state dict is unchanged), whose
scan is the vmq custom op. mamba-ssm itself need not be importable: modules are recognized by their class.
"""
from __future__ import annotations

from torch import nn

from vmq_fx.models.checkpoint import load_state_dict_strict
from vmq_fx.models.mamba import MambaMixer

__all__ = ["adapt_mamba_ssm"]

_MAMBA_CLASSES = {("mamba_ssm.modules.mamba_simple", "Mamba")}


def _is_mamba_ssm(module: nn.Module) -> bool:
    return (type(module).__module__, type(module).__name__) in _MAMBA_CLASSES


def _unsupported_mamba_ssm(module: nn.Module) -> bool:
    # Mamba2 and friends have another parameterization (multi-head SSD); refuse rather than mis-convert.
    mod = type(module).__module__
    return mod.startswith("mamba_ssm.modules.") and type(module).__name__.startswith("Mamba") and not _is_mamba_ssm(
        module
    )


def _convert(module: nn.Module) -> MambaMixer:
    if module.activation != "silu":
        raise ValueError(f"mamba_ssm Mamba with activation {module.activation!r} is not supported (only 'silu')")
    mixer = MambaMixer(
        module.d_model,
        d_state=module.d_state,
        d_conv=module.d_conv,
        expand=module.expand,
        dt_rank=module.dt_rank,
        bimamba=False,
        bias=module.in_proj.bias is not None,
        conv_bias=module.conv1d.bias is not None,
    )
    ref = module.in_proj.weight
    mixer.to(device=ref.device, dtype=ref.dtype)
    load_state_dict_strict(mixer, module.state_dict(), source=f"mamba_ssm Mamba (layer_idx={module.layer_idx})")
    return mixer.train(module.training)


def adapt_mamba_ssm(model: nn.Module) -> nn.Module:
    """Replace every ``mamba_ssm.modules.mamba_simple.Mamba`` in ``model`` (in place) by an exportable mixer.

    Args:
        model: any module tree containing mamba-ssm ``Mamba`` mixers (or one itself).

    Returns:
        The model, with the mixers replaced; a bare ``Mamba`` argument returns its replacement.

    Raises:
        ValueError: if the model holds no mamba-ssm ``Mamba`` module, or a mamba-ssm mixer of another kind
            (e.g. ``Mamba2``) that this adapter cannot convert.

    Example:
        >>> import torch
        >>> from vmq_fx.models import adapt_mamba_ssm
        >>> # model = MyNet(...)  # built from mamba_ssm.modules.mamba_simple.Mamba
        >>> # ep = torch.export.export(adapt_mamba_ssm(model).eval(), (x,))
    """
    if _is_mamba_ssm(model):
        return _convert(model)
    bad = [name for name, m in model.named_modules() if _unsupported_mamba_ssm(m)]
    if bad:
        raise ValueError(f"adapt_mamba_ssm: unsupported mamba_ssm mixer(s) at {bad}; only mamba_simple.Mamba is")
    targets = [name for name, m in model.named_modules() if _is_mamba_ssm(m)]
    if not targets:
        raise ValueError("adapt_mamba_ssm: the model contains no mamba_ssm.modules.mamba_simple.Mamba module")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _convert(getattr(parent, child)))
    return model
