"""Run a lowered (or exported) graph from C++: :class:`CppGraphModule`.

A ``torch.fx`` graph module runs its graph as Python code: every node is a line of Python, and every op an
``OpOverload`` call whose arguments and results cross between Python and C++. Inside a forward, with its caches cold,
that costs ~4-6 us a node (one more ``aten.transpose`` in each of the lowered Vim-T's 265 places took 3.8-9.3 us
apiece); the lowered Vim-T has ~1,100 nodes, and at batch 1 their calls took about a fifth of its forward.
:class:`CppGraphModule` hands the graph to a small C++ runner in vmq_fx's extension (``csrc/graph_runner.h``): the
same ops through torch's dispatcher, called with their arguments on a stack, each value freed after its last reader,
as the Python code frees it. The results are the same bits.

Why not torch's own: ``torch.compile`` of the lowered Vim-T ran 0.97x as fast as the graph module (Inductor's Python
wrapper calls the ops as the graph module does), and 0.95x with its C++ wrapper after a 13-minute compile (Intel
Xeon, one thread); TorchScript's ``torch.jit.trace`` runs it about as fast as this runner but is deprecated in
favour of those two.

The runner is for inference: it runs without autograd (the lowered ops have no backward) and reads the module's
parameters and buffers as they are when it is made. Every node must call a torch op (``OpOverload``) or take an item
of a node's tuple (``operator.getitem``); anything else is refused when it is made, naming the node, but for
``torch.export``'s check of the inputs (``_guards_fn``), which is called in Python before each run.

Example:
    >>> import torch
    >>> from vmq_fx.runtime import CppGraphModule
    >>> class Tiny(torch.nn.Module):
    ...     def forward(self, x):
    ...         return torch.nn.functional.silu(x.transpose(1, 2)) + 1
    >>> x = torch.randn(2, 3, 4)
    >>> gm = torch.export.export(Tiny(), (x,)).module()
    >>> torch.equal(CppGraphModule(gm)(x), gm(x))
    True
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

__all__ = ["CppGraphModule", "cpp_graph"]


def _runner_class():
    from vmq_fx.ops import native

    module = native.kernels()
    if module is None:
        raise RuntimeError("vmq_fx.runtime: the C++ runner is part of vmq_fx's C++ extension, which is not loaded here "
                           "(no C++ compiler, or VMQ_FX_NATIVE=0; the log says which)")
    return module.GraphRunner


class _Program:
    """The runner's program for one graph: steps, registers and the registers each step frees."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.register: dict[fx.Node, int] = {}
        self.inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node in self.inputs:
            self.register[node] = len(self.register)
        output = next(n for n in gm.graph.nodes if n.op == "output")
        self.single_output = isinstance(output.args[0], fx.Node)
        outs = [output.args[0]] if self.single_output else list(output.args[0])
        bad = [o for o in outs if not isinstance(o, fx.Node) or o.op == "get_attr"]
        if bad:
            raise ValueError(f"vmq_fx.runtime: the graph returns {bad[0]!r}; the runner returns values that nodes "
                             "compute")
        self.steps: list[list] = []
        self.guards: list[fx.Node] = []  # torch.export's input checks: called in Python before the run
        reads: dict[fx.Node, int] = {}  # the last step that reads each register's node
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if node.op == "call_module" and node.target == "_guards_fn" and not node.users and \
                    all(a.op == "placeholder" for a in node.all_input_nodes):
                self.guards.append(node)
                continue
            if node.op != "call_function":
                raise ValueError(f"vmq_fx.runtime: node {node.name} is a {node.op}; the runner takes calls of torch "
                                 "ops (call_function) only")
            index = len(self.steps)
            for used in node.all_input_nodes:
                if used.op != "get_attr":
                    reads[used] = index
            self.register[node] = len(self.register)
            self.steps.append(self._step(node))
        self.outputs = [self.register[o] for o in outs]
        kept = set(outs)
        for node, last in reads.items():
            if node not in kept:
                self.steps[last][-1].append(self.register[node])

    def _step(self, node: fx.Node) -> list:
        if node.target is operator.getitem:
            source, index = node.args
            if not isinstance(source, fx.Node) or not isinstance(index, int):
                raise ValueError(f"vmq_fx.runtime: node {node.name} takes item {index!r} of {source!r}; the runner "
                                 "takes constant items of a node's output")
            return ["getitem", self.register[source], index, None, self.register[node], []]
        if not isinstance(node.target, torch._ops.OpOverload):
            raise ValueError(f"vmq_fx.runtime: node {node.name} calls {node.target!r}, not a torch op (OpOverload)")
        schema = node.target._schema
        args = []
        for i, argument in enumerate(schema.arguments):
            if i < len(node.args):
                value = node.args[i]
            elif argument.name in node.kwargs:
                value = node.kwargs[argument.name]
            elif argument.has_default_value():
                value = argument.default_value
            else:
                raise ValueError(f"vmq_fx.runtime: node {node.name} ({node.target}) gives no {argument.name!r}")
            args.append(self._argument(value))
        return ["op", schema.name, schema.overload_name, args, self.register[node], []]

    def _argument(self, value: Any) -> tuple:
        if isinstance(value, fx.Node):
            return ("const", operator.attrgetter(value.target)(self.gm)) if value.op == "get_attr" else \
                ("reg", self.register[value])
        if isinstance(value, (list, tuple)) and any(isinstance(v, fx.Node) for v in value):
            return ("list", [self._argument(v) for v in value])
        return ("const", list(value) if isinstance(value, tuple) else value)


class CppGraphModule(nn.Module):
    """``gm``'s graph, run by vmq_fx's C++ runner (the module docstring says why).

    Args:
        gm: a graph module whose nodes call torch ops (a lowered vmq_fx model, a ``torch.export`` program's
            ``.module()``). Its parameters and buffers are read now: make a new one after changing them.

    Raises:
        ValueError: a node is neither a torch op call nor an item of one's output (the message names it).
        RuntimeError: vmq_fx's C++ extension is not loaded.
    """

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        program = _Program(gm)
        self.graph_module = gm
        self._codegen = gm.graph._codegen
        self._single_output = program.single_output
        self.num_steps = len(program.steps)  # one per op call or getitem of the graph
        self._guards = [(getattr(gm, g.target), [program.inputs.index(a) for a in g.args]) for g in program.guards]
        self._runner = _runner_class()([tuple(step) for step in program.steps], len(program.register),
                                       len(program.inputs), program.outputs)

    def forward(self, *args):
        flat = list(self._codegen.process_inputs(*args))
        for guard, inputs in self._guards:
            guard(*(flat[i] for i in inputs))
        out = self._runner.run(flat)
        return self._codegen.process_outputs(out[0] if self._single_output else out)


def cpp_graph(model: nn.Module, example: torch.Tensor) -> CppGraphModule:
    """``model`` run by the C++ runner: a graph module (a lowered model) as it is, any other module exported first
    (:func:`vmq_fx.export.export_model` on ``example``, the batch dynamic).

    Example:
        >>> import torch
        >>> from vmq_fx.models import create_model
        >>> model = create_model("vim_fm_tiny", depth=1).eval()
        >>> fast = cpp_graph(model, torch.randn(2, 1, 28, 28))
        >>> x = torch.randn(3, 1, 28, 28)
        >>> torch.allclose(fast(x), model(x), atol=1e-5)
        True
    """
    if not isinstance(model, fx.GraphModule):
        from vmq_fx.export import export_model

        model = export_model(model, example).module()
    return CppGraphModule(model)
