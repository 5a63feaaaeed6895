"""Graph clean-up run at the end of lowering: what ``torch.export`` leaves for its own checks and what depends on
the weights only is not recomputed on every call.

* constant folding (torchao's PT2E ``constant_fold``): ``-exp(A_log.float())``, ``D.float()``, ``bias.float()`` ...
  become constants; vmq ops and dequantize ops are never folded (that would decode compressed weights into floats);
* ``aten.to`` to the dtype the value already has is dropped, and so is ``aten._assert_tensor_metadata`` (torch.export
  inserts one per ``.to()`` to re-check the dtype the trace saw; the lowered graph's dtypes are fixed);
* every tensor the graph reads moves onto the root module under a flat name (``layers.0.mixer.D`` ->
  ``layers_0_mixer_D``): the generated code read it as ``getattr(self.layers, "0").mixer.D``, one
  ``Module.__getattr__`` (~0.4 us) per step of the path;
* those root tensors are read by properties of the graph module's own class (:func:`direct_attribute_reads`): one
  dict lookup instead of ``Module.__getattr__``, which Python calls only after its normal lookup has failed.

Each of these costs ~1-2 microseconds of Python per node per call: at batch 1 on small models they add up to a
fifth of the forward time.
"""
from __future__ import annotations

import logging

import torch
from torch import fx
from torchao.quantization.pt2e.constant_fold import constant_fold

__all__ = ["direct_attribute_reads", "flatten_attributes", "simplify"]

log = logging.getLogger(__name__)

_NEVER_FOLD_NAMESPACES = {"vmq", "quantized_decomposed", "torchao"}


def _foldable(node: fx.Node) -> bool:
    return getattr(node.target, "namespace", None) not in _NEVER_FOLD_NAMESPACES


def _is_noop(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is torch.ops.aten._assert_tensor_metadata.default:
        return True
    if node.target is torch.ops.aten.to.dtype and len(node.args) == 2 and not node.kwargs:
        val = getattr(node.args[0], "meta", {}).get("val")
        return isinstance(val, torch.Tensor) and val.dtype == node.args[1]
    return False


def drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Delete parameters and buffers no get_attr reads, at any depth (the float weights that convert_pt2e folded into
    integer constants, the inputs of folded constants), so that they leave the model and its state dict."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)] + [
        n for n, _ in gm.named_buffers(remove_duplicate=False)]
    for name in names:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)


def flatten_attributes(gm: fx.GraphModule) -> None:
    """Move every parameter, buffer or tensor a get_attr reads below the root onto the root (in place), named by its
    path with dots as underscores (a suffix where that name is taken), and delete the submodules left empty. On
    vim-fm-tiny's W8A8 graph (375 reads, 558 steps) the batch-1 forward went from 0.91x to 0.94x the FP32 model's
    speed (Intel Xeon with AMX, one thread, in one process; VQ 2-bit 0.86x to 0.91x).

    Example:
        >>> root = torch.nn.Module()
        >>> root.block = torch.nn.Module()
        >>> root.block.register_buffer("w", torch.ones(2))
        >>> graph = fx.Graph()
        >>> _ = graph.output(graph.call_function(torch.add, (graph.placeholder("x"), graph.get_attr("block.w"))))
        >>> gm = fx.GraphModule(root, graph)
        >>> flatten_attributes(gm)
        >>> [str(n.target) for n in gm.graph.nodes if n.op == "get_attr"], hasattr(gm, "block")
        (['block_w'], False)
    """
    taken = set(gm.state_dict(keep_vars=True)) | set(dir(gm))
    moved: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or "." not in str(node.target):
            continue
        target = str(node.target)
        if target not in moved:
            owner_path, _, attr = target.rpartition(".")
            owner = gm.get_submodule(owner_path)
            flat, i = target.replace(".", "_"), 1
            while flat in taken:
                flat, i = f"{target.replace('.', '_')}_{i}", i + 1
            taken.add(flat)
            if attr in owner._parameters:
                gm.register_parameter(flat, owner._parameters[attr])
            elif attr in owner._buffers:
                gm.register_buffer(flat, owner._buffers[attr],
                                   persistent=attr not in owner._non_persistent_buffers_set)
            else:
                setattr(gm, flat, getattr(owner, attr))
            delattr(owner, attr)
            moved[target] = flat
        node.target = moved[target]
    gm.delete_all_unused_submodules()


def _root_tensor_property(name: str) -> property:
    # The getter is what Module.__getattr__ does for a buffer, minus the failed normal lookup before it; a property
    # takes precedence over the instance dict, so a plain attribute of that name (set through the setter: what
    # Module.__setattr__ leaves to object.__setattr__) is kept and read there.
    def read(module):
        buffers = module._buffers
        if name in buffers:
            return buffers[name]
        plain = module.__dict__
        if name in plain:
            return plain[name]
        return torch.nn.Module.__getattr__(module, name)  # a parameter, or the AttributeError

    def write(module, value):
        module.__dict__[name] = value

    def delete(module):
        if name not in module.__dict__:
            raise AttributeError(name)
        del module.__dict__[name]

    return property(read, write, delete, doc=f"the root tensor {name!r}, read without Module.__getattr__")


def direct_attribute_reads(gm: fx.GraphModule) -> fx.GraphModule:
    """Read each root parameter or buffer that a get_attr node of ``gm`` reads through a property of ``gm``'s own class
    (torch.fx makes a class per graph module instance); returns ``gm``.

    Without it every read is a failed attribute lookup and then a call of ``Module.__getattr__``: vim-fm-tiny's W8A8
    graph reads 375 tensors per forward, 228-246 us of its 2.3 ms at batch 1 (57 us with the properties; its forward
    went from 0.97x to 1.07x the FP32 model's speed, Intel Xeon with AMX, one thread, in one process). The properties
    read the module's dicts on every call, so ``.to()``, ``load_state_dict`` and re-registered buffers behave as
    before. A deep copy or a pickled copy of ``gm`` gets a class of its own without them (the same results, the
    plain reads).

    Example:
        >>> root = torch.nn.Module()
        >>> root.register_buffer("w", torch.ones(2))
        >>> graph = fx.Graph()
        >>> _ = graph.output(graph.call_function(torch.add, (graph.placeholder("x"), graph.get_attr("w"))))
        >>> gm = direct_attribute_reads(fx.GraphModule(root, graph))
        >>> isinstance(type(gm).__dict__["w"], property), gm(torch.zeros(2))
        (True, tensor([1., 1.]))
        >>> gm.to(torch.float64)(torch.zeros(2)).dtype  # the buffer the module holds now
        torch.float64
    """
    cls = type(gm)
    if cls.__qualname__ != "GraphModule.__new__.<locals>.GraphModuleImpl":
        # Properties on a class other instances share would change them too.
        log.debug("direct_attribute_reads: %s is not a graph module's own class; reads left as they are",
                  cls.__qualname__)
        return gm
    registered = set(gm._buffers) | set(gm._parameters)
    for node in gm.graph.nodes:
        name = str(node.target)
        if node.op == "get_attr" and name in registered and name not in cls.__dict__:
            setattr(cls, name, _root_tensor_property(name))
    return gm


def simplify(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop no-op nodes and fold constants of a lowered graph (in place); returns ``gm``."""
    for node in list(gm.graph.nodes):
        if _is_noop(node):
            if node.target is torch.ops.aten.to.dtype:
                node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    before = set(gm._buffers)
    with torch.no_grad():
        constant_fold(gm, constraint_fn=_foldable)
    # Folded constants own their memory (safetensors saves each once) and carry no autograd history: a slice of a
    # parameter folds into a view that would keep one, and a graph module holding it cannot be deep-copied.
    for name in set(gm._buffers) - before:
        gm.register_buffer(name, gm._buffers[name].detach().clone())
    drop_unused_attributes(gm)
    flatten_attributes(gm)
    gm.graph.lint()
    gm.recompile()
    return direct_attribute_reads(gm)
