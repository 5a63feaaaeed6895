"""``VisualMambaQuantizer``: a torchao PT2E Quantizer for the linear layers of Visual Mamba models.

It finds the quantizable linears by graph structure: a linear is quantized when its weight belongs to a module that
contains a ``vmq.selective_scan`` node (the Mamba mixer: ``in_proj``, ``x_proj``, ``dt_proj``, ``out_proj`` and their
backward / per-direction copies), or to an MLP inside a block that contains such a mixer (VMamba's ``fc1``/``fc2``).
Patch embedding, patch merging and the classifier head stay floating point. Nothing depends on layer indices or
sequence lengths.

The graph contract (what other passes and quantizers can rely on):

* ``annotate`` only annotates; it never rewrites the graph. A linear another quantizer has annotated already is left
  to it (as executorch's XNNPACK quantizer leaves annotated partitions alone).
* Each linear it quantizes carries ``node.meta["vmq_linear"]``: a :class:`QuantizedLinear` with its module path,
  role, block, model family and recipe. Calibration, optimization, lowering, saving and the report find their layers
  through it, on the node, across ``prepare_pt2e`` and ``convert_pt2e``; nothing is kept on the graph module, so
  quantizers composed with torchao's ``ComposableQuantizer`` each keep their own settings.
* SmoothQuant smoothing is part of the observers, not of the graph: with a smoothing recipe the activation observer
  outputs ``q(x / s)`` and the weight observer ``q(W * s)``, sharing one parameter ``s``. At ``convert_pt2e`` the
  activation observer writes ``div(x, s)`` before its ``quantize_per_channel``, tagged ``node.meta["vmq_smoothing"]``,
  and the weight observer writes the integers of ``W * s``; :func:`vmq_fx.lower` folds or fuses the tagged division.

Mixed precision, as torchao / XNNPACK quantizers do it: :meth:`VisualMambaQuantizer.set_global`,
:meth:`~VisualMambaQuantizer.set_module_name` (a module path, or a pattern such as ``layers.*.mixer.dt_proj``) and
:meth:`~VisualMambaQuantizer.set_role` (``dt_proj``, ``x_proj`` ...), most specific first; ``None`` keeps a layer in
floating point. All quantized layers of a model use one recipe family (integer PTQ4VM or vector ViM-VQ).

Example:
    >>> import torch
    >>> from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    >>> from vmq_fx import VisualMambaQuantizer, recipes
    >>> from vmq_fx.models import create_model
    >>> gm = torch.export.export(create_model("vim_fm_tiny").eval(), (torch.randn(2, 1, 28, 28),)).module()
    >>> quantizer = VisualMambaQuantizer(recipes.ptq4vm(4, 4)).set_role("dt_proj", recipes.ptq4vm(8, 8))
    >>> prepared = prepare_pt2e(gm, quantizer)
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass

import torch
from torch import fx
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, Quantizer

from vmq_fx.pt2e.observers.fake_quantize import SMOOTHING_META
from vmq_fx.pt2e.recipes import PTQ4VMRecipe, Recipe, family_of

__all__ = ["LAYER_META", "ROLES", "SMOOTHING_META", "QuantizedLinear", "QuantizerSpec", "VisualMambaQuantizer",
           "find_quantizable_linears", "quantized_linears"]

LAYER_META = "vmq_linear"  # node.meta key of a QuantizedLinear
ROLES = ("in_proj", "x_proj", "dt_proj", "out_proj", "fc1", "fc2")


@dataclass(frozen=True)
class QuantizedLinear:
    """A linear node chosen for quantization (``node.meta["vmq_linear"]``)."""

    name: str  # module path of the weight, e.g. "layers.3.mixer.x_proj_b"
    role: str  # in_proj, x_proj, dt_proj, out_proj, fc1, fc2 (direction suffixes removed)
    block: str  # module path of the block that holds it, e.g. "layers.3"
    family: str  # "vim" or "vmamba"
    recipe: Recipe | None = None  # how it is quantized


@dataclass(frozen=True)
class QuantizerSpec:
    """What a :class:`VisualMambaQuantizer` was configured with: a recipe per layer, most specific first."""

    global_recipe: Recipe | None
    module_names: tuple[tuple[str, Recipe | None], ...] = ()
    roles: tuple[tuple[str, Recipe | None], ...] = ()

    def recipe_for(self, layer: QuantizedLinear) -> Recipe | None:
        for pattern, recipe in self.module_names:
            if layer.name == pattern or fnmatch.fnmatchcase(layer.name, pattern):
                return recipe
        for role, recipe in self.roles:
            if layer.role == role:
                return recipe
        return self.global_recipe

    def recipes(self) -> list[Recipe]:
        found = [self.global_recipe] + [r for _, r in self.module_names + self.roles]
        return [r for r in found if r is not None]


def _module_path_of_weight(node: fx.Node) -> str | None:
    w = node.args[1] if len(node.args) > 1 else None
    if isinstance(w, fx.Node) and w.op == "get_attr" and str(w.target).endswith(".weight"):
        return str(w.target)[: -len(".weight")]
    return None


def _stack_paths(node: fx.Node) -> list[tuple[str, type]]:
    stack = node.meta.get("nn_module_stack") or {}
    return [(path, cls) for path, cls in stack.values()]


def _class_name(cls) -> str:
    """Bare class name; nn_module_stack holds fully qualified strings ("vmq_fx.models.vmamba.SS2D") or classes."""
    name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
    return name.rsplit(".", 1)[-1]


def _role(path: str) -> str:
    parts = path.split(".")
    last = parts[-1]
    if last.isdigit():  # per-direction copies: x_proj.0 .. x_proj.3
        last = parts[-2]
    return last[:-2] if last.endswith("_b") else last


def find_quantizable_linears(gm: fx.GraphModule) -> list[tuple[fx.Node, QuantizedLinear]]:
    """The linear nodes of the Mamba mixers (and of MLPs in blocks with a mixer), in graph order.

    Raises:
        ValueError: when the graph has no ``vmq.selective_scan`` node (not a Mamba model exported through vmq_fx).
    """
    scan = torch.ops.vmq.selective_scan.default
    mixers: dict[str, str] = {}  # mixer module path -> block module path
    family = "vim"
    for node in gm.graph.nodes:
        if node.target is scan:
            stack = _stack_paths(node)
            if not stack:
                raise ValueError("vmq.selective_scan node without nn_module_stack metadata: export the model with "
                                 "torch.export.export so module paths are kept")
            mixer_path, cls = stack[-1]
            block_path = stack[-2][0] if len(stack) > 1 else ""
            mixers[mixer_path] = block_path
            if _class_name(cls) == "SS2D":
                family = "vmamba"
    if not mixers:
        raise ValueError(
            "VisualMambaQuantizer: the graph has no vmq.selective_scan node, so no Mamba mixer to quantize. Export a "
            "vmq_fx model (vmq_fx.models) or adapt mamba-ssm modules first (vmq_fx.adapt_mamba_ssm)."
        )
    blocks = {b for b in mixers.values() if b}
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        path = _module_path_of_weight(node)
        if path is None:
            continue
        owner = next((m for m in mixers if path.startswith(m + ".")), None)
        if owner is not None:
            found.append((node, QuantizedLinear(path, _role(path), mixers[owner], family)))
            continue
        block = next((b for b in blocks if path.startswith(b + ".mlp.")), None)
        if block is not None:
            found.append((node, QuantizedLinear(path, _role(path), block, family)))
    return found


def quantized_linears(gm: fx.GraphModule) -> dict[str, QuantizedLinear]:
    """``{node name: layer}`` of the linears a :class:`VisualMambaQuantizer` quantized in ``gm`` (prepared,
    converted or before lowering), read from the nodes."""
    layers = {n.name: n.meta[LAYER_META] for n in gm.graph.nodes if LAYER_META in n.meta}
    if not layers:
        raise ValueError("this graph holds no linear quantized by VisualMambaQuantizer (no node carries "
                         f"meta[{LAYER_META!r}]); prepare it with prepare_pt2e(gm, VisualMambaQuantizer(recipe))")
    return layers


def _check_recipe(recipe, what: str) -> None:
    if recipe is not None and not isinstance(recipe, Recipe):
        raise TypeError(f"VisualMambaQuantizer: {what} must be a recipe (vmq_fx.pt2e.recipes) or None, got "
                        f"{type(recipe).__name__}")
    if recipe is not None:
        family_of(recipe)  # a registered family (TypeError otherwise)


class VisualMambaQuantizer(Quantizer):
    """PT2E quantizer for Vim / VMamba linears (see the module docstring for the graph contract).

    Args:
        recipe: the global recipe (see :mod:`vmq_fx.pt2e.recipes`; default ``recipes.ptq4vm(8, 8)``). ``set_global(None)``
            quantizes only what :meth:`set_module_name` / :meth:`set_role` name.

    Example:
        >>> import torch
        >>> from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, convert_pt2e
        >>> import vmq_fx
        >>> from vmq_fx.models import create_model
        >>> gm = vmq_fx.export_model(create_model("vim_fm_tiny").eval(), torch.randn(2, 1, 28, 28)).module()
        >>> prepared = prepare_pt2e(gm, vmq_fx.VisualMambaQuantizer(vmq_fx.pt2e.recipes.ptq4vm(8, 8)))
        >>> vmq_fx.calibrate(prepared, torch.randn(8, 1, 28, 28), progress=False)
        >>> quantized = convert_pt2e(prepared)
    """

    def __init__(self, recipe: Recipe | None = None):
        super().__init__()
        _check_recipe(recipe, "the global recipe")
        self.spec = QuantizerSpec(recipe if recipe is not None else PTQ4VMRecipe())

    def set_global(self, recipe: Recipe | None) -> "VisualMambaQuantizer":
        """The recipe of every layer not named otherwise (``None``: such layers stay floating point)."""
        _check_recipe(recipe, "the global recipe")
        self.spec = dataclasses.replace(self.spec, global_recipe=recipe)
        return self

    def set_module_name(self, name: str, recipe: Recipe | None) -> "VisualMambaQuantizer":
        """The recipe of the linear at module path ``name`` (``fnmatch`` patterns allowed: ``layers.*.mixer.x_proj``);
        ``None`` keeps it in floating point. Takes precedence over :meth:`set_role` and :meth:`set_global`."""
        _check_recipe(recipe, f"the recipe of {name!r}")
        self.spec = dataclasses.replace(self.spec, module_names=self.spec.module_names + ((name, recipe),))
        return self

    def set_role(self, role: str, recipe: Recipe | None) -> "VisualMambaQuantizer":
        """The recipe of every linear of a role (``in_proj``, ``x_proj``, ``dt_proj``, ``out_proj``, ``fc1``,
        ``fc2``; backward / per-direction copies included); ``None`` keeps them in floating point."""
        if role not in ROLES:
            raise ValueError(f"VisualMambaQuantizer.set_role: unknown role {role!r}; roles: {', '.join(ROLES)}")
        _check_recipe(recipe, f"the recipe of {role}")
        self.spec = dataclasses.replace(self.spec, roles=self.spec.roles + ((role, recipe),))
        return self

    def _check_one_kind(self) -> None:
        kinds = sorted({type(r).__name__ for r in self.spec.recipes()})
        if len(kinds) > 1:
            raise ValueError(f"VisualMambaQuantizer: one model mixes recipe families ({', '.join(kinds)}); use one "
                             "family per model (mixed bit widths within a family are fine)")

    def transform_for_annotation(self, model: fx.GraphModule) -> fx.GraphModule:
        return model  # annotation needs no rewrite: smoothing lives in the observers

    def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
        self._check_one_kind()
        for node, layer in find_quantizable_linears(model):
            if "quantization_annotation" in node.meta:
                continue  # another quantizer took it
            recipe = self.spec.recipe_for(layer)
            if recipe is None:
                continue
            act, weight = recipe.act_qspec(), recipe.weight_qspec()
            x, w = node.args[0], node.args[1]
            qspecs = {w: weight} if act is None else {x: act, w: weight}
            node.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map=qspecs, _annotated=True)
            node.meta[LAYER_META] = dataclasses.replace(layer, recipe=recipe)
        return model

    def validate(self, model: fx.GraphModule) -> None:
        pass
