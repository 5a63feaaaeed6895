"""A lowered graph as JSON, so that loading a quantized model does not trace one.

``torch.export`` would rebuild the graph from the model's configuration (2-3 s for a 6-block model on one thread) and
``torch.export.load`` deserializes symbolic shapes and fake tensors for every node (~1.7 s). A lowered graph needs
neither to run: it is a list of ATen / vmq op calls on tensors named by attribute. This module writes that list and
its attributes' shapes and dtypes, and rebuilds an :class:`torch.fx.GraphModule` from them in a few hundred
milliseconds. Only registered ops (``torch.ops.<namespace>.<op>.<overload>``) and ``operator.getitem`` are read back:
a file cannot name arbitrary Python.

Example:
    >>> import torch
    >>> from torch import fx
    >>> class M(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = torch.nn.Parameter(torch.ones(3))
    ...     def forward(self, x):
    ...         return torch.ops.aten.mul.Tensor(x, self.w)
    >>> gm = fx.symbolic_trace(M())
    >>> text = graph_to_json(gm)
    >>> same = graph_from_json(text)
    >>> same.load_state_dict(gm.state_dict())
    <All keys matched successfully>
    >>> torch.equal(same(torch.arange(3.0)), gm(torch.arange(3.0)))
    True
"""
from __future__ import annotations

import json
import operator
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

__all__ = ["graph_from_json", "graph_to_json"]

_GETITEM = "operator.getitem"
# torch.export's .module() checks input shapes in a submodule; the rebuilt graph leaves that check to its first op.
_GUARDS = "_guards_fn"


def _encode_target(node: fx.Node) -> str:
    if node.target is operator.getitem:
        return _GETITEM
    if isinstance(node.target, torch._ops.OpOverload):
        return str(node.target)  # "aten.add.Tensor"
    raise ValueError(f"cannot store node {node.name}: {node.op} {node.target!r} is not a registered op")


def _decode_target(name: str):
    if name == _GETITEM:
        return operator.getitem
    parts = name.split(".")
    try:
        if len(parts) != 3:
            raise AttributeError("not of the form <namespace>.<op>.<overload>")
        target = getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
        if not isinstance(target, torch._ops.OpOverload):
            raise AttributeError("not an op overload")
        return target
    except (AttributeError, RuntimeError) as e:
        raise ValueError(f"the stored graph calls {name!r}, which is not a registered op here ({e})") from e


def _encode_arg(a: Any, node: fx.Node) -> Any:
    # JSON objects always wrap one of these three, so strings and numbers stay themselves.
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if isinstance(a, tuple):
        return {"tuple": [_encode_arg(b, node) for b in a]}
    if isinstance(a, list):
        return [_encode_arg(b, node) for b in a]
    if isinstance(a, dict):
        return {"dict": {str(k): _encode_arg(v, node) for k, v in a.items()}}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    raise ValueError(f"cannot store node {node.name}: an argument of type {type(a).__name__} ({a!r})")


def _decode_arg(a: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(a, list):
        return [_decode_arg(b, env) for b in a]
    if isinstance(a, dict):
        if "node" in a:
            return env[a["node"]]
        if "tuple" in a:
            return tuple(_decode_arg(b, env) for b in a["tuple"])
        return {k: _decode_arg(v, env) for k, v in a["dict"].items()}
    return a


def graph_to_json(gm: fx.GraphModule) -> str:
    """The graph of ``gm`` (nodes, pytree input / output conventions, each attribute's shape and dtype) as JSON.

    Raises:
        ValueError: a node calls something other than a registered op or ``operator.getitem``, or has an argument
            other than nodes, numbers, strings, None and containers of them.
    """
    nodes, attributes = [], {}
    params = {name for name, _ in gm.named_parameters()}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == _GUARDS:
            continue
        entry = {"op": node.op, "name": node.name}
        if node.op == "call_function":
            entry["target"] = _encode_target(node)
        elif node.op == "get_attr":
            value = gm.get_parameter(node.target) if node.target in params else gm.get_buffer(node.target)
            entry["target"] = node.target
            attributes[node.target] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                                       "parameter": node.target in params}
        elif node.op not in ("placeholder", "output"):
            raise ValueError(f"cannot store node {node.name}: {node.op} {node.target!r}")
        if node.op != "get_attr":
            entry["args"] = _encode_arg(node.args, node)
            entry["kwargs"] = _encode_arg(node.kwargs, node)
        nodes.append(entry)
    codegen = None
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None:
        codegen = {"orig_args": list(info.orig_args), "in_spec": pytree.treespec_dumps(info.in_spec),
                   "out_spec": pytree.treespec_dumps(info.out_spec)}
    return json.dumps({"nodes": nodes, "attributes": attributes, "pytree": codegen})


def graph_from_json(text: str) -> fx.GraphModule:
    """A :class:`torch.fx.GraphModule` running the graph of :func:`graph_to_json`, its attributes uninitialized
    (``torch.empty`` of the stored shapes and dtypes): load the tensors with ``load_state_dict``.

    Raises:
        ValueError: the text is not such a graph, or calls an op that is not registered in this process.
    """
    try:
        blob = json.loads(text)
        root = nn.Module()
        for name, a in blob["attributes"].items():
            owner_path, _, attr = name.rpartition(".")
            owner = root
            for part in owner_path.split(".") if owner_path else []:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            value = torch.empty(a["shape"], dtype=getattr(torch, a["dtype"]))
            if a["parameter"]:
                owner.register_parameter(attr, nn.Parameter(value, requires_grad=value.is_floating_point()))
            else:
                owner.register_buffer(attr, value)
        graph, env = fx.Graph(), {}
        for entry in blob["nodes"]:
            op = entry["op"]
            if op == "get_attr":
                target = entry["target"]
            elif op == "call_function":
                target = _decode_target(entry["target"])
            else:
                target = entry["name"] if op == "placeholder" else "output"
            args = _decode_arg(entry.get("args", []), env)
            kwargs = _decode_arg(entry.get("kwargs", {"dict": {}}), env)
            env[entry["name"]] = graph.create_node(op, target, tuple(args), kwargs, name=entry["name"])
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(f"not a stored vmq_fx graph ({type(e).__name__}: {e})") from e
    if blob["pytree"] is not None:
        p = blob["pytree"]
        graph._codegen = fx.graph._PyTreeCodeGen(fx.graph._PyTreeInfo(
            p["orig_args"], pytree.treespec_loads(p["in_spec"]), pytree.treespec_loads(p["out_spec"])))
    return fx.GraphModule(root, graph)
