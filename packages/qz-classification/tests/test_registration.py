"""What every registered classifier tells qz-core: its spec (family, latency target, input size) and its builder."""

from __future__ import annotations

import inspect

import pytest

import qz_classification
from qz_classification._common import DEPLOYED_RATIO_TARGETS
from qz_core import get_model_builder, get_model_spec, get_task, list_models
from qz_core.registry import unregister_model

SEED_PARAMETERS = [
    ("weights", inspect.Parameter.KEYWORD_ONLY, None),
    ("progress", inspect.Parameter.KEYWORD_ONLY, True),
    ("quantize", inspect.Parameter.KEYWORD_ONLY, False),
    ("is_qat", inspect.Parameter.KEYWORD_ONLY, False),
    ("skip_fuse", inspect.Parameter.KEYWORD_ONLY, False),
    ("kwargs", inspect.Parameter.VAR_KEYWORD, inspect.Parameter.empty),
]


def own_models() -> list[str]:
    # Only qz-classification's own models: other tests register toy classifiers of their own.
    names = list_models(task="classification")
    return [n for n in names if get_model_builder(n).__module__.startswith("qz_classification.models.")]


def test_every_family_with_a_target_has_it_on_each_model() -> None:
    names = own_models()
    assert len(names) >= 67
    families = {get_model_spec(n).family for n in names}
    assert set(DEPLOYED_RATIO_TARGETS) <= families  # no target names a family that does not exist
    for name in names:
        spec = get_model_spec(name)
        assert spec.deployed_ratio_target == DEPLOYED_RATIO_TARGETS.get(spec.family, 1.0), name


@pytest.mark.parametrize(
    ("name", "family", "target", "input_size"),
    [
        ("resnet50", "resnet", 0.15, (224, 224)),
        ("vgg16_bn", "vgg", 0.15, (224, 224)),
        ("mobilenet_v3_small", "mobilenet", 0.25, (224, 224)),
        ("efficientnet_b3", "efficientnet", 0.5, (300, 300)),
        ("googlenet", "googlenet", 1.0, (224, 224)),  # held to qz-core's default: INT8 faster than FP32
        ("inception_v3", "inception", 1.0, (299, 299)),
    ],
)
def test_spec_of_a_few_models(name, family, target, input_size) -> None:
    spec = get_model_spec(name)
    assert (spec.name, spec.task, spec.family) == (name, "classification", family)
    assert spec.deployed_ratio_target == target and spec.input_size == input_size
    transform = spec.preprocess()
    assert transform.crop_size == [input_size[0]] and transform.resize_size == [int(input_size[0] * 256 / 224)]


def test_every_builder_has_the_seed_signature_and_its_spec() -> None:
    for name in own_models():
        builder = get_model_builder(name)
        parameters = inspect.signature(builder).parameters.values()
        assert [(p.name, p.kind, p.default) for p in parameters] == SEED_PARAMETERS, name
        assert builder.spec is get_model_spec(name) and builder.__name__ == name
        assert getattr(qz_classification, name) is builder  # the public name, importable from the package
        assert get_model_spec(name).weights_enum is not None, name


def test_every_spec_is_of_the_installed_task() -> None:
    task = get_task("classification")
    assert task is get_task(get_model_spec("resnet18").task)
    assert (task.name, task.metric) == ("classification", "top-1")


def test_unregistered_model_is_gone() -> None:
    from torch import nn

    from qz_core import ModelSpec, define_model

    define_model(ModelSpec(name="qz_test_throwaway", task="classification", family="test", make_model=nn.Identity))
    assert "qz_test_throwaway" in list_models(task="classification")
    unregister_model("qz_test_throwaway")
    assert "qz_test_throwaway" not in list_models(task="classification")


def test_builders_import_from_the_package_in_a_fresh_interpreter() -> None:
    import subprocess
    import sys

    code = "from qz_classification import resnet18, demo, models; print(resnet18.__name__, models.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["resnet18", "qz_classification.models"]
