"""What an exported ONNX file says about itself, so that it can be deployed with nothing but the file.

Every file :func:`vmq_fx.export_onnx` writes carries, in the ONNX model's ``metadata_props``:

* ``vmq_fx.pretrained_cfg``: the model's input preprocessing, with the key names of timm's ``pretrained_cfg``
  (``input_size`` ``[C, H, W]``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``), plus
  ``resize_size`` (the shorter side before the center crop), ``num_classes`` and ``label_names`` where they are known
  (the Fashion-MNIST classes for the shipped reference models; the ImageNet-1k class names, from the list timm ships,
  for a 1000-class model). JSON.
* ``vmq_fx.custom_ops``: the custom-op domains the graph uses and the library that runs them (``{}`` for a file of
  standard operators only). JSON.

``examples/deploy_onnxruntime.py`` reads both with onnxruntime alone (``session.get_modelmeta()``).

Example:
    >>> from vmq_fx.models import create_model
    >>> import json
    >>> meta = model_metadata(create_model("vim_fm_tiny").config, custom_domains=())
    >>> json.loads(meta["vmq_fx.pretrained_cfg"])["input_size"], json.loads(meta["vmq_fx.custom_ops"])
    ([1, 28, 28], {})
"""
from __future__ import annotations

import json
import logging

__all__ = ["CUSTOM_OPS_KEY", "PRETRAINED_CFG_KEY", "class_names", "model_metadata"]

log = logging.getLogger(__name__)

PRETRAINED_CFG_KEY = "vmq_fx.pretrained_cfg"
CUSTOM_OPS_KEY = "vmq_fx.custom_ops"

# The custom-op domains vmq_fx writes, and what runs them.
_CUSTOM_OP_LIBRARIES = {
    "vmq": {"ops": ["SelectiveScan", "CausalConv1d", "HadamardTransform", "RmsNorm", "AddRmsNorm",
                    "Int8Linear"],
            "library": "vmq_fx's onnxruntime library libvmq_fx_ort.so (python -m vmq_fx.export.ort_ops --build, or the "
                       "compiler command in vmq_fx/csrc/ort/library.cpp; no torch needed)"},
}


def class_names(config) -> list[str] | None:
    """The class names of a model configuration where vmq_fx knows them: Fashion-MNIST for its 10-class 28x28
    models, ImageNet-1k (timm's synset-to-lemma list, first lemma) for 1000 classes; ``None`` otherwise."""
    from vmq_fx.models.preprocess import FASHION_MNIST

    if config.num_classes == 10 and config.preprocess == FASHION_MNIST:
        from vmq_fx.app.data import FASHION_MNIST_CLASSES

        return list(FASHION_MNIST_CLASSES)
    if config.num_classes == 1000:
        from vmq_fx.app.images import imagenet_class_names

        try:
            return imagenet_class_names()
        except (ImportError, ValueError) as e:
            log.info("no ImageNet class names in the ONNX metadata: %s", e)
    return None


def model_metadata(config, custom_domains) -> dict[str, str]:
    """The ``metadata_props`` of an exported file: the preprocessing of ``config`` (a ``VimConfig`` /
    ``VMambaConfig``; ``None``: unknown, only the custom ops are recorded) and the ``custom_domains`` its graph
    uses."""
    unknown = sorted(set(custom_domains) - set(_CUSTOM_OP_LIBRARIES))
    if unknown:
        raise ValueError(f"custom-op domain(s) {unknown} have no known library")
    meta = {CUSTOM_OPS_KEY: json.dumps({d: _CUSTOM_OP_LIBRARIES[d] for d in sorted(custom_domains)})}
    if config is not None:
        p = config.preprocess
        cfg = {"input_size": [p.in_chans, p.input_size, p.input_size], "interpolation": p.interpolation,
               "mean": list(p.mean), "std": list(p.std), "crop_pct": p.crop_pct, "crop_mode": "center",
               "resize_size": p.resize_size, "num_classes": config.num_classes}
        names = class_names(config)
        if names is not None:
            cfg["label_names"] = names
        meta[PRETRAINED_CFG_KEY] = json.dumps(cfg)
    return meta
