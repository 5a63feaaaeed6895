import pytest
import torch

from vmq_fx.app.data import calibration_images, fashion_mnist, normalize
from vmq_fx.app.evaluate import evaluate
from vmq_fx.models import list_references, load_reference, reference_card



@pytest.mark.fashion_mnist
def test_loader_reads_the_real_files():
    images, labels = fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.min() == 0 and labels.max() == 9
    assert torch.equal(torch.bincount(labels), torch.full((10,), 1000))  # the test split is balanced
    train_images, train_labels = fashion_mnist("train")
    assert train_images.shape == (60000, 28, 28)
    assert torch.equal(torch.bincount(train_labels), torch.full((10,), 6000))
    x = normalize(images[:100])
    assert x.shape == (100, 1, 28, 28) and abs(float(x.mean())) < 0.3


@pytest.mark.fashion_mnist
def test_calibration_subset_is_seeded_and_from_the_training_split():
    a, b = calibration_images(32, seed=0), calibration_images(32, seed=0)
    assert torch.equal(a, b) and not torch.equal(a, calibration_images(32, seed=1))
    train = normalize(fashion_mnist("train")[0])
    flat = train.flatten(1)
    for img in a[:4]:
        assert (flat == img.flatten()).all(dim=1).any()  # each calibration image is a training image


def test_missing_data_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        fashion_mnist("validation", data_dir=tmp_path)


def test_corrupt_file_is_named(tmp_path):
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / stem).write_bytes(b"\x00\x00\x08\x01garbage")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte"):
        fashion_mnist("test", data_dir=tmp_path)


def test_environment_variable_overrides_location(tmp_path, monkeypatch):
    monkeypatch.setenv("VMQ_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        fashion_mnist("test")


@pytest.mark.parametrize("name", ["vim-fm-tiny", "vmamba-fm-tiny", "vim-fm-197"])
def test_reference_models_ship_and_load(name):
    assert name in list_references()
    card = reference_card(name)
    for key in ("config", "test_top1", "command", "seed", "train", "versions", "eval_seconds", "reproduce"):
        assert key in card
    assert card["train"]["seconds"] > 0 and card["eval_seconds"] > 0
    model = load_reference(name)
    assert not model.training
    # every tensor of the shipped file, read with safetensors itself, is in the model unchanged, and nothing else is
    from safetensors.torch import load_file

    from vmq_fx.models.reference import REFERENCE_DIR

    stored, state = load_file(str(REFERENCE_DIR / f"{name}.safetensors")), model.state_dict()
    assert set(stored) == set(state)
    assert all(torch.equal(stored[k], state[k]) for k in stored)


@pytest.mark.fashion_mnist
@pytest.mark.parametrize("name", ["vim-fm-tiny", "vmamba-fm-tiny", "vim-fm-197"])
def test_reference_accuracy_on_first_1000_test_images(name):
    # An untrained 10-class model sits near 10%; the shipped ones must be far above.
    result = evaluate(load_reference(name), limit=1000, progress=False)
    assert result.top1 > 85.0, result


def test_unknown_reference_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="vim-fm-tiny"):
        load_reference("resnet-50")


def test_continued_training_rejects_a_checkpoint_of_another_model(tmp_path):
    from vmq_fx.app.train import TrainConfig, train_reference

    with pytest.raises(ValueError, match="is a 'vmamba_fm_tiny' model, not 'vim_fm_tiny'"):
        train_reference("vim_fm_tiny", tmp_path, "x", TrainConfig(init_from="vmamba-fm-tiny"))
    with pytest.raises(ValueError, match="neither a .safetensors file nor a shipped reference model"):
        train_reference("vim_fm_tiny", tmp_path, "x", TrainConfig(init_from="vim-fm-huge"))
    weights = tmp_path / "run.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="model card"):  # without its card the provenance would be lost
        train_reference("vim_fm_tiny", tmp_path, "x", TrainConfig(init_from=str(weights)))
    assert not (tmp_path / "x.json").exists()


def test_continued_training_starts_from_the_given_weights():
    from vmq_fx.models import create_model
    from vmq_fx.models.checkpoint import load_state_dict_strict
    from vmq_fx.app.train import _load_init

    state, card = _load_init("vim-fm-tiny", "vim_fm_tiny")
    assert card == reference_card("vim-fm-tiny")
    model = create_model("vim_fm_tiny")
    load_state_dict_strict(model, state)
    shipped = load_reference("vim-fm-tiny").state_dict()
    assert all(torch.equal(v, shipped[k]) for k, v in model.state_dict().items())


def test_continued_run_card_embeds_the_earlier_card(tmp_path, monkeypatch):
    # Two steps on a few real-shaped images; the full-test evaluation is replaced so the test stays fast.
    import json

    import vmq_fx.app.train as train
    from vmq_fx.app.evaluate import EvalResult

    gen = torch.Generator().manual_seed(0)
    monkeypatch.setattr(train, "fashion_mnist", lambda split, data_dir=None: (
        torch.randint(0, 256, (256, 28, 28), dtype=torch.uint8, generator=gen), torch.arange(256) % 10))
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: EvalResult(50.0, 5, 10, 0.5))
    cfg = train.TrainConfig(epochs=1, warmup_steps=1, init_from="vim-fm-tiny")
    card = train.train_reference("vim_fm_tiny", tmp_path, "cont", cfg, command="vmq train ...")
    shipped = reference_card("vim-fm-tiny")
    assert card["init_from"] == shipped and json.loads((tmp_path / "cont.json").read_text()) == card
    assert card["total_train"]["epochs"] == shipped["total_train"]["epochs"] + 1  # a chain sums every stage
    assert card["total_train"]["seconds"] > shipped["total_train"]["seconds"]
    from safetensors.torch import load_file

    after, before = load_file(str(tmp_path / "cont.safetensors")), load_reference("vim-fm-tiny").state_dict()
    moved = [(after[k] - before[k]).norm() / before[k].norm() for k in before if before[k].is_floating_point()]
    assert 0 < max(moved) < 0.1  # trained a little, starting from the shipped weights (not a fresh init)


def test_a_stopped_run_leaves_its_last_epoch_to_continue_from(tmp_path, monkeypatch):
    import json

    import vmq_fx.app.train as train

    class Stopped(Exception):
        pass

    def stop(*a, **k):
        raise Stopped

    gen = torch.Generator().manual_seed(0)
    monkeypatch.setattr(train, "fashion_mnist", lambda split, data_dir=None: (
        torch.randint(0, 256, (256, 28, 28), dtype=torch.uint8, generator=gen), torch.arange(256) % 10))
    monkeypatch.setattr(train, "evaluate", stop)  # the run is stopped after its last step, before the final card
    cfg = train.TrainConfig(epochs=2, batch_size=128, warmup_steps=1)
    with pytest.raises(Stopped):
        train.train_reference("vim_fm_tiny", tmp_path, "run", cfg)
    card = json.loads((tmp_path / "run-last.json").read_text())
    assert card["model"] == "vim_fm_tiny" and card["train"]["epochs"] == 1 and "1 of 2" in card["partial"]
    state, loaded_card = train._load_init(str(tmp_path / "run-last.safetensors"), "vim_fm_tiny")
    from vmq_fx.models import create_model

    assert loaded_card == card and set(state) == set(create_model("vim_fm_tiny").state_dict())
