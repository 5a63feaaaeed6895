"""ViM-VQ's weight quantizer as a PT2E fake-quantize module: a codebook, and each sub-vector of the weight as a
convex combination of its ``n`` nearest codewords until it is confirmed to one of them.

Phases:

1. *Calibration* (``observer_enabled``): the weight that flows through is recorded.
2. :func:`initialize_codebook_group`: the quantizers of one group (one linear, or every linear of a block) share one
   codebook. Rows are scaled to unit RMS (``row_scale``, in the 8-bit code of
   :func:`~vmq_fx.ops.vq_linear.encode_row_scale`), cut into sub-vectors of length ``d`` and clustered by
   k-means into ``k`` codewords; every sub-vector gets its ``n`` nearest codewords as candidates with ratio logits
   ``log(dist_n / dist_j)`` (nearest first). Fake quantization is switched on. Without an explicit ``(d, k)`` the
   group's shape is :func:`codebook_shape`'s: the longest sub-vector whose codebook costs at most ``codebook_budget``
   bits per weight of the group.
3. Optimization (:func:`vmq_fx.vector_quantize`): the ratios ``softmax(logits)`` and the codebook are learned;
   :meth:`reselect` moves each hull to the codewords nearest the current soft value; :meth:`confirm` hard-assigns
   the most confident sub-vectors; :meth:`harden` assigns the rest.
4. ``convert_pt2e`` calls :meth:`convert`, which writes ``vmq.vq_dequantize(codes, codebook, row_scale)`` in place
   of the module (codebook in float16, codes bit-packed, row scales 8-bit; a shared codebook is one buffer).

Memory: the soft state is ``[S, n]`` logits and an ``[S, n, d]`` gather for ``S`` sub-vectors; nothing of size
``[S, k]`` is kept (nearest-codeword searches run in chunks).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

from vmq_fx.pt2e.observers.fake_quantize import NotCalibratedError
from vmq_fx.ops.vq_linear import code_bits, decode_row_scale, encode_row_scale, pack_codes

__all__ = ["VectorQuantizedWeight", "codebook_shape", "initialize_codebook_group", "kmeans", "nearest_codewords"]

_MAX_CODE_BITS = 8  # automatic shapes keep codes to a byte (the Triton kernel's limit)


def codebook_shape(bits: int, weights: int, budget: float) -> tuple[int, int]:
    """``(d, k)`` for ``bits`` index bits per weight and a codebook shared by ``weights`` weights: the longest
    sub-vector (d in 8, 4, 2, 1; k = 2^(bits * d) <= 256) whose float16 codebook costs at most ``budget`` bits per
    weight; d = 1 (scalar codewords) when none does.

    Example:
        >>> codebook_shape(2, 264_192, 0.125)   # a Vim-T block: the paper's (4, 256)
        (4, 256)
        >>> codebook_shape(2, 71_232, 0.125)    # a vim-fm-tiny block
        (2, 16)
    """
    if bits not in (1, 2, 3):
        raise ValueError(f"codebook_shape: bits must be 1, 2 or 3, got {bits!r}")
    for d in (8, 4, 2):
        if bits * d <= _MAX_CODE_BITS and (1 << (bits * d)) * d * 16 <= budget * weights:
            return d, 1 << (bits * d)
    return 1, 1 << bits

_CHUNK = 8192  # sub-vectors per distance computation: bounds the [chunk, k] distance matrix


def nearest_codewords(x: Tensor, codebook: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Indices ``[S, n]`` of the ``n`` codewords nearest each row of ``x`` (nearest first) and their squared
    distances, computed ``_CHUNK`` rows at a time."""
    idx, dist = [], []
    c2 = codebook.pow(2).sum(1)
    for chunk in x.split(_CHUNK):
        # |x|^2 does not change the order: add it to the n kept distances only
        d2 = torch.addmm(c2, chunk, codebook.t(), alpha=-2)
        if n == 1:
            v, i = d2.min(dim=1, keepdim=True)
        else:
            v, i = d2.topk(n, dim=1, largest=False)
        idx.append(i)
        dist.append((v + chunk.pow(2).sum(1, keepdim=True)).clamp_min(0))
    return torch.cat(idx), torch.cat(dist)


@torch.no_grad()
def kmeans(x: Tensor, k: int, iters: int = 25, seed: int = 0, max_points: int | None = 128 * 256
           ) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means of the rows of ``x`` ``[S, d]``.

    Initialized with ``k`` distinct random rows; an empty cluster is re-seeded with the point farthest from its
    centroid. With ``k >= S`` every point is its own codeword (the rest of the codebook repeats points). The
    centroids are fit on at most ``max_points`` rows drawn with ``seed`` (``None``: all); every row is then assigned.

    Returns:
        ``(codebook [k, d], assignment [S])`` with every point assigned to its nearest codeword of the returned
        codebook.
    """
    x = x.float()
    s = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    if k >= s:
        extra = torch.randint(0, s, (k - s,), generator=gen)
        return torch.cat([x, x[extra]]), torch.arange(s, device=x.device)
    fit = x if max_points is None or s <= max_points else x[torch.randperm(s, generator=gen)[:max_points]]
    codebook = fit[torch.randperm(len(fit), generator=gen)[:k]].clone()
    for _ in range(iters):
        assign, dist = nearest_codewords(fit, codebook, 1)
        assign, dist = assign[:, 0], dist[:, 0]
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(codebook).index_add_(0, assign, fit)
        empty = counts == 0
        codebook = torch.where(empty[:, None], codebook, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            far = dist.topk(int(empty.sum())).indices
            codebook[empty] = fit[far]
    return codebook, nearest_codewords(x, codebook, 1)[0][:, 0]


def _ratio_logits(dist: Tensor) -> Tensor:
    """``log(dist_last / dist_j)``: the nearest codeword gets the largest ratio, the farthest candidate ratio 1."""
    d = dist.clamp_min(1e-12)
    return (d[:, -1:] / d).log()


class VectorQuantizedWeight(FakeQuantizeBase):
    """Vector-quantized weight with learnable convex-combination ratios and codebook (ViM-VQ).

    Args:
        d: sub-vector length (along the input dimension; the last sub-vector of a row is zero-padded); with ``k``,
            or neither (then the group's shape is chosen from ``bits`` and its size, :func:`codebook_shape`).
        k: codebook size.
        bits: index bits per weight for the automatic shape.
        codebook_budget: bits per weight the codebook may cost (automatic shape).
        n: candidate codewords per sub-vector (the convex hull).
        row_scale: scale rows to unit RMS before clustering (one 8-bit code per output row).
        kmeans_iters: Lloyd iterations of the initialization.
        seed: seed of the k-means initialization.

    Example:
        >>> import torch
        >>> from vmq_fx.pt2e.observers import VectorQuantizedWeight
        >>> vq = VectorQuantizedWeight(d=4, k=16, n=2)
        >>> _ = vq(torch.randn(8, 12)); vq.initialize(); vq.harden()
        >>> vq(torch.randn(8, 12)).shape, int(vq.confirmed.sum())
        (torch.Size([8, 12]), 24)
    """

    def __init__(self, d: int | None = None, k: int | None = None, bits: int | None = 2, codebook_budget: float = 0.125,
                 n: int = 4, row_scale: bool = True, kmeans_iters: int = 25, seed: int = 0, dtype=torch.uint8,
                 **kwargs):
        super().__init__()
        if (d is None) != (k is None) or (d is None and bits is None):
            raise ValueError("VectorQuantizedWeight: give d and k, or bits for an automatic shape")
        if d is not None and (d < 1 or k < 2 or not 1 <= n <= k):
            raise ValueError(f"VectorQuantizedWeight: need d >= 1, k >= 2 and 1 <= n <= k, got d={d}, k={k}, n={n}")
        self.d, self.k, self.n = d, k, n
        self.auto_bits, self.codebook_budget = (bits if d is None else None), codebook_budget
        self.use_row_scale = row_scale
        self.kmeans_iters, self.seed = kmeans_iters, seed
        self.codebook_key: str | None = None  # the buffer name of the codebook after convert (shared ones: one)
        self.dtype = dtype
        self.is_dynamic = False
        self.qscheme = None
        self.codebook = nn.Parameter(torch.empty(0))
        self.logits = nn.Parameter(torch.empty(0))
        for name in ("row_scale", "candidates", "codes", "confirmed"):
            self.register_buffer(name, torch.empty(0))
        self.shape: tuple[int, int] | None = None
        self._weight: Tensor | None = None
        self.disable_fake_quant()
        self.enable_observer()

    @property
    def initialized(self) -> bool:
        return self.codebook.numel() > 0

    @property
    def bits(self) -> int:
        """Bits of one code."""
        return code_bits(self.k)

    @property
    def scales(self) -> Tensor:
        """The decoded row scales (float32)."""
        return decode_row_scale(self.row_scale)

    def reset_statistics(self) -> None:
        self._weight = None

    # -- phases ---------------------------------------------------------------------------------------------------
    def initialize(self) -> None:
        """A codebook of this weight alone (:func:`initialize_codebook_group` of one)."""
        initialize_codebook_group([self])

    @torch.no_grad()
    def _normalized(self) -> Tensor:
        """Record the observed weight's shape and 8-bit row scales; its sub-vectors at unit row RMS."""
        if self._weight is None:
            raise NotCalibratedError("VectorQuantizedWeight.initialize: no weight was observed; run calibration")
        w = self._weight.float().flatten(1)
        self.shape = tuple(w.shape)
        rms = w.pow(2).mean(1).sqrt() if self.use_row_scale else torch.ones(len(w), device=w.device)
        # the 8-bit code from the start, so the optimization sees the scale the saved model decodes with
        self.row_scale = encode_row_scale(rms.clamp_min(1e-30))
        self._weight = None
        return self._subvectors(w / self.scales[:, None])

    @torch.no_grad()
    def _start(self, codebook: nn.Parameter, sub: Tensor) -> None:
        self.codebook = codebook
        cand, dist = nearest_codewords(sub, codebook, self.n)
        self.candidates = cand
        self.logits = nn.Parameter(_ratio_logits(dist))
        self.codes = cand[:, 0].clone()
        self.confirmed = torch.zeros(len(sub), dtype=torch.bool, device=sub.device)
        self.enable_fake_quant()
        self.disable_observer()

    @torch.no_grad()
    def _subvectors(self, w: Tensor) -> Tensor:
        pad = -w.shape[1] % self.d
        return torch.nn.functional.pad(w, (0, pad)).reshape(-1, self.d)

    def ratios(self) -> Tensor:
        """Convex-combination weights ``[S, n]`` (rows on the probability simplex)."""
        return self.logits.softmax(-1)

    def _codewords(self, index: Tensor) -> Tensor:
        # index_select, not codebook[index]: the backward of advanced indexing accumulates the codebook's gradient with
        # parallel atomic adds on CPU (index_put_ with accumulate), a different sum in every run once two threads
        # share the work; index_select's backward (index_add_) is deterministic, and faster.
        return self.codebook.index_select(0, index.reshape(-1)).reshape(*index.shape, self.codebook.shape[1])

    def soft_subvectors(self) -> Tensor:
        return (self.ratios()[..., None] * self._codewords(self.candidates)).sum(1)

    def subvectors(self) -> Tensor:
        """Current sub-vectors: the confirmed codeword where confirmed, the convex combination elsewhere."""
        hard = self._codewords(self.codes)
        if bool(self.confirmed.all()):
            return hard
        return torch.where(self.confirmed[:, None], hard, self.soft_subvectors())

    def weight(self) -> Tensor:
        rows, cols = self.shape
        return self.subvectors().reshape(rows, -1)[:, :cols] * self.scales[:, None]

    def forward(self, w: Tensor) -> Tensor:
        if self.observer_enabled[0] == 1:
            self._weight = w.detach()
        if self.fake_quant_enabled[0] == 1:
            if tuple(w.shape) != self.shape:
                raise ValueError(f"weight of shape {tuple(w.shape)}, the codebook was fit to {self.shape}")
            return self.weight().to(w.dtype)
        return w

    def one_hot_penalty(self) -> Tensor:
        """``n * mean(r * (1 - r))`` over the unconfirmed sub-vectors: 0 exactly when every ratio row is one-hot."""
        free = ~self.confirmed
        if not bool(free.any()):
            return self.logits.sum() * 0
        r = self.ratios()[free]
        return self.n * (r * (1 - r)).mean()

    @torch.no_grad()
    def reselect(self) -> None:
        """Move each unconfirmed sub-vector's hull to the ``n`` codewords nearest its current soft value."""
        free = ~self.confirmed
        if not bool(free.any()):
            return
        cand, dist = nearest_codewords(self.soft_subvectors()[free], self.codebook, self.n)
        self.candidates[free] = cand
        self.logits[free] = _ratio_logits(dist)

    @torch.no_grad()
    def confirm(self, fraction: float) -> int:
        """Hard-assign the most confident unconfirmed sub-vectors (largest top ratio) until ``fraction`` of all are
        confirmed. Returns how many were confirmed by this call."""
        target = min(len(self.confirmed), int(round(fraction * len(self.confirmed))))
        todo = target - int(self.confirmed.sum())
        if todo <= 0:
            return 0
        top, arg = self.ratios().max(-1)
        top = top.masked_fill(self.confirmed, -1.0)
        pick = top.topk(todo).indices
        self.codes[pick] = self.candidates[pick, arg[pick]]
        self.confirmed[pick] = True
        return todo

    @torch.no_grad()
    def harden(self) -> None:
        """Assign every unconfirmed sub-vector to its largest-ratio candidate (rounding)."""
        self.confirm(1.0)

    @torch.no_grad()
    def finalize(self) -> None:
        """Round the codebook to float16, the precision it is stored in."""
        if not bool(self.confirmed.all()):
            raise ValueError("VectorQuantizedWeight.finalize: some sub-vectors are not assigned yet; call harden()")
        self.codebook.copy_(self.codebook.half().float())

    # -- storage --------------------------------------------------------------------------------------------------
    def packed(self) -> dict[str, Tensor]:
        """``codes`` (bit-packed uint8), ``codebook`` (float16) and ``row_scale`` (8-bit codes): what the quantized
        model stores."""
        if not self.initialized or not bool(self.confirmed.all()):
            raise NotCalibratedError(
                "VectorQuantizedWeight: the codes are not final; run vmq_fx.calibrate and vmq_fx.vector_quantize "
                "on the prepared model before convert_pt2e")
        rows = self.shape[0]
        return {"codes": pack_codes(self.codes.reshape(rows, -1), self.bits),
                "codebook": self.codebook.detach().half(),
                "row_scale": self.row_scale.clone()}

    def calculate_qparams(self, **kwargs):
        raise RuntimeError("a vector-quantized weight has a codebook, not a scale and zero point; see packed()")

    def convert(self, model: torch.fx.GraphModule, observer_node: torch.fx.Node) -> None:
        weight_node = observer_node.args[0]
        base = str(weight_node.target).replace(".", "_") if weight_node.op == "get_attr" else observer_node.name
        graph = model.graph
        with graph.inserting_before(observer_node):
            attrs = []
            for key, value in self.packed().items():
                name = self.codebook_key if key == "codebook" and self.codebook_key else f"{base}_vq_{key}"
                if not hasattr(model, name):  # a shared codebook: registered by the first of its quantizers
                    model.register_buffer(name, value)
                attrs.append(graph.get_attr(name))
            dq = graph.call_function(torch.ops.vmq.vq_dequantize.default, (*attrs, self.shape[1]))
        dq.meta["nn_module_stack"] = observer_node.meta.get("nn_module_stack", {})
        dq.meta["val"] = observer_node.meta.get("val")
        observer_node.replace_all_uses_with(dq)
        graph.erase_node(observer_node)
        if not weight_node.users:
            graph.erase_node(weight_node)

    def extra_repr(self) -> str:
        return (f"d={self.d}, k={self.k}, n={self.n}, shape={self.shape}, codebook={self.codebook_key}, "
                f"initialized={self.initialized}")


@torch.no_grad()
def initialize_codebook_group(modules: list[VectorQuantizedWeight], key: str | None = None) -> None:
    """Give ``modules`` one shared codebook: k-means over the sub-vectors of all their (row-normalized) weights,
    then each module's candidates and ratio logits; fake quantization on.

    Args:
        modules: calibrated quantizers with the same settings.
        key: the name of the shared codebook's buffer after ``convert_pt2e`` (``None`` for a single module: a name
            of its own).
    """
    first = modules[0]
    settings = [(m.d, m.k, m.auto_bits, m.codebook_budget, m.n, m.use_row_scale) for m in modules]
    if len(set(settings)) != 1:
        raise ValueError("initialize_codebook_group: the quantizers of one codebook need the same settings")
    if any(m._weight is None for m in modules):
        raise NotCalibratedError("VectorQuantizedWeight.initialize: no weight was observed; run calibration")
    sizes = [tuple(m._weight.shape) for m in modules]
    if first.auto_bits is not None:
        d, k = codebook_shape(first.auto_bits, sum(int(torch.tensor(s).prod()) for s in sizes), first.codebook_budget)
        for m in modules:
            m.d, m.k = d, k
    for m in modules:
        m.codebook_key = key if len(modules) > 1 else None
    subs = [m._normalized() for m in modules]
    codebook = nn.Parameter(kmeans(torch.cat(subs), first.k, first.kmeans_iters, first.seed)[0])
    for m, sub in zip(modules, subs):
        m._start(codebook, sub)
