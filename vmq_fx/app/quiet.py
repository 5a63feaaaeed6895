"""Filters for messages other libraries log on import or export that say nothing to a ``vmq`` user, so that what the
command prints is vmq_fx's own (and an error really is one line). Each filter drops one known message and nothing
else. The library installs none of them: :func:`known_messages_silenced` holds them for the length of one ``vmq``
command."""
from __future__ import annotations

import contextlib
import logging
import warnings

__all__ = ["known_messages_silenced"]

# (logger, the start of a message that is harmless here, why)
_HARMLESS = (
    # torchao ships CUDA-only extensions; on a CPU machine their loading fails, which changes nothing for us.
    ("torchao", "Failed to load ", ("_C_mxfp8", "_C_cutlass")),
    # torchao registers an Enum with torch.utils._pytree the way torch now deprecates (torchao's to fix).
    ("torch.utils._pytree", "%s is an Enum subclass and is now natively supported", ()),
    # the ONNX exporter looks for torchvision's ops; vmq_fx models have none.
    ("torch.onnx._internal.exporter._registration", "torchvision is not installed", ()),
)


class _Drop(logging.Filter):
    def __init__(self, start: str, needles: tuple[str, ...]):
        super().__init__()
        self.start, self.needles = start, needles

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if not msg.startswith(self.start):
            return True
        text = record.getMessage()
        return bool(self.needles) and not any(n in text for n in self.needles)


@contextlib.contextmanager
def known_messages_silenced():
    """Drop the known harmless messages inside the block; every logger and warning filter is as before after it."""
    added = []
    with warnings.catch_warnings():
        # torch's own deepcopy of export graph modules goes through a deprecated pytree check (torch's to fix).
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        for name, start, needles in _HARMLESS:
            logger, drop = logging.getLogger(name), _Drop(start, needles)
            logger.addFilter(drop)
            added.append((logger, drop))
        try:
            yield
        finally:
            for logger, drop in added:
                logger.removeFilter(drop)
