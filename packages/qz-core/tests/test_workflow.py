import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import qz_core
from qz_core import QzError

from conftest import TINY, random_batches


def _ptq(path, backend="x86", **kwargs):
    model = qz_core.get_model(TINY, weights=str(path), quantize=True, backend=backend, **kwargs)
    qz_core.calibrate(model, random_batches(), progress=False)
    return qz_core.convert(model)


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_ptq_converts_and_tracks_float(checkpoint, backend):
    path, float_model = checkpoint
    int8 = _ptq(path, backend)
    assert qz_core.is_quantized(int8) and torch.backends.quantized.engine == backend
    x = random_batches(1, seed=5)[0]
    with torch.no_grad():
        reference, out = float_model(x), int8(x)
    assert (out - reference).abs().max() < 0.1 * (reference.max() - reference.min())


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_qat_trains_and_converts(checkpoint, backend):
    path, _ = checkpoint
    model = qz_core.get_model(TINY, weights=str(path), quantize=True, is_qat=True, backend=backend)
    data = [(x, torch.randint(0, 4, (x.shape[0],))) for x in random_batches()]
    history = qz_core.train_qat(
        model, data, torch.nn.CrossEntropyLoss(), epochs=4, lr=1e-2, freeze_bn_after=2, progress=False
    )
    assert len(history) == 4 and all(torch.isfinite(torch.tensor(history)))
    assert all(b < a for a, b in zip(history, history[1:], strict=False)), (
        history
    )  # it learns the fixed labels, fake-quantized
    int8 = qz_core.convert(model)
    assert qz_core.is_quantized(int8)
    assert int8(random_batches(1)[0]).shape == (4, 4)


def test_calibrate_counts_and_limits(checkpoint):
    path, _ = checkpoint
    model = qz_core.get_model(TINY, weights=str(path), quantize=True)
    loader = DataLoader(TensorDataset(torch.randn(40, 3, 32, 32), torch.zeros(40)), batch_size=4)
    assert qz_core.calibrate(model, loader, progress=False) == 10
    assert qz_core.calibrate(model, loader, num_batches=3, progress=False) == 3
    assert qz_core.calibrate(model, loader, fraction=0.25, progress=False) == 3
    with pytest.raises(QzError, match="not both"):
        qz_core.calibrate(model, loader, num_batches=1, fraction=0.5)
    with pytest.raises(QzError, match=r"fraction must be in \(0, 1\]; got 1.5"):
        qz_core.calibrate(model, loader, fraction=1.5)


def test_zero_calibration_batches_is_an_error(checkpoint):
    model = qz_core.get_model(TINY, weights=str(checkpoint[0]), quantize=True)
    with pytest.raises(QzError, match="saw no batches"):
        qz_core.calibrate(model, [], progress=False)
    with pytest.raises(QzError, match="num_batches must be at least 1; got 0"):
        qz_core.calibrate(model, random_batches(), num_batches=0)


def test_convert_before_calibration_is_an_error():
    model = qz_core.get_model(TINY, quantize=True)
    with pytest.raises(QzError, match="has not been calibrated"):
        qz_core.convert(model)
    with pytest.raises(QzError, match="not prepared"):
        qz_core.convert(qz_core.get_model(TINY))
    with pytest.raises(QzError, match="needs a model built with quantize=True"):
        qz_core.calibrate(qz_core.get_model(TINY), random_batches())


def test_is_qat_without_quantize_is_refused():
    with pytest.raises(QzError, match="is_qat=True needs quantize=True"):
        qz_core.get_model(TINY, is_qat=True)


@pytest.mark.parametrize("kwargs", [{}, {"backend": "qnnpack"}, {"float_modules": ["fc"]}, {"fuse_level": "none"}])
def test_save_load_round_trip_is_identical(checkpoint, tmp_path, kwargs):
    int8 = _ptq(checkpoint[0], **kwargs)
    path = tmp_path / "tiny_int8.pt"
    qz_core.save_quantized(int8, path)
    loaded = qz_core.load_quantized(path)
    x = random_batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), int8(x))


def test_qat_model_round_trip(checkpoint, tmp_path):
    model = qz_core.get_model(TINY, weights=str(checkpoint[0]), quantize=True, is_qat=True)
    qz_core.train_qat(model, [(x, torch.zeros(4, dtype=torch.long)) for x in random_batches()],
                      torch.nn.CrossEntropyLoss(), progress=False)  # fmt: skip
    int8 = qz_core.convert(model)
    qz_core.save_quantized(int8, tmp_path / "qat.pt")
    x = random_batches(1, seed=3)[0]
    assert torch.equal(qz_core.load_quantized(tmp_path / "qat.pt")(x), int8(x))


def test_save_and_load_errors(checkpoint, tmp_path):
    with pytest.raises(QzError, match="takes a converted INT8 model"):
        qz_core.save_quantized(qz_core.get_model(TINY), tmp_path / "x.pt")
    with pytest.raises(QzError, match="does not exist"):
        qz_core.load_quantized(tmp_path / "missing.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(QzError, match="is not a qz INT8 model"):
        qz_core.load_quantized(tmp_path / "other.pt")
    (tmp_path / "damaged.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(QzError, match=r"Cannot read INT8 model file .*damaged.pt.*not a PyTorch file") as error:
        qz_core.load_quantized(tmp_path / "damaged.pt")
    assert "\n" not in str(error.value) and "internal" not in str(error.value)  # one line, no library advice


def test_estimate_bn_stats_trains_only_the_norms():
    from qz_core import estimate_bn_stats

    class NeedsTargetsInTraining(torch.nn.Module):  # like a torchvision detector
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(3)
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x):
            if self.training:
                raise AssertionError("targets should be passed in training mode")
            return self.drop(self.bn(x))

    model = NeedsTargetsInTraining().eval()
    batches = [torch.randn(4, 3, 8, 8) * 3 + 1 for _ in range(2)]
    estimate_bn_stats(model, batches)
    expected = torch.cat(batches).mean(dim=(0, 2, 3))
    assert torch.allclose(model.bn.running_mean, expected, atol=1e-5)
    assert not model.training and not model.bn.training and not model.drop.training
    assert model.bn.momentum == 0.1


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_calibration_data_is_refused(checkpoint, bad):
    model = qz_core.get_model(TINY, weights=str(checkpoint[0]), quantize=True)
    batches = random_batches()
    batches[1][0, 0, 3, 3] = bad
    with pytest.raises(QzError, match=r"Calibration batch 2 holds 1 non-finite value"):
        qz_core.calibrate(model, batches, progress=False)


def test_non_finite_weights_are_refused(checkpoint, tmp_path):
    state = torch.load(checkpoint[0])
    state["fc.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(QzError, match=r"hold NaN or Inf values in: fc.weight"):
        qz_core.get_model(TINY, weights=str(tmp_path / "nan.pth"))
