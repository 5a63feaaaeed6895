"""``VisualMambaQuantizer``: a torchao PT2E Quantizer for the linear layers of Visual Mamba models, and its recipes.

It finds the quantizable linears by graph structure: a linear is quantized when its weight belongs to a module that
contains a ``vmq.selective_scan`` node (the Mamba mixer: ``in_proj``, ``x_proj``, ``dt_proj``, ``out_proj`` and their
backward / per-direction copies), or to an MLP inside a block that contains such a mixer (VMamba's ``fc1``/``fc2``).
Patch embedding, patch merging and the classifier head stay floating point. Nothing depends on layer indices or
sequence lengths.

Example:
    >>> import torch
    >>> from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    >>> from vmq_fx import VisualMambaQuantizer, recipes
    >>> from vmq_fx.models import create_model
    >>> gm = torch.export.export(create_model("vim_fm_tiny").eval(), (torch.randn(2, 1, 28, 28),)).module()
    >>> prepared = prepare_pt2e(gm, VisualMambaQuantizer(recipes.ptq4vm(w_bits=8, a_bits=8)))
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx, nn
from torchao.quantization.pt2e.observer import MinMaxObserver
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer

from vmq_fx.ops.codebook_linear import code_bits
from vmq_fx.observers import (
    PerChannelWeightFakeQuantize,
    PerTokenDynamicFakeQuantize,
    PerTokenStaticFakeQuantize,
    VectorQuantizedWeight,
)

__all__ = [
    "SMOOTH_ATTR_PREFIX",
    "PTQ4VMRecipe",
    "QuantizedLinear",
    "VQRecipe",
    "VisualMambaQuantizer",
    "find_quantizable_linears",
    "quantized_linears",
    "recipes",
]

ActGranularity = Literal["per_token_static", "per_tensor_static", "per_token_dynamic"]
VQMethod = Literal["kmeans", "convex", "incremental"]
_LAYERS_META = "vmq_quantized_linears"
SMOOTH_ATTR_PREFIX = "vmq_smooth_"  # attributes holding smoothing scales; lowering recognizes them by it


@dataclass(frozen=True)
class PTQ4VMRecipe:
    """How the linears of a Visual Mamba model are quantized (PTQ4VM and the baselines it is compared with).

    Args:
        w_bits: weight bits (2..8): symmetric per output channel on [-qmax, qmax], qmax = 2^(w_bits-1) - 1 (as the
            PTQ4VM code), Lp-searched clip.
        a_bits: activation bits (2..8): asymmetric unsigned.
        act_granularity: ``"per_token_static"`` (PTS: one step per token position), ``"per_tensor_static"``
            (one step for the whole tensor, min-max: the classic baseline) or ``"per_token_dynamic"`` (a min-max
            range per image and token computed at run time: the dynamic baseline).
        smooth: insert SmoothQuant smoothing scales ``s`` (``x / s`` and ``W * s``) in front of each linear.
        alpha: SmoothQuant migration strength; ``None`` picks 0.5 for Vim and 0.65 for VMamba, as PTQ4VM.
        learn_all_projections: JLSS also learns x_proj / dt_proj parameters (the authors' code leaves them at init).
        jlss: the recipe includes JLSS (``vmq_fx.quantize`` runs it; PTQ4VM) or stops after calibration.
        p: exponent of the Lp error used by the range searches.
        num_candidates: candidates of the range searches.
    """

    w_bits: int = 8
    a_bits: int = 8
    act_granularity: ActGranularity = "per_token_static"
    smooth: bool = True
    alpha: float | None = None
    learn_all_projections: bool = False
    jlss: bool = True
    p: float = 2.4
    num_candidates: int = 100

    def __post_init__(self):
        for name in ("w_bits", "a_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                raise ValueError(f"PTQ4VMRecipe: {name} must be an integer in 2..8, got {bits!r}")
        if self.act_granularity not in ("per_token_static", "per_tensor_static", "per_token_dynamic"):
            raise ValueError(f"PTQ4VMRecipe: unknown act_granularity {self.act_granularity!r}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"PTQ4VMRecipe: alpha must be in [0, 1], got {self.alpha}")
        if self.smooth and self.act_granularity != "per_token_static":
            raise ValueError("PTQ4VMRecipe: smoothing is initialized from per-token static statistics; use "
                             "smooth=False with other activation granularities")
        if self.jlss and self.act_granularity != "per_token_static":
            raise ValueError("PTQ4VMRecipe: JLSS learns per-token static step sizes; use jlss=False with "
                             f"{self.act_granularity}")
        if self.p <= 0 or self.num_candidates < 1:
            raise ValueError("PTQ4VMRecipe: p and num_candidates must be positive")

    @property
    def name(self) -> str:
        kind = {"per_tensor_static": "per-tensor", "per_token_dynamic": "per-token-dynamic",
                "per_token_static": ("ptq4vm" if self.jlss else "sq-pts") if self.smooth else "pts"}[
            self.act_granularity]
        return f"{kind}-w{self.w_bits}a{self.a_bits}"

    def weight_qspec(self) -> QuantizationSpec:
        qmax = 2 ** (self.w_bits - 1) - 1
        return QuantizationSpec(
            dtype=torch.int8, quant_min=-qmax, quant_max=qmax, qscheme=torch.per_channel_symmetric, ch_axis=0,
            observer_or_fake_quant_ctr=PerChannelWeightFakeQuantize.with_args(
                ch_axis=0, p=self.p, num_candidates=self.num_candidates),
        )

    def act_qspec(self) -> QuantizationSpec:
        qmax = 2**self.a_bits - 1
        if self.act_granularity == "per_token_dynamic":
            return QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=qmax, qscheme=torch.per_channel_affine,
                                    is_dynamic=True, observer_or_fake_quant_ctr=PerTokenDynamicFakeQuantize)
        if self.act_granularity == "per_tensor_static":
            return QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=qmax, qscheme=torch.per_tensor_affine,
                                    observer_or_fake_quant_ctr=MinMaxObserver)
        return QuantizationSpec(
            dtype=torch.uint8, quant_min=0, quant_max=qmax, qscheme=torch.per_channel_affine, ch_axis=1,
            observer_or_fake_quant_ctr=PerTokenStaticFakeQuantize.with_args(
                ch_axis=1, p=self.p, num_candidates=self.num_candidates),
        )


# (sub-vector length d, codebook size k) per bit width: log2(k) / d index bits per weight. 3 bits uses d = 2, k = 64
# rather than the paper's d = 4, k = 4096: on the small layers of the reference models a 4096-entry codebook would
# hold more entries than the layer has sub-vectors.
VQ_SHAPES = {3: (2, 64), 2: (4, 256), 1: (8, 256)}


@dataclass(frozen=True)
class VQRecipe:
    """ViM-VQ weight-only vector quantization of the same linears (activations stay floating point).

    Args:
        bits: index bits per weight, 1..3, picking ``(d, k)`` from ``VQ_SHAPES`` (3: d=2, k=64; 2: d=4, k=256;
            1: d=8, k=256). ``None`` with explicit ``d`` and ``k``.
        d, k: sub-vector length and codebook size (override ``bits``; both or neither).
        n: candidate codewords per sub-vector (the convex hull).
        method: ``"incremental"`` (ViM-VQ: convex-combination optimization with incremental confirmation),
            ``"convex"`` (optimization, rounded to the largest ratio at the end) or ``"kmeans"`` (no optimization).
        row_scale: one float16 scale per output row, rows clustered at unit RMS.
        steps: optimization steps per block.
        batch_size: calibration images per step.
        lr_ratio, lr_codebook: Adam learning rates of the ratio logits and of the codebook.
        reg: weight of the one-hot regularizer ``n * mean(r (1 - r))`` at the end of a block's schedule (it grows
            linearly from 0).
        reselect_every: steps between candidate re-selections (0: never).
        confirm_start: fraction of the steps after which confirmation starts (incremental method).
        confirm_rounds: confirmation rounds; round ``r`` of ``R`` leaves ``r / R`` of the sub-vectors confirmed.
        kmeans_iters, seed: k-means initialization.
    """

    bits: int | None = 2
    d: int | None = None
    k: int | None = None
    n: int = 4
    method: VQMethod = "incremental"
    row_scale: bool = True
    steps: int = 100
    batch_size: int = 64
    lr_ratio: float = 5e-2
    lr_codebook: float = 1e-3
    reg: float = 1e-3
    reselect_every: int = 20
    confirm_start: float = 0.3
    confirm_rounds: int = 8
    kmeans_iters: int = 25
    seed: int = 0

    def __post_init__(self):
        if (self.d is None) != (self.k is None):
            raise ValueError("VQRecipe: give both d and k, or neither (then bits picks them)")
        if self.d is None:
            if self.bits not in VQ_SHAPES:
                raise ValueError(f"VQRecipe: bits must be 1, 2 or 3 without an explicit (d, k), got {self.bits!r}")
            d, k = VQ_SHAPES[self.bits]
            object.__setattr__(self, "d", d)
            object.__setattr__(self, "k", k)
        if self.d < 1 or self.k < 2 or not 1 <= self.n <= self.k:
            raise ValueError(f"VQRecipe: need d >= 1, k >= 2 and 1 <= n <= k, got d={self.d}, k={self.k}, n={self.n}")
        if self.method not in ("kmeans", "convex", "incremental"):
            raise ValueError(f"VQRecipe: method must be kmeans, convex or incremental, got {self.method!r}")
        if self.steps < 0 or self.batch_size < 1 or self.confirm_rounds < 1 or not 0 <= self.confirm_start < 1:
            raise ValueError("VQRecipe: steps >= 0, batch_size >= 1, confirm_rounds >= 1 and 0 <= confirm_start < 1")

    @property
    def index_bits(self) -> float:
        """Bits per weight spent on codeword indices (codebooks and row scales not included)."""
        return code_bits(self.k) / self.d

    @property
    def name(self) -> str:
        prefix = {"incremental": "vimvq", "convex": "vq-convex", "kmeans": "vq-kmeans"}[self.method]
        return f"{prefix}-{self.index_bits:g}bit"

    def weight_qspec(self) -> QuantizationSpec:
        return QuantizationSpec(
            dtype=torch.uint8, observer_or_fake_quant_ctr=VectorQuantizedWeight.with_args(
                d=self.d, k=self.k, n=self.n, row_scale=self.row_scale, kmeans_iters=self.kmeans_iters,
                seed=self.seed),
        )

    def act_qspec(self) -> None:
        return None

    @property
    def smooth(self) -> bool:  # read by the quantizer; VQ inserts no smoothing
        return False


class recipes:  # noqa: N801 - a namespace, used as ``recipes.ptq4vm(...)``
    """Named recipes."""

    @staticmethod
    def ptq4vm(w_bits: int = 8, a_bits: int = 8, **kwargs) -> PTQ4VMRecipe:
        """PTQ4VM: per-token static activations, smoothing, Lp init; learn with :func:`vmq_fx.jlss`."""
        return PTQ4VMRecipe(w_bits=w_bits, a_bits=a_bits, **kwargs)

    @staticmethod
    def smoothquant_pts(w_bits: int = 8, a_bits: int = 8, **kwargs) -> PTQ4VMRecipe:
        """Baseline: SmoothQuant + per-token static, no JLSS."""
        return PTQ4VMRecipe(w_bits=w_bits, a_bits=a_bits, jlss=False, **kwargs)

    @staticmethod
    def per_token_dynamic(w_bits: int = 8, a_bits: int = 8, **kwargs) -> PTQ4VMRecipe:
        """Baseline: per-token dynamic min-max activations (a reduction per image at run time), no smoothing."""
        return PTQ4VMRecipe(w_bits=w_bits, a_bits=a_bits, act_granularity="per_token_dynamic", smooth=False,
                            jlss=False, **kwargs)

    @staticmethod
    def per_tensor_static(w_bits: int = 8, a_bits: int = 8, **kwargs) -> PTQ4VMRecipe:
        """Baseline: per-tensor static min-max activations, no smoothing."""
        return PTQ4VMRecipe(w_bits=w_bits, a_bits=a_bits, act_granularity="per_tensor_static", smooth=False,
                            jlss=False, **kwargs)

    @staticmethod
    def vimvq(bits: int = 2, **kwargs) -> VQRecipe:
        """ViM-VQ: k-means init, convex-combination optimization, incremental confirmation; run
        :func:`vmq_fx.vector_quantize`."""
        return VQRecipe(bits=bits, method="incremental", **kwargs)

    @staticmethod
    def vq_convex(bits: int = 2, **kwargs) -> VQRecipe:
        """Ablation: convex-combination optimization, every sub-vector rounded to its largest ratio at the end."""
        return VQRecipe(bits=bits, method="convex", **kwargs)

    @staticmethod
    def vq_kmeans(bits: int = 2, **kwargs) -> VQRecipe:
        """Baseline: plain k-means VQ (each sub-vector to its nearest codeword, no optimization)."""
        return VQRecipe(bits=bits, method="kmeans", **kwargs)

    _BY_PREFIX = {"ptq4vm": "ptq4vm", "sq-pts": "smoothquant_pts", "per-tensor": "per_tensor_static",
                  "per-token-dynamic": "per_token_dynamic", "vimvq": "vimvq", "vq-convex": "vq_convex",
                  "vq-kmeans": "vq_kmeans"}

    @staticmethod
    def names() -> list[str]:
        """Recipe name patterns accepted by :meth:`from_name`."""
        return [f"{p}-w<W>a<A>" for p in ("ptq4vm", "sq-pts", "per-tensor", "per-token-dynamic")] + [
            f"{p}-<1|2|3>bit" for p in ("vimvq", "vq-convex", "vq-kmeans")]

    @staticmethod
    def from_name(name: str, **kwargs) -> PTQ4VMRecipe | VQRecipe:
        """A recipe from its command-line name: ``ptq4vm-w4a8``, ``sq-pts-w8a8``, ``per-tensor-w8a8``,
        ``per-token-dynamic-w4a4``, ``vimvq-2bit``, ``vq-convex-3bit``, ``vq-kmeans-1bit``.

        Example:
            >>> recipes.from_name("vimvq-2bit").k
            256
        """
        m = re.fullmatch(r"(.+)-w(\d)a(\d)", name) or re.fullmatch(r"(.+)-(\d)bit", name)
        if not m or m.group(1) not in recipes._BY_PREFIX:
            raise ValueError(f"unknown recipe {name!r}; known: {', '.join(recipes.names())}")
        make = getattr(recipes, recipes._BY_PREFIX[m.group(1)])
        bits = [int(b) for b in m.groups()[1:]]
        is_vq = m.group(1).startswith(("vimvq", "vq-"))
        if is_vq != (len(bits) == 1):
            raise ValueError(f"unknown recipe {name!r}; known: {', '.join(recipes.names())}")
        return make(*bits, **kwargs)


@dataclass
class QuantizedLinear:
    """A linear node chosen for quantization, with what the later steps need to find its parts."""

    name: str  # module path of the weight, e.g. "layers.3.mixer.x_proj_b"
    role: str  # in_proj, x_proj, dt_proj, out_proj, fc1, fc2 (direction suffixes removed)
    block: str  # module path of the block that holds it, e.g. "layers.3"
    family: str  # "vim" or "vmamba"
    smooth_attr: str | None = None


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
    """The layers a :class:`VisualMambaQuantizer` annotated in ``gm`` (kept in ``gm.meta`` across prepare/convert)."""
    layers = gm.meta.get(_LAYERS_META)
    if not layers:
        raise ValueError("this graph was not prepared with VisualMambaQuantizer (no quantized-linear table in meta)")
    return layers


def _insert_smoothing(gm: fx.GraphModule, node: fx.Node, layer: QuantizedLinear, index: int) -> None:
    """x -> x / s and W -> W * s in front of ``node``, with s = 1 until calibration sets it."""
    x, w = node.args[0], node.args[1]
    attr = f"{SMOOTH_ATTR_PREFIX}{index}"
    gm.register_parameter(attr, nn.Parameter(torch.ones(w.meta["val"].shape[1])))
    with gm.graph.inserting_before(node):
        s = gm.graph.get_attr(attr)
        x_s = gm.graph.call_function(torch.ops.aten.div.Tensor, (x, s))
        w_s = gm.graph.call_function(torch.ops.aten.mul.Tensor, (w, s))
    for new, like in ((s, w), (x_s, x), (w_s, w)):
        new.meta["val"] = like.meta.get("val")
        new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    node.args = (x_s, w_s) + tuple(node.args[2:])
    layer.smooth_attr = attr


class VisualMambaQuantizer(Quantizer):
    """PT2E quantizer for Vim / VMamba linears: per-channel symmetric weights, per-token static activations.

    Composes with other torchao quantizers (``ComposableQuantizer``): it only annotates the linears it owns and
    leaves nodes that another quantizer annotated alone.

    Args:
        recipe: a :class:`PTQ4VMRecipe` or a :class:`VQRecipe` (see :class:`recipes`).

    Example:
        >>> import torch
        >>> from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, convert_pt2e
        >>> import vmq_fx
        >>> from vmq_fx.models import create_model
        >>> gm = torch.export.export(create_model("vim_fm_tiny").eval(), (torch.randn(2, 1, 28, 28),)).module()
        >>> prepared = prepare_pt2e(gm, vmq_fx.VisualMambaQuantizer(vmq_fx.recipes.ptq4vm(8, 8)))
        >>> vmq_fx.calibrate(prepared, torch.randn(8, 1, 28, 28))
        >>> quantized = convert_pt2e(prepared)
    """

    def __init__(self, recipe: PTQ4VMRecipe | VQRecipe | None = None):
        super().__init__()
        self.recipe = recipe or PTQ4VMRecipe()

    def transform_for_annotation(self, model: fx.GraphModule) -> fx.GraphModule:
        found = find_quantizable_linears(model)
        table = {}
        for i, (node, layer) in enumerate(found):
            if self.recipe.smooth:
                _insert_smoothing(model, node, layer, i)
            table[node.name] = layer
        model.graph.lint()
        model.recompile()
        model.meta[_LAYERS_META] = table
        model.meta["vmq_recipe"] = self.recipe
        return model

    def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
        table = model.meta.get(_LAYERS_META, {})
        act, weight = self.recipe.act_qspec(), self.recipe.weight_qspec()
        for node in model.graph.nodes:
            if node.name not in table or "quantization_annotation" in node.meta:
                continue
            x, w = node.args[0], node.args[1]
            qspecs = {w: weight} if act is None else {x: act, w: weight}
            node.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map=qspecs, _annotated=True)
        return model

    def validate(self, model: fx.GraphModule) -> None:
        pass
