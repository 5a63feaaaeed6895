"""Training reference models on Fashion-MNIST (CPU; from scratch or continuing a run): safetensors + model card."""
from __future__ import annotations

import json
import logging
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vmq_fx.app.data import fashion_mnist, normalize
from vmq_fx.app.evaluate import evaluate
from vmq_fx.models import create_model
from vmq_fx.models.checkpoint import load_state_dict_strict
from vmq_fx.models.reference import REFERENCE_DIR, list_references

__all__ = ["TrainConfig", "train_reference"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Recipe: AdamW, linear warm-up then cosine decay, label smoothing, random shifts and horizontal flips."""

    epochs: float = 3.0
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    label_smoothing: float = 0.1
    drop_path_rate: float = 0.05
    seed: int = 0
    threads: int = 0  # 0: torch's default
    init_from: str | None = None  # continue from these weights (a new warm-up and cosine cycle), see _load_init

    def __post_init__(self):
        if self.epochs <= 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"TrainConfig: epochs, batch_size and lr must be positive, got {self}")


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift by up to 2 pixels (zero padded in the normalized space's background) and horizontal flip."""
    n = x.shape[0]
    pad = F.pad(x, (2, 2, 2, 2), value=float(x.min()))
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()  # one shift per batch: cheap, enough jitter
    x = pad[:, :, dy:dy + 28, dx:dx + 28]
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("numpy", "safetensors", "torchao"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # optional at training time
            pass
    return out


def _load_init(spec: str, model_name: str) -> tuple[dict, dict]:
    """Weights and model card to continue training from: a ``.safetensors`` written by ``vmq train`` (its ``.json``
    card beside it) or the name of a shipped reference model.

    The card is required because the continued model's card embeds it: without it the result's provenance (the first
    stage's command, seed and accuracy) would be lost.
    """
    path = Path(spec)
    if path.suffix != ".safetensors":
        if spec not in list_references():
            raise ValueError(f"init_from={spec!r}: neither a .safetensors file nor a shipped reference model "
                             f"({', '.join(list_references())})")
        path = REFERENCE_DIR / f"{spec}.safetensors"
    card_path = path.with_suffix(".json")
    if not path.is_file() or not card_path.is_file():
        raise FileNotFoundError(f"init_from={spec!r}: needs {path} and its model card {card_path}")
    card = json.loads(card_path.read_text())
    if card.get("model") != model_name:
        raise ValueError(f"init_from={spec!r} is a {card.get('model')!r} model, not {model_name!r}")
    return load_file(str(path)), card


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _save_epoch(model: torch.nn.Module, model_name: str, out_dir: Path, card_name: str, cfg: TrainConfig,
                epochs: float, seconds: float, init_card: dict | None) -> None:
    """After every epoch, ``<card_name>-last.safetensors`` and a card without test accuracy (not evaluated, to keep
    the run going): a run that is stopped can continue with ``init_from`` (a new warm-up and cosine cycle)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{card_name}-last"
    _save_weights(model, stem.with_suffix(".safetensors"))
    card = {"name": stem.name, "model": model_name,
            "partial": f"after {epochs:g} of {cfg.epochs:g} epochs; not evaluated",
            "train": {**asdict(cfg), "epochs": epochs, "seconds": round(seconds, 1)},
            **(_continued(init_card, epochs, seconds) if init_card else {})}
    stem.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")


def _continued(init_card: dict, epochs: float, seconds: float) -> dict:
    """Card fields of a run continued from ``init_card``: that card, and both runs summed (the earlier card already
    sums its own predecessors)."""
    before = init_card.get("total_train", init_card["train"])
    return {"init_from": init_card, "total_train": {"epochs": before["epochs"] + epochs,
                                                    "seconds": round(before["seconds"] + seconds, 1)}}


def train_reference(model_name: str, out_dir: str | Path, card_name: str, cfg: TrainConfig = TrainConfig(),
                    data_dir=None, command: str | None = None, conditions: str | None = None) -> dict:
    """Train ``model_name`` on the Fashion-MNIST training split; write ``<card_name>.safetensors`` and ``.json``.

    ``conditions`` is a free-text note for the card on how the run was made (e.g. what else shared the CPU), since the
    times in the card depend on it. With ``cfg.init_from`` the run continues from an earlier one's weights with a new
    warm-up and cosine cycle; the card then embeds the earlier card and sums both runs in ``total_train``. Returns the
    model card (also written to disk).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = create_model(model_name, drop_path_rate=cfg.drop_path_rate)
    init_card = None
    if cfg.init_from:  # before the data, so that a wrong checkpoint fails at once
        state, init_card = _load_init(cfg.init_from, model_name)
        load_state_dict_strict(model, state, source=cfg.init_from)
    images, labels = fashion_mnist("train", data_dir)
    x_all = normalize(images)
    # Weight decay on matrices only; embeddings, norms, biases and SSM vectors are left alone.
    decays = {n: p.dim() >= 2 and "pos_embed" not in n and "cls_token" not in n for n, p in model.named_parameters()}
    decay = [p for n, p in model.named_parameters() if decays[n]]
    no_decay = [p for n, p in model.named_parameters() if not decays[n]]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = len(x_all) // cfg.batch_size
    total = int(cfg.epochs * steps_per_epoch)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))

    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(total), desc=f"train {model_name}", mininterval=10, file=sys.stdout)
    perm = torch.randperm(len(x_all), generator=gen)
    running = None
    for step in bar:
        k = step % steps_per_epoch
        if k == 0 and step:
            perm = torch.randperm(len(x_all), generator=gen)
        idx = perm[k * cfg.batch_size:(k + 1) * cfg.batch_size]
        x = _augment(x_all[idx], gen)
        loss = F.cross_entropy(model(x), labels[idx], label_smoothing=cfg.label_smoothing)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}", lr=f"{lr_at(step):.2e}", refresh=False)
        if (step + 1) % steps_per_epoch == 0 and step + 1 < total:
            _save_epoch(model, model_name, Path(out_dir), card_name, cfg, (step + 1) / steps_per_epoch,
                        time.perf_counter() - t0, init_card)
    train_s = time.perf_counter() - t0
    model.eval()
    result = evaluate(model, "test", data_dir=data_dir, progress=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_weights(model, out_dir / f"{card_name}.safetensors")
    card = {
        "name": card_name,
        "model": model_name,
        "config": json.loads(json.dumps(asdict(model.config))),  # as the card file holds it (tuples as lists)
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist), train split 60,000 / test split 10,000",
        "normalization": {"mean": 0.2860, "std": 0.3530},
        "test_top1": round(result.top1, 2),
        "test_correct": result.correct,
        "train": {**asdict(cfg), "steps": total, "seconds": round(train_s, 1)},
        **(_continued(init_card, cfg.epochs, train_s) if init_card else {}),
        "eval_seconds": round(result.seconds, 1),
        "command": command,
        "seed": cfg.seed,
        "versions": _versions(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        **({"conditions": conditions} if conditions else {}),
        "reproduce": f"vmq eval {card_name}",
    }
    (out_dir / f"{card_name}.json").write_text(json.dumps(card, indent=2) + "\n")
    for suffix in (".safetensors", ".json"):  # the finished run supersedes its last epoch's checkpoint
        (out_dir / f"{card_name}-last{suffix}").unlink(missing_ok=True)
    log.info("%s: %s; trained %.1f min", card_name, result, train_s / 60)
    return card
