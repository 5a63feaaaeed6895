"""PTQ4VM's quantizers as PT2E observer / fake-quantize modules.

Each module has two phases, the way PTQ4VM works:

1. *Calibration* (``observer_enabled``): statistics are recorded, the input passes through unchanged.
2. *Fake quantization* (after :meth:`initialize`): the input is quantized and dequantized with step sizes that are
   ``nn.Parameter`` s, rounding with a straight-through estimator, so that JLSS can learn them.

SmoothQuant smoothing is part of the pair of quantizers of a linear: once :func:`vmq_fx.calibrate` has given them a
smoothing scale ``s`` (one ``nn.Parameter`` both hold), the activation quantizer works on ``x / s`` and the weight
quantizer on ``W * s``, so that the linear computes ``q(x / s) @ q(W * s)^T``.

A rotation (:mod:`vmq_fx.pt2e.rotation`) works the same way: the activation quantizer holds the orthogonal matrix
``R`` and quantizes ``(x / s) @ R``, the weight quantizer ``(W * s) @ R``; the product is unchanged in floating point.

``convert_pt2e`` then calls each module's :meth:`convert`, which writes its own nodes: for activations
``[div(x, s)] -> quantize_per_channel(axis=1) -> dequantize_per_channel`` with the learned per-token step sizes (the
division tagged ``meta["vmq_smoothing"]``; with a KLT rotation ``matmul(x, R / s[:, None])`` instead, with a
Hadamard one the division then ``vmq::hadamard_transform(x, Q_m)``, tagged ``meta["vmq_rotation"]``),
for weights ``dequantize_per_channel(axis=0)`` of the integers of ``(W * s) [@ R]``.
With outlier channels (OuroMamba-style: a few input channels kept at 8 bits) the activation writes a second, 8-bit
``quantize_per_channel -> dequantize_per_channel`` of the same input and picks it for those channels:
``where(mask, dq8, dq)``, tagged ``meta["vmq_outliers"]``.
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor, nn
from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

from vmq_fx.pt2e.observers.lp_search import RowHistograms, round_ste, search_symmetric_clips
from vmq_fx.pt2e.rotation import ROTATIONS, hadamard_factors

__all__ = ["NotCalibratedError", "PerChannelWeightFakeQuantize", "PerTokenDynamicFakeQuantize",
           "PerTokenStaticFakeQuantize", "OUTLIER_META", "ROTATION_META", "SMOOTHING_META"]


class NotCalibratedError(RuntimeError):
    """A quantizer was asked for its parameters before any calibration data went through it."""


_qd = torch.ops.quantized_decomposed
SMOOTHING_META = "vmq_smoothing"  # the node.meta key of the div(x, s) a smoothing quantizer writes at convert
ROTATION_META = "vmq_rotation"  # the node.meta key of the nodes of the rotation a rotating quantizer writes
OUTLIER_META = "vmq_outliers"  # the node.meta key of the where(mask, dq8, dq) of a quantizer with outlier channels


def _constant(model: torch.fx.GraphModule, name: str, value: Tensor, shared: bool = False) -> torch.fx.Node:
    """A ``get_attr`` of ``value`` registered as buffer ``name``; ``shared``: every quantizer that needs the same
    constant reads the one buffer the first registered."""
    if not (shared and hasattr(model, name)):
        model.register_buffer(name, value.detach().clone())
    node = model.graph.get_attr(name)
    node.meta["val"] = value
    return node


class _TwoPhaseFakeQuantize(FakeQuantizeBase):
    def __init__(self, dtype, quant_min, quant_max, qscheme, ch_axis, p, num_candidates):
        super().__init__()
        self.dtype = dtype
        self.quant_min = int(quant_min)
        self.quant_max = int(quant_max)
        self.qscheme = qscheme
        self.ch_axis = ch_axis
        self.is_dynamic = False
        self.p = p
        self.num_candidates = num_candidates
        self.scale = nn.Parameter(torch.empty(0), requires_grad=True)
        self.register_buffer("zero_point", torch.empty(0, dtype=torch.int64))
        self.disable_fake_quant()
        self.enable_observer()

    @property
    def initialized(self) -> bool:
        return self.scale.numel() > 0

    def _fake_quant(self, x: Tensor, shape: tuple[int, ...]) -> Tensor:
        if not (torch.is_grad_enabled() and (x.requires_grad or self.scale.requires_grad)) and x.dtype == torch.float32:
            # Nothing to differentiate (calibration, block captures, evaluation): torch's fused kernel computes the
            # same levels (x * (1 / scale), round half to even) bit for bit in one pass instead of eight.
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point.to(torch.int32),
                                                          shape.index(-1), self.quant_min, self.quant_max)
        scale = self.scale.reshape(shape)
        zp = self.zero_point.reshape(shape).to(x.dtype)
        # x * (1 / scale), as quantized_decomposed.quantize_per_channel computes it, so that the converted graph
        # rounds every element to the same level as this fake quantization.
        q = torch.clamp(round_ste(x * (1.0 / scale)) + zp, self.quant_min, self.quant_max)
        return (q - zp) * scale

    def calculate_qparams(self, **kwargs):
        if not self.initialized:
            raise NotCalibratedError(
                f"{type(self).__name__} has no quantization parameters: run calibration (vmq_fx.calibrate) on the "
                "prepared model before convert_pt2e"
            )
        return self.scale.detach().clone(), self.zero_point.clone()

    def _set(self, scale: Tensor, zero_point: Tensor) -> None:
        self.scale = nn.Parameter(scale.detach().float().clone())
        self.zero_point = zero_point.to(torch.int64)
        self.enable_fake_quant()
        self.disable_observer()

    def adopt(self, scale: Tensor, zero_point: Tensor) -> None:
        """Take the parameters :meth:`initialize` found in another process for the same statistics (under
        ``torchrun`` the processes share out the searches), and drop the recorded statistics it would have dropped."""
        self._drop_recorded()
        self._set(scale, zero_point)

    def _drop_recorded(self) -> None:
        """Free what :meth:`initialize` frees once it has searched."""

    def extra_repr(self) -> str:
        return (f"dtype={self.dtype}, quant_min={self.quant_min}, quant_max={self.quant_max}, ch_axis={self.ch_axis}, "
                f"initialized={self.initialized}")


class PerTokenStaticFakeQuantize(_TwoPhaseFakeQuantize):
    """Per-token static (PTS) activation quantizer: one step size and zero point per token position.

    Asymmetric, unsigned levels [0, 2^b - 1]. During calibration the input [batch, L, channels] is recorded pooled
    over images and channels for each token position: the exact per-token min / max, and a histogram of all the
    values (``bins`` bins per token, :class:`~vmq_fx.pt2e.observers.lp_search.RowHistograms`) on which the Lp (p = 2.4)
    range search is scored, each bin standing for its values at its center. Memory and search time do not grow
    with the number of calibration images (Vim-T at 224x224: 197 tokens x 2048 bins per linear); the chosen range
    is the exact search's within a fraction of a bin (tested).

    It also records the per-channel maximum of |x|, which the SmoothQuant initialization of the smoothing scales uses,
    and, for a KLT rotation that is not fitted yet, the second-moment matrix ``sum x^T x`` over all tokens.

    With ``outlier_fraction > 0`` (OuroMamba-style), :func:`vmq_fx.calibrate` picks that fraction of the input channels
    with the largest max|x| (:meth:`set_outlier_channels`); they get their own 8-bit per-token steps (the child
    quantizer :attr:`outliers`, which records and searches them) and are left out of this quantizer's ranges, so a
    few outlier channels no longer stretch every token's step.

    Example:
        >>> import torch
        >>> from vmq_fx.pt2e.observers import PerTokenStaticFakeQuantize
        >>> fq = PerTokenStaticFakeQuantize(quant_max=255)
        >>> _ = fq(torch.randn(4, 5, 8)); fq.initialize()
        >>> fq.calculate_qparams()[0].shape
        torch.Size([5])
    """

    def __init__(self, dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_channel_affine, ch_axis=1,
                 is_dynamic=False, p: float = 2.4, num_candidates: int = 100, bins: int = 2048, smooth: bool = False,
                 rotation: str = "none", outlier_fraction: float = 0.0, **kwargs):
        super().__init__(dtype, quant_min, quant_max, qscheme, ch_axis, p, num_candidates)
        if ch_axis != 1:
            raise ValueError(f"PerTokenStaticFakeQuantize: the token axis must be 1 ([batch, L, C]), got {ch_axis}")
        if rotation not in ROTATIONS:
            raise ValueError(f"PerTokenStaticFakeQuantize: rotation must be one of {ROTATIONS}, got {rotation!r}")
        self.bins = bins
        self.smoothing = smooth  # the recipe smooths: vmq_fx.calibrate gives this quantizer a scale
        self.smooth: nn.Parameter | None = None
        self.rotation = rotation  # the recipe rotates: vmq_fx.calibrate gives this quantizer its matrix
        self.register_buffer("rotation_matrix", None)
        # the odd factor Q_m of a Hadamard rotation (None for a power-of-two size): x is rotated in factored form
        self.register_buffer("hadamard_odd", None)
        self.outlier_fraction = outlier_fraction
        self.outliers: PerTokenStaticFakeQuantize | None = None  # 8-bit steps of the outlier channels
        self.register_buffer("outlier_mask", None)  # [channels] bool, True at an outlier channel
        # Off while only the channel maxima are wanted (the smoothing pass of vmq_fx.calibrate).
        self.record_distribution = True
        self.reset_statistics()

    def reset_statistics(self) -> None:
        self.min_val = self.max_val = self.channel_absmax = self.second_moment = None
        self._hist = RowHistograms(self.bins)

    @property
    def records_second_moment(self) -> bool:
        """Whether observing records ``sum x^T x`` (a KLT rotation waiting for its statistics)."""
        return self.rotation == "klt" and self.rotation_matrix is None

    def _observe(self, x: Tensor) -> None:
        if x.dim() != 3:
            raise ValueError(f"per-token quantization expects [batch, L, channels] inputs, got {tuple(x.shape)}")
        x = x.detach().float()
        if self.outlier_mask is not None:
            self.outliers._observe(x[..., self.outlier_mask])
            x = x[..., ~self.outlier_mask]
        if self.min_val is not None and x.shape[1] != self.min_val.numel():
            raise ValueError(f"calibration input has {x.shape[1]} tokens, earlier inputs had {self.min_val.numel()}")
        lo, hi, cmax = torch.ops.vmq.token_stats(x)
        if self.min_val is None:
            self.min_val, self.max_val, self.channel_absmax = lo, hi, cmax
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)
            self.channel_absmax = torch.maximum(self.channel_absmax, cmax)
        if self.records_second_moment:
            flat = x.reshape(-1, x.shape[-1]).double()
            moment = flat.T @ flat
            self.second_moment = moment if self.second_moment is None else self.second_moment + moment
        if self.record_distribution:
            self._hist.add_tokens(x, lo, hi)

    @torch.no_grad()
    def all_reduce_statistics(self) -> None:
        """Combine what every process recorded on its share of the calibration images (under ``torchrun``): the
        per-token minima and maxima and the channel maxima exactly, the histograms by :meth:`RowHistograms.merged`.
        Every process then holds the same statistics. A no-op in a single process."""
        from vmq_fx import distributed

        if self.outliers is not None:
            self.outliers.all_reduce_statistics()
        if distributed.world_size() == 1:
            return
        mine = None if self.min_val is None else (self.min_val.cpu(), self.max_val.cpu(), self.channel_absmax.cpu(),
                                                 self._hist.state(),
                                                 None if self.second_moment is None else self.second_moment.cpu())
        parts = [p for p in distributed.all_gather_objects(mine) if p is not None]
        if not parts:
            return
        device = parts[0][0].device if self.min_val is None else self.min_val.device
        self.min_val = torch.stack([p[0] for p in parts]).amin(0).to(device)
        self.max_val = torch.stack([p[1] for p in parts]).amax(0).to(device)
        self.channel_absmax = torch.stack([p[2] for p in parts]).amax(0).to(device)
        moments = [p[4] for p in parts if p[4] is not None]
        self.second_moment = torch.stack(moments).sum(0).to(device) if moments else None
        histograms = [tuple(t.to(device) for t in p[3]) for p in parts if p[3] is not None]
        self._hist = RowHistograms.merged(self.bins, histograms) if histograms else RowHistograms(self.bins)

    def set_smooth(self, s: Tensor) -> nn.Parameter:
        """Give the quantizer its smoothing scale (per input channel); returns the parameter, which the weight
        quantizer of the same linear shares (:meth:`PerChannelWeightFakeQuantize.share_smooth`)."""
        self.smooth = nn.Parameter(s.detach().float().clone())
        return self.smooth

    def set_rotation(self, r: Tensor) -> Tensor:
        """Give the quantizer its rotation (``[channels, channels]``, orthogonal); returns the buffer, which the weight
        quantizer of the same linear shares (:meth:`PerChannelWeightFakeQuantize.share_rotation`)."""
        if r.dim() != 2 or r.shape[0] != r.shape[1]:
            raise ValueError(f"set_rotation: expected a square matrix, got shape {tuple(r.shape)}")
        self.rotation_matrix = r.detach().float().clone()
        if self.rotation == "hadamard":
            q, h = hadamard_factors(r.shape[0])
            if not torch.allclose(torch.kron(q, h), r.double(), atol=1e-6):
                raise ValueError("set_rotation: a Hadamard quantizer takes vmq_fx.pt2e.rotation.hadamard(d)")
            self.hadamard_odd = q.float().to(r.device) if q.shape[0] > 1 else None
        return self.rotation_matrix

    @property
    def dense_rotation(self) -> bool:
        """Whether the input is multiplied by the whole matrix ``R / s[:, None]`` (a KLT rotation), rather than
        divided by ``s`` and rotated by the Hadamard transform in factored form."""
        return self.rotation_matrix is not None and self.rotation != "hadamard"

    def set_outlier_channels(self, channels: Tensor, num_channels: int) -> None:
        """Keep these input channels (indices) at 8 bits from now on, with their own per-token steps."""
        mask = torch.zeros(num_channels, dtype=torch.bool, device=channels.device)
        mask[channels] = True
        self.outlier_mask = mask
        self.outliers = PerTokenStaticFakeQuantize(quant_min=0, quant_max=255, p=self.p,
                                                   num_candidates=self.num_candidates, bins=self.bins)

    def input_map(self) -> Tensor:
        """``R / s[:, None]``: the one matrix a rotating quantizer multiplies its input by (``(x / s) @ R``)."""
        r = self.rotation_matrix
        return r if self.smooth is None else r / self.smooth.reshape(-1, 1)

    def forward(self, x: Tensor) -> Tensor:
        # the same ops convert writes, so both round alike
        if self.dense_rotation:
            x = x @ self.input_map()
        else:
            if self.smooth is not None:
                x = x / self.smooth
            if self.rotation_matrix is not None:
                x = torch.ops.vmq.hadamard_transform(x, self.hadamard_odd)
        if self.observer_enabled[0] == 1:
            self._observe(x)
        if self.fake_quant_enabled[0] == 1:
            if x.shape[1] != self.scale.numel():
                raise ValueError(f"input has {x.shape[1]} tokens, the quantizer was calibrated for {self.scale.numel()}")
            out = self._fake_quant(x, (1, -1, 1))
            if self.outlier_mask is not None:
                out = torch.where(self.outlier_mask, self.outliers._fake_quant(x, (1, -1, 1)), out)
            return out
        return x

    def convert(self, model: torch.fx.GraphModule, observer_node: torch.fx.Node) -> None:
        """``[div(x, s) | matmul(x, R / s[:, None])] -> quantize_per_channel(axis=1) -> dequantize_per_channel`` in
        place of the module; with outlier channels also the 8-bit pair and ``where(mask, dq8, dq)``."""
        scale, zp = self.calculate_qparams()
        graph, base = model.graph, observer_node.name
        x = observer_node.args[0]
        x_val, stack = x.meta.get("val"), observer_node.meta.get("nn_module_stack", {})

        def call(op, args, tag):
            node = graph.call_function(op, args)
            node.meta.update({tag: True, "nn_module_stack": stack, "val": x_val})
            return node

        with graph.inserting_before(observer_node):
            if self.dense_rotation:
                x = call(torch.ops.aten.matmul.default, (x, _constant(model, f"{base}_rotation", self.input_map())),
                         ROTATION_META)
            else:
                if self.smooth is not None:
                    x = call(torch.ops.aten.div.Tensor, (x, _constant(model, f"{base}_smooth", self.smooth)),
                             SMOOTHING_META)
                if self.rotation_matrix is not None:  # Q_m stored once per odd size for the whole model
                    odd = self.hadamard_odd
                    odd = None if odd is None else _constant(model, f"vmq_hadamard_odd_{odd.shape[0]}", odd,
                                                             shared=True)
                    x = call(torch.ops.vmq.hadamard_transform.default, (x, odd), ROTATION_META)
            written = self._write_qdq(model, x, f"{base}", scale, zp)
            if self.outlier_mask is not None:
                scale8, zp8 = self.outliers.calculate_qparams()
                written += self._write_qdq(model, x, f"{base}_outliers", scale8, zp8, self.outliers.quant_max)
                mask = _constant(model, f"{base}_outlier_mask", self.outlier_mask)
                written.append(graph.call_function(torch.ops.aten.where.self, (mask, written[-1], written[1])))
                written[-1].meta[OUTLIER_META] = True
        for node in written:
            node.meta["val"] = observer_node.meta.get("val")
            node.meta["nn_module_stack"] = observer_node.meta.get("nn_module_stack", {})
        observer_node.replace_all_uses_with(written[-1])
        graph.erase_node(observer_node)

    def _write_qdq(self, model, x, name: str, scale: Tensor, zp: Tensor, quant_max: int | None = None) -> list:
        args = (_constant(model, f"{name}_scale", scale), _constant(model, f"{name}_zero_point", zp), 1,
                self.quant_min, self.quant_max if quant_max is None else quant_max, torch.uint8)
        q = model.graph.call_function(_qd.quantize_per_channel.default, (x,) + args)
        return [q, model.graph.call_function(_qd.dequantize_per_channel.default, (q,) + args)]

    @torch.no_grad()
    def initialize(self) -> None:
        """Lp-search the step sizes and zero points from the recorded statistics; switch to fake quantization."""
        if self.min_val is None:
            raise NotCalibratedError("PerTokenStaticFakeQuantize.initialize: no calibration data was observed")
        if self._hist.counts is None:
            raise NotCalibratedError("PerTokenStaticFakeQuantize.initialize: the value distribution was not recorded "
                                     "(record_distribution was off)")
        levels = self.quant_max - self.quant_min + 1
        scale, zp = self._hist.search(self.min_val, self.max_val, levels, self.p, self.num_candidates)
        self._drop_recorded()
        self._set(scale, zp + self.quant_min)

    def _drop_recorded(self) -> None:
        self._hist = RowHistograms(self.bins)


class PerChannelWeightFakeQuantize(_TwoPhaseFakeQuantize):
    """Symmetric per-output-channel weight quantizer with PTQ4VM's Lp (p = 2.4) clip search and a learnable step.

    Levels [-qmax, qmax] with qmax = 2^(b-1) - 1 (the narrow range of the PTQ4VM code); the initial step of each row is ``clip / (2^(b-1) - 1)`` with the clip chosen among
    100 fractions of ``max|w_row|``. The weight it sees is the smoothed weight ``W * s``.

    Example:
        >>> import torch
        >>> from vmq_fx.pt2e.observers import PerChannelWeightFakeQuantize
        >>> fq = PerChannelWeightFakeQuantize(quant_min=-127, quant_max=127)
        >>> _ = fq(torch.randn(6, 8)); fq.initialize()
        >>> fq.calculate_qparams()[0].shape
        torch.Size([6])
    """

    def __init__(self, dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_channel_symmetric,
                 ch_axis=0, is_dynamic=False, p: float = 2.4, num_candidates: int = 100, **kwargs):
        super().__init__(dtype, quant_min, quant_max, qscheme, ch_axis, p, num_candidates)
        if ch_axis != 0:
            raise ValueError(f"PerChannelWeightFakeQuantize: output channels must be axis 0, got {ch_axis}")
        self._weight: Tensor | None = None
        self.smooth: nn.Parameter | None = None
        self.register_buffer("rotation_matrix", None)

    def reset_statistics(self) -> None:
        self._weight = None

    def share_smooth(self, smooth: nn.Parameter) -> None:
        """Work on ``W * smooth`` from now on (the smoothing parameter of the activation quantizer of the linear)."""
        self.smooth = smooth

    def share_rotation(self, r: Tensor) -> None:
        """Work on ``(W * s) @ R`` from now on (the rotation of the activation quantizer of the linear)."""
        self.rotation_matrix = r

    def _transformed(self, w: Tensor) -> Tensor:
        if self.smooth is not None:
            w = w * self.smooth
        return w if self.rotation_matrix is None else w @ self.rotation_matrix

    def forward(self, w: Tensor) -> Tensor:
        w = self._transformed(w)
        if self.observer_enabled[0] == 1:
            self._weight = w.detach()
        if self.fake_quant_enabled[0] == 1:
            return self._fake_quant(w, (-1,) + (1,) * (w.dim() - 1))
        return w

    @torch.no_grad()
    def initialize(self) -> None:
        """Lp-search the per-row clip of the last observed weight; switch to fake quantization."""
        if self._weight is None:
            raise NotCalibratedError("PerChannelWeightFakeQuantize.initialize: no weight was observed")
        scale = search_symmetric_clips(self._weight.flatten(1), self.quant_max, self.p, self.num_candidates)
        self._drop_recorded()
        self._set(scale, torch.zeros_like(scale, dtype=torch.int64))

    def _drop_recorded(self) -> None:
        self._weight = None

    def convert(self, model: torch.fx.GraphModule, observer_node: torch.fx.Node) -> None:
        """``dequantize_per_channel(axis=0)`` of the integer ``(W * s) [@ R]`` (a constant) in place of the module."""
        scale, zp = self.calculate_qparams()
        weight_node = observer_node.args[0]
        if not (isinstance(weight_node, torch.fx.Node) and weight_node.op == "get_attr"):
            raise ValueError(f"{observer_node.name}: the weight is not a constant ({weight_node})")
        with torch.no_grad():
            w = self._transformed(operator.attrgetter(str(weight_node.target))(model).float())
            shape = (-1,) + (1,) * (w.dim() - 1)
            # w * (1 / scale), as quantize_per_channel and the fake quantization round
            w_int = torch.clamp(torch.round(w * (1.0 / scale).reshape(shape)), self.quant_min, self.quant_max)
        graph, base = model.graph, observer_node.name
        with graph.inserting_before(observer_node):
            args = (_constant(model, f"{base}_scale", scale), _constant(model, f"{base}_zero_point", zp), 0,
                    self.quant_min, self.quant_max, torch.int8)
            dq = graph.call_function(_qd.dequantize_per_channel.default,
                                     (_constant(model, f"{base}_int", w_int.to(torch.int8)),) + args)
        dq.meta["val"] = observer_node.meta.get("val")
        dq.meta["nn_module_stack"] = observer_node.meta.get("nn_module_stack", {})
        observer_node.replace_all_uses_with(dq)
        graph.erase_node(observer_node)
        if not weight_node.users:
            graph.erase_node(weight_node)


class PerTokenDynamicFakeQuantize(FakeQuantizeBase):
    """Per-token *dynamic* activation quantization (a baseline PTQ4VM is compared with): each image's tokens get
    their own min-max range at run time, a reduction over channels on every forward pass.

    Needs no calibration. ``convert_pt2e`` calls :meth:`convert`, which writes torchao's ``choose_qparams_affine`` ->
    ``quantize_affine`` -> ``dequantize_affine`` with block size ``(1, 1, channels)`` into the graph.
    """

    def __init__(self, dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_channel_affine,
                 is_dynamic=True, **kwargs):
        super().__init__()
        self.dtype = dtype
        self.quant_min, self.quant_max = int(quant_min), int(quant_max)
        self.qscheme = qscheme
        self.is_dynamic = True
        self.enable_fake_quant()
        self.disable_observer()

    def _qparams_args(self, x) -> tuple:
        block = [1] * (len(x.shape) - 1) + [x.shape[-1]]
        return (x, "ASYMMETRIC", block, torch.uint8, self.quant_min, self.quant_max, torch.finfo(torch.float32).eps,
                torch.float32, torch.int32)

    def forward(self, x: Tensor) -> Tensor:
        if self.fake_quant_enabled[0] != 1:
            return x
        scale, zp = torch.ops.torchao.choose_qparams_affine(*self._qparams_args(x.detach()))
        scale, zp = scale.reshape(*x.shape[:-1], 1), zp.reshape(*x.shape[:-1], 1).to(x.dtype)
        q = torch.clamp(round_ste(x * (1.0 / scale)) + zp, self.quant_min, self.quant_max)
        return (q - zp) * scale

    def calculate_qparams(self, **kwargs):
        raise RuntimeError("per-token dynamic quantization has no static parameters")

    def convert(self, model: torch.fx.GraphModule, observer_node: torch.fx.Node) -> None:
        graph, ops = model.graph, torch.ops.torchao
        x = observer_node.args[0]
        args = self._qparams_args(x.meta["val"])
        block = args[2]
        # Op packets, not .default overloads: torchao's PortNodeMetaForQDQ recognizes dynamic Q/DQ by the packets.
        with graph.inserting_before(observer_node):
            qparams = graph.call_function(ops.choose_qparams_affine, (x,) + args[1:])
            scale = graph.call_function(operator.getitem, (qparams, 0))
            zp = graph.call_function(operator.getitem, (qparams, 1))
            q = graph.call_function(ops.quantize_affine,
                                    (x, block, scale, zp, torch.uint8, self.quant_min, self.quant_max))
            dq = graph.call_function(ops.dequantize_affine,
                                     (q, block, scale, zp, torch.uint8, self.quant_min, self.quant_max))
        for node in (qparams, scale, zp, q, dq):
            node.meta["nn_module_stack"] = observer_node.meta.get("nn_module_stack", {})
        observer_node.replace_all_uses_with(dq)
        graph.erase_node(observer_node)
