"""Observers and fake-quantize modules for PT2E: per-token static activations, Lp-searched per-channel weights."""
from vmq_fx.observers.fake_quantize import (
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
]
