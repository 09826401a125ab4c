import pytest
import torch
from torch.ao.quantization import FakeQuantizeBase

from qz_core import QzError, make_qconfig, platform_backend, resolve_backend, set_backend


@pytest.mark.parametrize(
    ("machine", "engine"), [("x86_64", "x86"), ("AMD64", "x86"), ("aarch64", "qnnpack"), ("arm64", "qnnpack")]
)
def test_platform_picks_engine(machine, engine):
    assert platform_backend(machine) == engine


def test_unknown_platform_names_it_and_the_way_out():
    with pytest.raises(QzError, match=r"Unknown platform 'riscv64'.*backend="):
        platform_backend("riscv64")


def test_explicit_and_env_backend_override_platform(monkeypatch):
    monkeypatch.delenv("QZ_BACKEND", raising=False)
    assert resolve_backend() == platform_backend()
    assert resolve_backend("qnnpack") == "qnnpack"
    monkeypatch.setenv("QZ_BACKEND", "qnnpack")
    assert resolve_backend() == "qnnpack"
    assert resolve_backend("x86") == "x86"


def test_unsupported_backend_lists_valid_engines(monkeypatch):
    with pytest.raises(QzError, match=r"Invalid backend 'tensorrt'.*Valid backends: .*qnnpack.*x86"):
        resolve_backend("tensorrt")
    monkeypatch.setenv("QZ_BACKEND", "fbgemmm")
    with pytest.raises(QzError, match=r"QZ_BACKEND 'fbgemmm'.*Did you mean 'fbgemm'"):
        resolve_backend()


def test_set_backend_sets_torch_engine():
    assert set_backend("qnnpack") == "qnnpack"
    assert torch.backends.quantized.engine == "qnnpack"
    set_backend("x86")
    assert torch.backends.quantized.engine == "x86"


def test_default_qconfigs_per_backend():
    x86 = make_qconfig("x86").activation()
    assert x86.reduce_range is True
    assert make_qconfig("qnnpack").activation().reduce_range is False
    assert isinstance(make_qconfig("x86", is_qat=True).activation(), FakeQuantizeBase)


def test_observer_overrides():
    qconfig = make_qconfig("x86", activation="minmax", weight="minmax")
    assert type(qconfig.activation()).__name__ == "MinMaxObserver"
    weight = qconfig.weight()
    assert type(weight).__name__ == "MinMaxObserver" and weight.qscheme == torch.per_tensor_symmetric
    per_channel = make_qconfig("x86", weight="moving_average_per_channel_minmax").weight()
    assert per_channel.qscheme == torch.per_channel_symmetric
    qat = make_qconfig("qnnpack", is_qat=True, activation="minmax").activation()
    assert isinstance(qat, FakeQuantizeBase) and (qat.quant_min, qat.quant_max) == (0, 255)


def test_unknown_observer_names_choices():
    with pytest.raises(QzError, match=r"Invalid activation observer 'histogramm'.*Did you mean 'histogram'"):
        make_qconfig("x86", activation="histogramm")


def test_full_range_activations_on_x86_are_refused_with_the_reason():
    with pytest.raises(QzError, match=r"full 8-bit range.*saturate.*80% to 25%"):
        make_qconfig("x86", reduce_range=False)
    with pytest.raises(QzError, match="saturate"):
        make_qconfig("x86", is_qat=True, activation="minmax", reduce_range=False)
    with pytest.warns(UserWarning, match="saturate"):
        make_qconfig("x86", reduce_range=False, allow_saturation=True)
    make_qconfig("qnnpack", reduce_range=False)  # qnnpack's kernels do not saturate
