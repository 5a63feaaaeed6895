"""Observers and fake-quantize modules for PT2E: per-token static activations, Lp-searched per-channel weights,
vector-quantized weights."""
from vmq_fx.pt2e.observers.codebook import VectorQuantizedWeight, kmeans, nearest_codewords
from vmq_fx.pt2e.observers.fake_quantize import (
    NotCalibratedError,
    PerChannelWeightFakeQuantize,
    PerTokenDynamicFakeQuantize,
    PerTokenStaticFakeQuantize,
)

__all__ = [
    "NotCalibratedError",
    "PerChannelWeightFakeQuantize",
    "PerTokenDynamicFakeQuantize",
    "PerTokenStaticFakeQuantize",
    "VectorQuantizedWeight",
    "kmeans",
    "nearest_codewords",
]
