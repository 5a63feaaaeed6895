"""4-bit weights of ``vmq::int8_linear`` in their stored form.

A lowered model runs its 4-bit weights as int8 ``[N, K]`` (no unpacking per call); files keep them packed two per
byte (``uint8 [N, ceil(K / 2)]``, :func:`vmq_fx.ops.pack_int4`): :func:`vmq_fx.save_quantized` and
:func:`vmq_fx.export_onnx` pack them, :func:`vmq_fx.load_quantized` unpacks them. The op accepts both forms.
"""
from __future__ import annotations

import torch
from torch import fx

from vmq_fx.ops.int8_linear import Int8LinearArgs, is_packed, pack_int4

__all__ = ["int4_weight_names", "pack_int4_weights"]


def int4_weight_names(gm: fx.GraphModule) -> list[str]:
    """Attribute names of the int8-form weights of 4-bit ``int8_linear`` nodes."""
    names = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.vmq.int8_linear.default:
            args = Int8LinearArgs.from_node(node)
            w = args.w
            if args.w_bits <= 4 and w.op == "get_attr" and not is_packed(gm.get_buffer(str(w.target))):
                names.append(str(w.target))
    return names


def _set_buffer(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    (gm.get_submodule(owner) if owner else gm).register_buffer(attr, value)


def pack_int4_weights(gm: fx.GraphModule) -> fx.GraphModule:
    """Put every 4-bit weight of ``gm`` in the packed form (in place); returns ``gm``."""
    for name in int4_weight_names(gm):
        _set_buffer(gm, name, pack_int4(gm.get_buffer(name)))
    return gm
