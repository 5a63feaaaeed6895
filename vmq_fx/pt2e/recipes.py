"""Recipes: how the linears of a Visual Mamba model are quantized, and how the result is optimized.

Every recipe is a frozen dataclass with one interface (:class:`Recipe`): the quantization specs it annotates a linear
with (:meth:`Recipe.act_qspec`, :meth:`Recipe.weight_qspec`), whether it has an optimization step and which
(:attr:`Recipe.optimizer`: ``"jlss"``, ``"vimvq"`` or ``None``), and a :class:`Schedule` for that step, the one place
for the settings both optimizers share. Every recipe has a :attr:`Recipe.name` that :func:`from_name` turns back into
the same recipe: the family's short name (``ptq4vm-w4a8``, ``vimvq-2bit``) and, in brackets, the fields that differ
from the family's defaults (``ptq4vm-w4a8[alpha=0.6,steps=50]``).

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
import re
from dataclasses import dataclass, field
from typing import Literal

import torch
from torchao.quantization.pt2e.observer import MinMaxObserver
from torchao.quantization.pt2e.quantizer import QuantizationSpec

from vmq_fx.pt2e.observers import (
    PerChannelWeightFakeQuantize,
    PerTokenDynamicFakeQuantize,
    PerTokenStaticFakeQuantize,
    VectorQuantizedWeight,
)
from vmq_fx.ops.vq_linear import code_bits

__all__ = ["PTQ4VMRecipe", "Recipe", "Schedule", "VQRecipe", "from_name", "names", "per_tensor_static",
           "per_token_dynamic", "ptq4vm", "smoothquant_pts", "vimvq", "vq_convex", "vq_kmeans"]

ActGranularity = Literal["per_token_static", "per_tensor_static", "per_token_dynamic"]
LossTarget = Literal["mixer", "stream"]
StepDomain = Literal["linear", "log"]
VQMethod = Literal["kmeans", "convex", "incremental"]


@dataclass(frozen=True)
class Schedule:
    """How a recipe's block-by-block optimization runs (JLSS and ViM-VQ alike).

    Args:
        steps: optimization steps per block (``None``: the method's default: JLSS 100 on Vim and 400 on VMamba, as
            PTQ4VM; ViM-VQ 100).
        batch_size: calibration images per step (``None``: JLSS all of them, PTQ4VM's one batch; ViM-VQ 64).
        seed: seed of the mini-batch sampling.
    """

    steps: int | None = None
    batch_size: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 0):
            raise ValueError(f"Schedule: steps must be a non-negative integer, got {self.steps!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"Schedule: batch_size must be a positive integer, got {self.batch_size!r}")


@dataclass(frozen=True)
class Recipe(abc.ABC):
    """The interface of every recipe (an abstract base)."""

    schedule: Schedule = field(default_factory=Schedule)

    @property
    @abc.abstractmethod
    def optimizer(self) -> str | None:
        """``"jlss"``, ``"vimvq"`` or ``None`` (calibration only)."""

    @abc.abstractmethod
    def act_qspec(self) -> QuantizationSpec | None:
        """The spec of the linear's input (``None``: the activation stays floating point)."""

    @abc.abstractmethod
    def weight_qspec(self) -> QuantizationSpec:
        """The spec of the linear's weight."""

    @property
    def name(self) -> str:
        """A name :func:`from_name` turns back into this recipe."""
        return _name_of(self)


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
        jlss: the recipe learns smoothing scales and step sizes with JLSS after calibration (PTQ4VM) or stops there.
        learn_all_projections: JLSS also learns x_proj / dt_proj parameters (the authors' code leaves them at init).
        lr_weight, lr_act, lr_smooth: JLSS learning rates (``None``: PTQ4VM's, Vim 5e-4 / 5e-4 / 1e-2, VMamba 1e-4
            for all three; with ``step_domain="log"`` 1e-3 for all three).
        jlss_target: what JLSS's ``1 - cos`` compares: ``"stream"`` (the default: the residual stream after the
            block, what the next block reads) or ``"mixer"`` (the authors' PTQ4VM: the mixer's output; VMamba blocks
            add their residual inside). With 3 calibration seeds the stream target scored +0.22 points over the
            mixer's on vim-fm-tiny at W4A4 and was within noise of it elsewhere (``bench/results/ptq4vm_accuracy.md``);
            ``ptq4vm-w4a4[jlss_target=mixer]`` reproduces the authors' settings.
        step_domain: ``"linear"`` (PTQ4VM: Adam on the step sizes and smoothing scales themselves) or ``"log"``
            (Adam on their logarithms: an update is a relative change, the same for a step of 0.002 and of 0.2).
            Like the schedule and ``grad_clip``, ``jlss_target`` and ``step_domain`` are read from the global recipe.
        weight_decay, grad_clip: JLSS's AdamW weight decay and gradient-norm clip.
        p: exponent of the Lp error used by the range searches.
        num_candidates: candidates of the range searches.
        schedule: JLSS's steps, batch size and seed.
    """

    w_bits: int = 8
    a_bits: int = 8
    act_granularity: ActGranularity = "per_token_static"
    smooth: bool = True
    alpha: float | None = None
    jlss: bool = True
    learn_all_projections: bool = False
    lr_weight: float | None = None
    lr_act: float | None = None
    lr_smooth: float | None = None
    jlss_target: LossTarget = "stream"
    step_domain: StepDomain = "linear"
    weight_decay: float = 1e-5
    grad_clip: float = 2.0
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
        if not self.jlss and self.schedule != Schedule():
            raise ValueError("PTQ4VMRecipe: a schedule (steps, batch_size, seed) is for JLSS; this recipe has none "
                             "(jlss=False)")
        if self.jlss_target not in ("mixer", "stream"):
            raise ValueError(f"PTQ4VMRecipe: jlss_target must be 'mixer' or 'stream', got {self.jlss_target!r}")
        if self.step_domain not in ("linear", "log"):
            raise ValueError(f"PTQ4VMRecipe: step_domain must be 'linear' or 'log', got {self.step_domain!r}")
        for name in ("lr_weight", "lr_act", "lr_smooth"):
            lr = getattr(self, name)
            if lr is not None and lr < 0:
                raise ValueError(f"PTQ4VMRecipe: {name} must be >= 0, got {lr}")
        if self.p <= 0 or self.num_candidates < 1 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError("PTQ4VMRecipe: p, num_candidates and grad_clip must be positive, weight_decay >= 0")

    @property
    def optimizer(self) -> str | None:
        return "jlss" if self.jlss else None

    def learning_rates(self, family: str) -> dict[str, float]:
        """JLSS's learning rates for ``"weight"``, ``"act"`` and ``"smooth"`` (PTQ4VM's per family by default)."""
        vim = family == "vim"
        if self.step_domain == "log":
            defaults = {"weight": 1e-3, "act": 1e-3, "smooth": 1e-3}
        else:
            defaults = {"weight": 5e-4 if vim else 1e-4, "act": 5e-4 if vim else 1e-4,
                        "smooth": 1e-2 if vim else 1e-4}
        given = {"weight": self.lr_weight, "act": self.lr_act, "smooth": self.lr_smooth}
        return {k: defaults[k] if given[k] is None else given[k] for k in defaults}

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
                ch_axis=1, p=self.p, num_candidates=self.num_candidates, smooth=self.smooth),
        )


CodebookScope = Literal["layer", "block"]


@dataclass(frozen=True)
class VQRecipe(Recipe):
    """ViM-VQ weight-only vector quantization of the same linears (activations stay floating point).

    Bits per weight, all in, are the index bits plus the codebooks (float16) and the row scales (8 bits per output
    row); :func:`vmq_fx.pt2e.diagnostics.bits_per_weight` counts them on a lowered model. The defaults keep the all-in width
    within about 0.25 bits of ``bits`` on small models too: one codebook per block, of the shape
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
            ``"convex"`` (optimization, rounded to the largest ratio at the end) or ``"kmeans"`` (no optimization).
        row_scale: one scale per output row, rows clustered at unit RMS.
        lr_ratio, lr_codebook: Adam learning rates of the ratio logits and of the codebook.
        reg: weight of the one-hot regularizer ``n * mean(r (1 - r))`` at the end of a block's schedule (it grows
            linearly from 0).
        reselect_every: steps between candidate re-selections (0: never).
        confirm_start: fraction of the steps after which confirmation starts (incremental method).
        confirm_rounds: confirmation rounds; round ``r`` of ``R`` leaves ``r / R`` of the sub-vectors confirmed.
        kmeans_iters, kmeans_seed: k-means initialization.
        schedule: the optimization's steps, batch size and seed.
    """

    bits: float | None = 2
    d: int | None = None
    k: int | None = None
    codebook: CodebookScope = "block"
    codebook_budget: float = 0.125
    n: int = 4
    method: VQMethod = "incremental"
    row_scale: bool = True
    lr_ratio: float = 5e-2
    lr_codebook: float = 1e-3
    reg: float = 1e-3
    reselect_every: int = 20
    confirm_start: float = 0.3
    confirm_rounds: int = 8
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
        if self.method == "kmeans" and self.schedule != Schedule():
            raise ValueError("VQRecipe: a schedule (steps, batch_size, seed) is for the optimization; plain k-means "
                             "has none")
        if self.confirm_rounds < 1 or not 0 <= self.confirm_start < 1 or self.kmeans_iters < 0:
            raise ValueError("VQRecipe: confirm_rounds >= 1, 0 <= confirm_start < 1 and kmeans_iters >= 0")

    @property
    def optimizer(self) -> str | None:
        return None if self.method == "kmeans" else "vimvq"

    def weight_qspec(self) -> QuantizationSpec:
        return QuantizationSpec(
            dtype=torch.uint8, observer_or_fake_quant_ctr=VectorQuantizedWeight.with_args(
                d=self.d, k=self.k, bits=self.bits if self.d is None else None,
                codebook_budget=self.codebook_budget, n=self.n, row_scale=self.row_scale,
                kmeans_iters=self.kmeans_iters, seed=self.kmeans_seed),
        )

    def act_qspec(self) -> None:
        return None


# -- the named recipes ---------------------------------------------------------------------------------------------
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


_INTEGER = {"ptq4vm": ptq4vm, "sq-pts": smoothquant_pts, "pts": pts, "per-tensor": per_tensor_static,
            "per-token-dynamic": per_token_dynamic}
_VECTOR = {"vimvq": vimvq, "vq-convex": vq_convex, "vq-kmeans": vq_kmeans}
_SCHEDULE_FIELDS = {f.name for f in dataclasses.fields(Schedule)}


def names() -> list[str]:
    """Recipe name patterns accepted by :func:`from_name`."""
    return ([f"{p}-w<W>a<A>" for p in _INTEGER] + [f"{p}-<bits>bit" for p in _VECTOR] +
            ["any of them with [field=value,...] for fields other than the family's defaults"])


def _fields(recipe: Recipe) -> dict:
    out = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe) if f.name != "schedule"}
    out.update({k: getattr(recipe.schedule, k) for k in _SCHEDULE_FIELDS})
    return out


def _name_of(recipe: Recipe) -> str:
    if isinstance(recipe, PTQ4VMRecipe):
        base_args, families, head = (recipe.w_bits, recipe.a_bits), _INTEGER, f"w{recipe.w_bits}a{recipe.a_bits}"
        skip = {"w_bits", "a_bits"}
    else:
        base_args, families, head = (recipe.bits,), _VECTOR, f"{recipe.bits:g}bit"
        skip = {"bits"}
    own = _fields(recipe)
    best = None
    for prefix, make in families.items():
        try:
            base = _fields(make(*base_args) if skip != {"bits"} or recipe.d is None else
                           make(None, d=recipe.d, k=recipe.k))
        except ValueError:
            continue
        diff = {k: v for k, v in own.items() if k not in skip and base[k] != v}
        if skip == {"bits"} and recipe.d is not None:
            diff = {"d": recipe.d, "k": recipe.k, **{k: v for k, v in diff.items() if k not in ("d", "k")}}
        if best is None or len(diff) < len(best[1]):
            best = (prefix, diff)
    prefix, diff = best
    extra = f"[{','.join(f'{k}={v!r}' for k, v in diff.items())}]" if diff else ""
    return f"{prefix}-{head}{extra}"


def from_name(name: str) -> Recipe:
    """The recipe a name stands for: ``ptq4vm-w4a8``, ``sq-pts-w8a8``, ``pts-w8a8``, ``per-tensor-w8a8``,
    ``per-token-dynamic-w4a4``, ``vimvq-2bit``, ``vq-convex-3bit``, ``vq-kmeans-1bit``, each optionally with
    ``[field=value,...]`` (``ptq4vm-w4a4[alpha=0.6,steps=50]``, ``vimvq-1bit[d=8,k=256]``).

    Example:
        >>> from_name("vimvq-2bit").bits
        2
    """
    m = re.fullmatch(r"(?P<base>[a-z0-9-]+?)-(?:w(?P<w>\d)a(?P<a>\d)|(?P<bits>[\d.]+)bit)(?:\[(?P<extra>.*)\])?",
                     name.strip())
    make = None if m is None else (_INTEGER if m.group("w") else _VECTOR).get(m.group("base"))
    if make is None:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(names())}")
    kwargs = {}
    for item in filter(None, (m.group("extra") or "").split(",")):
        key, sep, value = item.partition("=")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip()) if sep else None
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()  # a bare word: a string value
    schedule = {k: kwargs.pop(k) for k in list(kwargs) if k in _SCHEDULE_FIELDS}
    if schedule:
        kwargs["schedule"] = Schedule(**schedule)
    args = (int(m.group("w")), int(m.group("a"))) if m.group("w") else (
        None if "d" in kwargs else float(m.group("bits")),)
    try:
        return make(*args, **kwargs)
    except TypeError as e:  # an unknown field
        raise ValueError(f"recipe {name!r}: {e}") from None
