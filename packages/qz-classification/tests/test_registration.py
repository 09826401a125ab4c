"""What every registered classifier tells qz-core: its family and the latency target ``qz bench`` holds it to."""

from __future__ import annotations

from qz_classification._registry import DEPLOYED_RATIO_TARGETS
from qz_core import get_model_entry, list_models


def test_every_family_with_a_target_has_it_on_each_model() -> None:
    # Only qz-classification's own models: other tests register toy classifiers of their own.
    names = list_models(task="classification")
    names = [n for n in names if get_model_entry(n).builder.__module__.startswith("qz_classification.")]
    assert len(names) >= 67
    families = {get_model_entry(n).meta["family"] for n in names}
    assert set(DEPLOYED_RATIO_TARGETS) <= families  # no target names a family that does not exist
    for name in names:
        meta = get_model_entry(name).meta
        expected = DEPLOYED_RATIO_TARGETS.get(meta["family"])
        assert meta.get("deployed_ratio_target") == expected, name
    assert get_model_entry("resnet50").meta["deployed_ratio_target"] == 0.18
    assert "deployed_ratio_target" not in get_model_entry("googlenet").meta  # held to qz-core's default: < 1
