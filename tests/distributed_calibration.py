"""Calibration of vim-fm-tiny (SmoothQuant + PTS, W8A8) whose activation statistics tests/test_distributed.py compares
between one process and two under torchrun: ``python tests/distributed_calibration.py OUT.pt``."""
import sys

import torch


def calibrated_statistics(batch_size: int = 8) -> dict[str, dict[str, torch.Tensor]]:
    """What each activation quantizer holds after calibrating on 64 Fashion-MNIST training images in batches of 8."""
    import vmq_fx
    from vmq_fx import VisualMambaQuantizer, prepare_pt2e, recipes
    from vmq_fx.app.data import calibration_images
    from vmq_fx.pt2e.observers import PerTokenStaticFakeQuantize

    model = vmq_fx.models.load_reference("vim-fm-tiny")
    images = calibration_images(64)
    prepared = prepare_pt2e(vmq_fx.export_model(model, images[:2]).module(),
                            VisualMambaQuantizer(recipes.smoothquant_pts(8, 8)))
    vmq_fx.calibrate(prepared, images, batch_size=batch_size, progress=False)
    out = {}
    for name, module in prepared.named_modules():
        if isinstance(module, PerTokenStaticFakeQuantize):
            scale, zero_point = module.calculate_qparams()
            out[name] = {"min": module.min_val, "max": module.max_val, "channel_absmax": module.channel_absmax,
                         "smooth": module.smooth.detach(), "scale": scale, "zero_point": zero_point}
    return out


if __name__ == "__main__":
    from vmq_fx import distributed

    torch.set_num_threads(1)
    distributed.init_from_env()
    stats = calibrated_statistics()
    if distributed.is_main():
        torch.save(stats, sys.argv[1])
    distributed.shutdown()
