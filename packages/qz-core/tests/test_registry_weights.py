import pytest
import torch
from torch import nn

import qz_core
from qz_core import (
    ModelSpec,
    QzError,
    define_model,
    list_models,
    load_state_dict_strict,
    read_checkpoint,
    resolve_weights,
)
from qz_core.registry import _natural_key

from conftest import TINY, TOY_TASK, TinyNet


def test_duplicate_registration_raises():
    with pytest.raises(QzError, match=f"already registered under the name '{TINY}'"):
        define_model(ModelSpec(name=TINY, task=TOY_TASK.name, family="tiny", make_model=nn.Identity))


def test_unknown_task_is_named():
    with pytest.raises(QzError, match=r"Invalid task 'qz_test_tsk'.*Did you mean 'qz_test_task'"):
        define_model(ModelSpec(name="x", task="qz_test_tsk", family="tiny", make_model=nn.Identity))
    assert "x" not in list_models()


def test_builder_has_the_seed_signature_and_spec():
    import inspect

    builder = qz_core.get_model_builder(TINY)
    parameters = inspect.signature(builder).parameters
    assert list(parameters) == ["weights", "progress", "quantize", "is_qat", "skip_fuse", "kwargs"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(parameters.values())[:5])
    assert builder.spec is qz_core.get_model_spec(TINY) and builder.__name__ == TINY
    assert qz_core.get_model_task(TINY) is TOY_TASK


def test_list_models_filters_and_sorts_naturally():
    assert TINY in list_models("qz_test_*")
    assert TINY not in list_models("qz_test_*", exclude="*tiny*")
    assert TINY in list_models(task=TOY_TASK.name)
    with pytest.raises(QzError, match="Invalid task 'detectoin'"):
        list_models(task="detectoin")
    assert sorted(["resnet152", "resnet18", "resnet50"], key=_natural_key) == ["resnet18", "resnet50", "resnet152"]


def test_unknown_model_suggests_closest():
    with pytest.raises(QzError, match=r"Invalid model name 'qz_test_tinynt'.*Did you mean 'qz_test_tinynet'"):
        qz_core.get_model("qz_test_tinynt")


def test_builder_stamps_recipe():
    model = qz_core.get_model(TINY, num_classes=3)
    recipe = qz_core.recipe_of(model)
    assert (
        recipe.name == TINY
        and recipe.model_kwargs == {"num_classes": 3}
        and recipe.options.backend in ("x86", "qnnpack")
    )
    assert qz_core.BuildRecipe.from_dict(recipe.to_dict()) == recipe


def test_unconverted_model_equals_float_model_exactly(checkpoint):
    path, float_model = checkpoint
    model = qz_core.get_model(TINY, weights=str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), float_model(x))
        prepared = qz_core.get_model(TINY, weights=str(path), quantize=True)
        torch.testing.assert_close(prepared(x), float_model(x), atol=1e-5, rtol=1e-5)


def test_checkpoint_with_wrong_keys_names_them(tmp_path):
    state = TinyNet().state_dict()
    state["extra.weight"] = state.pop("fc.weight")
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(QzError, match=r"missing keys: fc\.weight; unexpected keys: extra\.weight"):
        qz_core.get_model(TINY, weights=str(path))


def test_checkpoint_with_wrong_class_count_suggests_num_classes(tmp_path):
    path = tmp_path / "ten.pth"
    torch.save(TinyNet(num_classes=10).state_dict(), path)
    with pytest.raises(QzError, match=r"fc\.weight: checkpoint \(10, 8\) vs model \(4, 8\).*num_classes="):
        qz_core.get_model(TINY, weights=str(path))
    assert qz_core.get_model(TINY, weights=str(path), num_classes=10).fc.out_features == 10


def test_checkpoint_layouts(tmp_path):
    state = TinyNet().state_dict()
    torch.save({"model": state, "epoch": 3}, tmp_path / "nested.pth")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    for name in ("nested.pth", "ddp.pth"):
        assert read_checkpoint(tmp_path / name).keys() == state.keys()
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(QzError, match=r"Cannot read checkpoint '.*junk.pth': not a PyTorch file \((\w+Error)"):
        read_checkpoint(tmp_path / "junk.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(QzError, match="holds no state dict"):
        read_checkpoint(tmp_path / "list.pth")


def test_missing_weights_file_and_bad_name():
    from torchvision.models import ResNet18_Weights

    with pytest.raises(QzError, match=r"Weights file 'nope/model\.pth' does not exist"):
        resolve_weights("nope/model.pth", ResNet18_Weights)
    with pytest.raises(QzError, match=r"Invalid weights 'IMAGENET1K_V9'.*Valid weights: DEFAULT, IMAGENET1K_V1"):
        resolve_weights("IMAGENET1K_V9", ResNet18_Weights)
    assert resolve_weights("DEFAULT", ResNet18_Weights).enum_member is ResNet18_Weights.IMAGENET1K_V1
    assert resolve_weights("ResNet18_Weights.IMAGENET1K_V1", ResNet18_Weights).enum_member.name == "IMAGENET1K_V1"


def test_strict_loader_allows_only_observer_buffers():
    model = qz_core.get_model(TINY, quantize=True)
    float_state = {k: v for k, v in model.state_dict().items() if "activation_post_process" not in k}
    load_state_dict_strict(model, float_state, "test")
    with pytest.raises(QzError, match="missing keys"):
        load_state_dict_strict(model, {}, "empty")


def test_failed_download_is_one_line_with_the_url(monkeypatch):
    import urllib.error

    import torchvision.models._api
    from torchvision.models import ResNet18_Weights

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    source = resolve_weights("DEFAULT", ResNet18_Weights)
    with pytest.raises(
        QzError, match=r"Downloading weights ResNet18_Weights.IMAGENET1K_V1 failed .*name resolution"
    ) as err:
        source.state_dict(progress=False)
    assert ResNet18_Weights.DEFAULT.url in str(err.value) and "--weights path/to/file.pth" in str(err.value)
