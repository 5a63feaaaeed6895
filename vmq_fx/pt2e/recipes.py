"""Recipes: how each linear of a Visual Mamba model is quantized.

A recipe is a per-layer spec, like torchao's ``QuantizationConfig``: a frozen dataclass that gives the quantization
specs a linear is annotated with (:meth:`Recipe.act_qspec`, :meth:`Recipe.weight_qspec`) and says whether the layer
takes part in its family's optimization after calibration (:attr:`Recipe.optimizes`). How that optimization runs
(steps, learning rates, loss target) is not in the recipe: it is the run-level config passed to the optimization
(:class:`~vmq_fx.pt2e.jlss.JLSSConfig` for :func:`vmq_fx.jlss`, :class:`~vmq_fx.pt2e.vq.VQConfig` for
:func:`vmq_fx.vector_quantize`, either for :func:`vmq_fx.quantize`).

Recipe families are registered (:func:`register_recipe`), as executorch's XNNPACK quantizer registers its annotators:
a family is one dataclass with its named presets and the optimization that follows its calibration. Names
(:attr:`Recipe.name`, :func:`from_name`) go through the registry: the preset's name, the bit widths
(``ptq4vm-w4a8``, ``vimvq-2bit``) and, in brackets, the fields that differ from the preset
(``ptq4vm-w4a8[alpha=0.6]``). A new family is one new module that registers itself; nothing here changes.

Example:
    >>> from vmq_fx import recipes
    >>> r = recipes.ptq4vm(4, 8, alpha=0.6)
    >>> r.name
    'ptq4vm-w4a8[alpha=0.6]'
    >>> recipes.from_name(r.name) == r
    True
"""
from __future__ import annotations

import abc
import ast
import dataclasses
import importlib
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Mapping

import torch
from torchao.quantization.pt2e.observer import MinMaxObserver
from torchao.quantization.pt2e.quantizer import QuantizationSpec

from vmq_fx.ops.vq_linear import code_bits
from vmq_fx.pt2e.rotation import ROTATIONS
from vmq_fx.pt2e.observers import (
    PerChannelWeightFakeQuantize,
    PerTokenDynamicFakeQuantize,
    PerTokenStaticFakeQuantize,
    VectorQuantizedWeight,
)

__all__ = ["RECIPE_FAMILIES", "PTQ4VMRecipe", "Recipe", "RecipeFamily", "VQRecipe", "check_field_types", "family_of",
           "from_name",
           "names", "parse_name", "per_tensor_static", "per_token_dynamic", "ptq4vm", "pts", "register_recipe",
           "smoothquant_pts", "vimvq", "vq_convex", "vq_kmeans"]

ActGranularity = Literal["per_token_static", "per_tensor_static", "per_token_dynamic"]
Rotation = Literal["none", "hadamard", "klt"]
VQMethod = Literal["kmeans", "convex", "incremental"]
CodebookScope = Literal["layer", "block"]


def _load(reference: str):
    """``"package.module:attribute"`` -> the attribute (the module is imported now)."""
    module, _, attr = reference.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class RecipeFamily:
    """A registered recipe family (see :func:`register_recipe`).

    Args:
        recipe_type: the family's recipe class.
        presets: preset name -> field values over the class's defaults (``{"sq-pts": {"jlss": False}}``).
        optimizer: ``"module:function"`` of the block-wise optimization its layers with ``recipe.optimizes`` take
            part in after calibration, called as ``function(prepared, data, config, progress=...)``; ``None``: the
            family calibrates only.
        config: ``"module:Class"`` of that optimization's run-level config (``None`` without an optimizer).
    """

    recipe_type: type
    presets: Mapping[str, Mapping[str, Any]]
    optimizer: str | None = None
    config: str | None = None

    def __post_init__(self):
        if (self.optimizer is None) != (self.config is None):
            raise ValueError(f"{self.recipe_type.__name__}: give both optimizer and config, or neither")
        if not self.presets:
            raise ValueError(f"{self.recipe_type.__name__}: a recipe family needs at least one preset")

    def optimize(self) -> Callable:
        """The optimization function (imported now)."""
        return _load(self.optimizer)

    def config_type(self) -> type:
        """The run-level config class of the optimization (imported now)."""
        return _load(self.config)


RECIPE_FAMILIES: dict[str, RecipeFamily] = {}  # recipe class name -> family


def register_recipe(*, presets: Mapping[str, Mapping[str, Any]], optimizer: str | None = None,
                    config: str | None = None):
    """Class decorator that registers a :class:`Recipe` subclass as a family (see :class:`RecipeFamily`).

    Raises:
        TypeError: the class is not a frozen dataclass derived from :class:`Recipe`.
        ValueError: a preset name is taken by another family.
    """
    def register(cls):
        if not (isinstance(cls, type) and issubclass(cls, Recipe) and dataclasses.is_dataclass(cls)
                and cls.__dataclass_params__.frozen):
            raise TypeError(f"register_recipe: {cls!r} is not a frozen dataclass derived from Recipe")
        taken = {p: name for name, f in RECIPE_FAMILIES.items() for p in f.presets if name != cls.__name__}
        clash = sorted(set(presets) & set(taken))
        if clash:
            raise ValueError(f"register_recipe: preset {clash[0]!r} of {cls.__name__} is {taken[clash[0]]}'s")
        RECIPE_FAMILIES[cls.__name__] = RecipeFamily(cls, dict(presets), optimizer, config)
        return cls
    return register


def family_of(recipe: Recipe | type) -> RecipeFamily:
    """The registered family of a recipe (or recipe class).

    Raises:
        TypeError: its class is not registered.
    """
    cls = recipe if isinstance(recipe, type) else type(recipe)
    family = RECIPE_FAMILIES.get(cls.__name__)
    if family is None or family.recipe_type is not cls:
        raise TypeError(f"{cls.__name__} is not a registered recipe family (vmq_fx.pt2e.recipes.register_recipe)")
    return family


@dataclass(frozen=True)
class Recipe(abc.ABC):
    """The interface of every recipe family (an abstract base).

    A family says how its names show the bit widths: :attr:`head_pattern` (a regular expression with named groups)
    matches that part of a name, :meth:`head` writes it, :meth:`head_fields` turns a match back into fields.
    """

    head_pattern: ClassVar[str]
    example_head: ClassVar[str] = "<bits>"  # how names() shows the head

    @abc.abstractmethod
    def act_qspec(self) -> QuantizationSpec | None:
        """The spec of the linear's input (``None``: the activation stays floating point)."""

    @abc.abstractmethod
    def weight_qspec(self) -> QuantizationSpec:
        """The spec of the linear's weight."""

    @property
    def optimizes(self) -> bool:
        """Whether the layer takes part in its family's optimization after calibration."""
        return False

    @abc.abstractmethod
    def head(self) -> str:
        """The bit-width part of the name (``w4a8``, ``2bit``)."""

    @classmethod
    @abc.abstractmethod
    def head_fields(cls, match: re.Match, extra: Mapping[str, Any]) -> dict[str, Any]:
        """The fields a :attr:`head_pattern` match stands for (``extra``: the fields given in brackets)."""

    def bracketed_first(self) -> tuple[str, ...]:
        """Fields always written in brackets, first (those the head cannot show)."""
        return ()

    @property
    def name(self) -> str:
        """A name :func:`from_name` turns back into this recipe."""
        family = family_of(self)
        own = _fields(self)
        head = self.head()
        match = re.fullmatch(type(self).head_pattern, head)
        forced = {k: own[k] for k in self.bracketed_first()}
        head_fields = type(self).head_fields(match, forced)
        best = None
        for preset, values in family.presets.items():
            try:
                base = _fields(type(self)(**{**values, **head_fields, **forced}))
            except (TypeError, ValueError):
                continue
            diff = {k: v for k, v in own.items() if k not in head_fields and k not in forced and base[k] != v}
            if best is None or len(diff) < len(best[1]):
                best = (preset, diff)
        if best is None:
            raise ValueError(f"{type(self).__name__}: no preset of the family fits {head}")
        preset, diff = best
        diff = {**forced, **diff}
        extra = f"[{','.join(f'{k}={v!r}' for k, v in diff.items())}]" if diff else ""
        return f"{preset}-{head}{extra}"


def _fields(recipe: Recipe) -> dict[str, Any]:
    return {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)}


def names() -> list[str]:
    """Recipe name patterns accepted by :func:`from_name`."""
    out = []
    for family in RECIPE_FAMILIES.values():
        out += [f"{preset}-{family.recipe_type.example_head}" for preset in family.presets]
    return out + ["any of them with [field=value,...] for fields other than the preset's"]


def _bracket_fields(text: str | None) -> dict[str, Any]:
    fields = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        try:
            fields[key.strip()] = ast.literal_eval(value.strip()) if sep else None
        except (ValueError, SyntaxError):
            fields[key.strip()] = value.strip()  # a bare word: a string value
    return fields


def _fits(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def check_field_types(cls: type, values: Mapping[str, Any]) -> None:
    """Refuse a value whose type does not fit its field of the dataclass ``cls``, in one line that names the field
    (``ptq4vm-w4a4[alpha=abc]``: ``alpha='abc' is not float or None``), before the class's own checks compare it.

    Raises:
        ValueError: a value of the wrong type.
    """
    hints = typing.get_type_hints(cls)
    own = {f.name for f in dataclasses.fields(cls)}
    for name, value in values.items():
        if name in own and not _fits(value, hints[name]):
            raise ValueError(f"{cls.__name__}: {name}={value!r} is not {_describe(hints[name])}")


def parse_name(name: str) -> tuple[RecipeFamily, dict[str, Any], dict[str, Any]]:
    """Split a name into its family, the recipe's fields and the bracketed fields that are not the recipe's (run-level
    settings such as ``steps``; :func:`vmq_fx.pt2e.flow.method_from_name` gives them to the family's config).

    Raises:
        ValueError: no family has this preset and head.
    """
    m = re.fullmatch(r"(?P<preset>[a-z0-9-]+?)-(?P<head>[^-\[]+)(?:\[(?P<extra>.*)\])?", name.strip())
    for family in ([] if m is None else RECIPE_FAMILIES.values()):
        head = re.fullmatch(family.recipe_type.head_pattern, m.group("head"))
        if m.group("preset") in family.presets and head:
            extra = _bracket_fields(m.group("extra"))
            own = {f.name for f in dataclasses.fields(family.recipe_type)}
            fields = {**family.presets[m.group("preset")], **family.recipe_type.head_fields(head, extra)}
            fields.update({k: v for k, v in extra.items() if k in own})
            check_field_types(family.recipe_type, fields)
            return family, fields, {k: v for k, v in extra.items() if k not in own}
    raise ValueError(f"unknown recipe {name!r}; known: {', '.join(names())}")


def from_name(name: str) -> Recipe:
    """The recipe a name stands for: ``ptq4vm-w4a8``, ``sq-pts-w8a8``, ``pts-w8a8``, ``per-tensor-w8a8``,
    ``per-token-dynamic-w4a4``, ``vimvq-2bit``, ``vq-convex-3bit``, ``vq-kmeans-1bit``, each optionally with
    ``[field=value,...]`` (``ptq4vm-w4a4[alpha=0.6]``, ``vimvq-1bit[d=8,k=256]``).

    Raises:
        ValueError: an unknown name, a field the recipe does not have, or a value it refuses.

    Example:
        >>> from_name("vimvq-2bit").bits
        2
    """
    family, fields, other = parse_name(name)
    if other:
        raise ValueError(f"recipe {name!r}: {family.recipe_type.__name__} has no field {sorted(other)[0]!r}"
                         + (f" (a setting of the optimization: {family.config.split(':')[1]})" if family.config
                            else ""))
    return family.recipe_type(**fields)


@register_recipe(
    presets={"ptq4vm": {}, "sq-pts": {"jlss": False}, "pts": {"smooth": False, "jlss": False},
             "per-tensor": {"act_granularity": "per_tensor_static", "smooth": False, "jlss": False},
             "per-token-dynamic": {"act_granularity": "per_token_dynamic", "smooth": False, "jlss": False},
             "hadamard-pts": {"rotation": "hadamard", "smooth": False, "jlss": False},
             "klt-pts": {"rotation": "klt", "smooth": False, "jlss": False},
             "klt-sq-pts": {"rotation": "klt", "jlss": False},
             "outlier-pts": {"outlier_fraction": 1 / 32, "smooth": False, "jlss": False},
             "outlier-sq-pts": {"outlier_fraction": 1 / 32, "jlss": False}},
    optimizer="vmq_fx.pt2e.jlss:jlss", config="vmq_fx.pt2e.jlss:JLSSConfig")
@dataclass(frozen=True)
class PTQ4VMRecipe(Recipe):
    """PTQ4VM (per-token static activations, SmoothQuant smoothing, JLSS) and the baselines it is compared with.

    Args:
        w_bits: weight bits (2..8): symmetric per output channel on [-qmax, qmax], qmax = 2^(w_bits-1) - 1 (as the
            PTQ4VM code), Lp-searched clip.
        a_bits: activation bits (2..8): asymmetric unsigned.
        act_granularity: ``"per_token_static"`` (PTS: one step per token position), ``"per_tensor_static"``
            (one step for the whole tensor, min-max: the classic baseline) or ``"per_token_dynamic"`` (a min-max
            range per image and token computed at run time: the dynamic baseline).
        smooth: SmoothQuant smoothing scales ``s``: the linear computes ``q(x / s) @ q(W * s)^T``.
        alpha: SmoothQuant migration strength; ``None`` picks 0.5 for Vim and 0.65 for VMamba, as PTQ4VM.
        jlss: the layer's smoothing scales and step sizes are learned by JLSS after calibration (PTQ4VM); its
            settings are a :class:`~vmq_fx.pt2e.jlss.JLSSConfig`.
        rotation: an orthogonal rotation ``R`` of the (smoothed) input, MambaQuant-style
            (:mod:`vmq_fx.pt2e.rotation`): the linear computes ``q((x / s) @ R) @ q((W * s) @ R)^T``. ``"hadamard"``
            (fixed), ``"klt"`` (eigenvectors of the calibration inputs, then Hadamard) or ``"none"``. Per-token
            static activations only. ``R`` is folded into the weight; the lowered model rotates the input in floating
            point before the integer linear: a KLT rotation by a matmul with ``R / s[:, None]``, a Hadamard one by
            ``vmq::hadamard_transform`` (the fast Walsh-Hadamard transform) after ``x / s`` (folded into the norm
            weight for inputs that are a norm's output).
        outlier_fraction: OuroMamba-style outlier channels: this fraction of each linear's input channels (at least
            one when positive), those with the largest calibration max|x| (after smoothing), keeps 8-bit activations
            with their own per-token steps; the other channels' steps no longer have to reach them. The lowered linear
            is two integer linears (the other channels at ``a_bits``, the outlier channels at 8 bits). ``0``: none.
        p: exponent of the Lp error used by the range searches.
        num_candidates: candidates of the range searches.
    """

    head_pattern: ClassVar[str] = r"w(?P<w>\d)a(?P<a>\d)"
    example_head: ClassVar[str] = "w<W>a<A>"

    w_bits: int = 8
    a_bits: int = 8
    act_granularity: ActGranularity = "per_token_static"
    smooth: bool = True
    alpha: float | None = None
    jlss: bool = True
    rotation: Rotation = "none"
    outlier_fraction: float = 0.0
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
        if self.rotation not in ROTATIONS:
            raise ValueError(f"PTQ4VMRecipe: rotation must be one of {', '.join(ROTATIONS)}, got {self.rotation!r}")
        if self.rotation != "none" and self.act_granularity != "per_token_static":
            raise ValueError(f"PTQ4VMRecipe: rotations are fitted with per-token static statistics; use "
                             f"rotation='none' with {self.act_granularity}")
        if not 0.0 <= self.outlier_fraction < 0.5:
            raise ValueError(f"PTQ4VMRecipe: outlier_fraction must be in [0, 0.5), got {self.outlier_fraction}")
        if self.outlier_fraction and (self.act_granularity != "per_token_static" or self.rotation != "none"):
            raise ValueError("PTQ4VMRecipe: outlier channels need per-token static activations without a rotation (a "
                             "rotation spreads the outliers over every channel)")
        if self.p <= 0 or self.num_candidates < 1:
            raise ValueError("PTQ4VMRecipe: p and num_candidates must be positive")

    @property
    def optimizes(self) -> bool:
        return self.jlss

    def head(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}"

    @classmethod
    def head_fields(cls, match, extra) -> dict[str, Any]:
        return {"w_bits": int(match.group("w")), "a_bits": int(match.group("a"))}

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
                ch_axis=1, p=self.p, num_candidates=self.num_candidates, smooth=self.smooth, rotation=self.rotation,
                outlier_fraction=self.outlier_fraction),
        )


@register_recipe(presets={"vimvq": {"method": "incremental"}, "vq-convex": {"method": "convex"},
                          "vq-kmeans": {"method": "kmeans"}},
                 optimizer="vmq_fx.pt2e.vq:vector_quantize", config="vmq_fx.pt2e.vq:VQConfig")
@dataclass(frozen=True)
class VQRecipe(Recipe):
    """ViM-VQ weight-only vector quantization of the same linears (activations stay floating point).

    Bits per weight, all in, are the index bits plus the codebooks (float16) and the row scales (8 bits per output
    row); :func:`vmq_fx.pt2e.diagnostics.bits_per_weight` counts them on a lowered model. The defaults keep the
    all-in width within about 0.25 bits of ``bits`` on small models too: one codebook per block, of the shape
    :func:`~vmq_fx.pt2e.observers.codebook.codebook_shape` picks for the block's size (a Vim-T block at 2 bits: d = 4,
    k = 256; a 28x28 reference model's block: d = 2, k = 16).

    Args:
        bits: index bits per weight, 1..3 (with automatic shapes), or ``None`` with explicit ``d`` and ``k`` (then
            it is ``log2(k) / d``).
        d, k: sub-vector length and codebook size for every codebook (both or neither: neither picks them per
            codebook from ``bits`` and ``codebook_budget``).
        codebook: ``"block"`` (the linears of a block share one codebook, learned while the block is optimized) or
            ``"layer"`` (one per linear, as the ViM-VQ description).
        codebook_budget: bits per weight a codebook may cost when its shape is chosen automatically.
        n: candidate codewords per sub-vector (the convex hull).
        method: ``"incremental"`` (ViM-VQ: convex-combination optimization with incremental confirmation),
            ``"convex"`` (optimization, rounded to the largest ratio at the end) or ``"kmeans"`` (no optimization);
            the optimization's settings are a :class:`~vmq_fx.pt2e.vq.VQConfig`.
        row_scale: one scale per output row, rows clustered at unit RMS.
        kmeans_iters, kmeans_seed: k-means initialization.
    """

    head_pattern: ClassVar[str] = r"(?P<bits>\d+(?:\.\d+)?)bit"
    example_head: ClassVar[str] = "<bits>bit"

    bits: float | None = 2
    d: int | None = None
    k: int | None = None
    codebook: CodebookScope = "block"
    codebook_budget: float = 0.125
    n: int = 4
    method: VQMethod = "incremental"
    row_scale: bool = True
    kmeans_iters: int = 25
    kmeans_seed: int = 0

    def __post_init__(self):
        if (self.d is None) != (self.k is None):
            raise ValueError("VQRecipe: give both d and k, or neither (then bits picks them per codebook)")
        if self.d is None:
            if self.bits not in (1, 2, 3):
                raise ValueError(f"VQRecipe: bits must be 1, 2 or 3 without an explicit (d, k), got {self.bits!r}")
            object.__setattr__(self, "bits", int(self.bits))
        else:
            if self.d < 1 or self.k < 2 or not 1 <= self.n <= self.k:
                raise ValueError(f"VQRecipe: need d >= 1, k >= 2 and 1 <= n <= k, got d={self.d}, k={self.k}, "
                                 f"n={self.n}")
            index_bits = round(code_bits(self.k) / self.d, 4)
            if self.bits is not None and abs(float(self.bits) - index_bits) > 1e-3:
                raise ValueError(f"VQRecipe: d={self.d}, k={self.k} spend {index_bits:g} bits per weight, not bits="
                                 f"{self.bits}; give bits=None with an explicit (d, k)")
            object.__setattr__(self, "bits", int(index_bits) if index_bits == int(index_bits) else index_bits)
        if self.codebook not in ("layer", "block"):
            raise ValueError(f"VQRecipe: codebook must be 'layer' or 'block', got {self.codebook!r}")
        if self.codebook_budget <= 0:
            raise ValueError(f"VQRecipe: codebook_budget must be positive, got {self.codebook_budget}")
        if not 1 <= self.n <= 256:
            raise ValueError(f"VQRecipe: n must be in 1..256, got {self.n}")
        if self.method not in ("kmeans", "convex", "incremental"):
            raise ValueError(f"VQRecipe: method must be kmeans, convex or incremental, got {self.method!r}")
        if self.kmeans_iters < 0:
            raise ValueError(f"VQRecipe: kmeans_iters must be >= 0, got {self.kmeans_iters}")

    @property
    def optimizes(self) -> bool:
        return self.method != "kmeans"

    def head(self) -> str:
        return f"{self.bits:g}bit"

    @classmethod
    def head_fields(cls, match, extra) -> dict[str, Any]:
        return {"bits": None if "d" in extra else float(match.group("bits"))}

    def bracketed_first(self) -> tuple[str, ...]:
        return () if self.d is None else ("d", "k")

    def weight_qspec(self) -> QuantizationSpec:
        return QuantizationSpec(
            dtype=torch.uint8, observer_or_fake_quant_ctr=VectorQuantizedWeight.with_args(
                d=self.d, k=self.k, bits=self.bits if self.d is None else None,
                codebook_budget=self.codebook_budget, n=self.n, row_scale=self.row_scale,
                kmeans_iters=self.kmeans_iters, seed=self.kmeans_seed),
        )

    def act_qspec(self) -> None:
        return None


# -- the presets as functions --------------------------------------------------------------------------------------
def ptq4vm(w_bits: int = 8, a_bits: int = 8, **kwargs) -> PTQ4VMRecipe:
    """PTQ4VM: per-token static activations, smoothing, Lp init, JLSS (:func:`vmq_fx.jlss`)."""
    return PTQ4VMRecipe(w_bits=w_bits, a_bits=a_bits, **kwargs)


def smoothquant_pts(w_bits: int = 8, a_bits: int = 8, **kwargs) -> PTQ4VMRecipe:
    """Baseline: SmoothQuant + per-token static, no JLSS."""
    return PTQ4VMRecipe(w_bits=w_bits, a_bits=a_bits, **{"jlss": False, **kwargs})


def pts(w_bits: int = 8, a_bits: int = 8, **kwargs) -> PTQ4VMRecipe:
    """Baseline: per-token static activations alone (no smoothing, no JLSS)."""
    return PTQ4VMRecipe(w_bits=w_bits, a_bits=a_bits, **{"smooth": False, "jlss": False, **kwargs})


def per_token_dynamic(w_bits: int = 8, a_bits: int = 8, **kwargs) -> PTQ4VMRecipe:
    """Baseline: per-token dynamic min-max activations (a reduction per image at run time), no smoothing."""
    return PTQ4VMRecipe(w_bits=w_bits, a_bits=a_bits, **{"act_granularity": "per_token_dynamic", "smooth": False,
                                                         "jlss": False, **kwargs})


def per_tensor_static(w_bits: int = 8, a_bits: int = 8, **kwargs) -> PTQ4VMRecipe:
    """Baseline: per-tensor static min-max activations, no smoothing."""
    return PTQ4VMRecipe(w_bits=w_bits, a_bits=a_bits, **{"act_granularity": "per_tensor_static", "smooth": False,
                                                         "jlss": False, **kwargs})


def vimvq(bits: float | None = 2, **kwargs) -> VQRecipe:
    """ViM-VQ: k-means init, convex-combination optimization, incremental confirmation
    (:func:`vmq_fx.vector_quantize`)."""
    return VQRecipe(bits=bits, **{"method": "incremental", **kwargs})


def vq_convex(bits: float | None = 2, **kwargs) -> VQRecipe:
    """Ablation: convex-combination optimization, every sub-vector rounded to its largest ratio at the end."""
    return VQRecipe(bits=bits, **{"method": "convex", **kwargs})


def vq_kmeans(bits: float | None = 2, **kwargs) -> VQRecipe:
    """Baseline: plain k-means VQ (each sub-vector to its nearest codeword, no optimization)."""
    return VQRecipe(bits=bits, **{"method": "kmeans", **kwargs})
