"""The study's axes: sweep names and values (from ``--sweep`` or a YAML/JSON file) turned into row configurations."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub

from qz_core.errors import QzError, invalid_choice
from qz_core.fusion import FUSE_LEVELS, RELU6_MODES
from qz_core.qconfig import ACTIVATION_OBSERVERS, WEIGHT_OBSERVERS

SEED_SWEEPS = ("fusion", "observers", "start", "calibration")
SWEEPS = (*SEED_SWEEPS, "relu6")
ALL_STAGES = "all"
DEFAULT_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(1, 11))
_OBSERVER_KEYS = ("activation", "weight", "reduce_range")


@dataclass(frozen=True)
class RowConfig:
    """One quantization configuration of the study: enough to rebuild the row.

    Attributes:
        fuse_level: 'none', 'blocks' or 'all'.
        activation_observer: activation observer name; None for the backend default qconfig.
        weight_observer: weight observer name; None for the backend default.
        reduce_range: 7-bit activations; None for the backend default.
        quantize_from: the stage where quantization starts; None quantizes everything.
        calib_fraction: the fraction (0, 1] of the calibration folder's batches fed.
        relu6: what a fused conv-bn-ReLU6 computes in INT8 ('clamp' or 'relu', ``QuantOptions.relu6``).
    """

    fuse_level: str = "all"
    activation_observer: str | None = None
    weight_observer: str | None = None
    reduce_range: bool | None = None
    quantize_from: str | None = None
    calib_fraction: float = 1.0
    relu6: str = "clamp"

    def quant_options(self) -> dict[str, Any]:
        """The builder's ``QuantOptions`` keywords; full-range activations are studied, so saturation is allowed."""
        return {
            "fuse_level": self.fuse_level,
            "activation_observer": self.activation_observer,
            "weight_observer": self.weight_observer,
            "reduce_range": self.reduce_range,
            "allow_saturation": self.reduce_range is False,
            "quantize_from": self.quantize_from,
            "relu6": self.relu6,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the row cache and the CSV)."""
        return asdict(self)


@dataclass(frozen=True)
class StudyPlan:
    """The sweeps to run: each a list of configurations that differ from ``base`` in one axis."""

    base: RowConfig
    sweeps: dict[str, list[RowConfig]]

    def configs(self) -> list[RowConfig]:
        """Every distinct configuration, in sweep order (a configuration two sweeps share runs once)."""
        return list(dict.fromkeys(c for rows in self.sweeps.values() for c in rows))


def stage_names(model: nn.Module) -> list[str]:
    """Where quantization can start: top-level children that are stages (hold submodules and weights).

    The first stage is left out when nothing with weights runs before it (starting there quantizes everything).
    """
    stages, weighted_before = [], False
    for name, child in model.named_children():
        if isinstance(child, (QuantStub, DeQuantStub)):
            continue
        has_weights = next(child.parameters(), None) is not None
        if has_weights and next(child.children(), None) is not None and weighted_before:
            stages.append(name)
        weighted_before = weighted_before or has_weights
    return stages


def _fusion(value: Any) -> dict[str, Any]:
    if value not in FUSE_LEVELS:
        raise invalid_choice("fusion value", value, FUSE_LEVELS)
    return {"fuse_level": value}


def _observers(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise QzError(f"An observers value is a mapping of {', '.join(_OBSERVER_KEYS)}; got {value!r}.")
    unknown = set(value) - set(_OBSERVER_KEYS)
    if unknown:
        raise invalid_choice("observers key", sorted(unknown)[0], _OBSERVER_KEYS)
    activation, weight = value.get("activation", "histogram"), value.get("weight", "per_channel_minmax")
    if activation not in ACTIVATION_OBSERVERS:
        raise invalid_choice("activation observer", activation, ACTIVATION_OBSERVERS)
    if weight not in WEIGHT_OBSERVERS:
        raise invalid_choice("weight observer", weight, WEIGHT_OBSERVERS)
    reduce_range = value.get("reduce_range")
    if reduce_range not in (None, True, False):
        raise QzError(f"reduce_range is true, false or left out; got {reduce_range!r}.")
    return {"activation_observer": activation, "weight_observer": weight, "reduce_range": reduce_range}


def _start(value: Any, stages: Sequence[str]) -> dict[str, Any]:
    if value == ALL_STAGES or value is None:
        return {"quantize_from": None}
    if value not in stages:
        raise invalid_choice("start stage", value, [ALL_STAGES, *stages], hint="(the model's top-level stages)")
    return {"quantize_from": value}


def _calibration(value: Any) -> dict[str, Any]:
    text = str(value).strip()
    try:
        fraction = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        fraction = None
    if fraction is None or not 0 < fraction <= 1:
        raise QzError(f"A calibration value is a fraction in (0, 1] or a percentage like 10%; got {value!r}.")
    return {"calib_fraction": fraction}


def _relu6(value: Any) -> dict[str, Any]:
    if value not in RELU6_MODES:
        raise invalid_choice("relu6 value", value, RELU6_MODES)
    return {"relu6": value}


def default_values(sweep: str, stages: Sequence[str]) -> list[Any]:
    """The seed study's values of one axis."""
    if sweep == "fusion":
        return list(FUSE_LEVELS)
    if sweep == "observers":
        return [
            {"activation": "histogram", "reduce_range": rr, "weight": w}
            for rr in (True, False)
            for w in WEIGHT_OBSERVERS
        ]
    if sweep == "start":
        return [ALL_STAGES, *stages]
    if sweep == "relu6":
        return list(RELU6_MODES)
    return list(DEFAULT_FRACTIONS)


def axis_changes(sweep: str, value: Any, stages: Sequence[str]) -> dict[str, Any]:
    """The ``RowConfig`` fields one axis value sets."""
    if sweep == "fusion":
        return _fusion(value)
    if sweep == "observers":
        return _observers(value)
    if sweep == "start":
        return _start(value, stages)
    if sweep == "relu6":
        return _relu6(value)
    return _calibration(value)


def check_sweep_names(names: Sequence[str]) -> list[str]:
    """The sweep names, each one of ``SWEEPS``, without repeats."""
    if not names:
        raise QzError(f"No sweep named. Valid sweeps: {', '.join(SWEEPS)}.")
    for name in names:
        if name not in SWEEPS:
            raise invalid_choice("sweep", name, SWEEPS)
    return list(dict.fromkeys(names))


def default_sweeps(model: nn.Module) -> dict[str, list[Any] | None]:
    """The seed study's four sweeps, and ``relu6`` when ``model`` has a ReLU6 that fusion would change."""
    has_relu6 = any(type(m) is nn.ReLU6 for m in model.modules())
    return dict.fromkeys([*SEED_SWEEPS, "relu6"] if has_relu6 else SEED_SWEEPS)


def parse_sweep_option(text: str) -> dict[str, list[Any] | None]:
    """``--sweep fusion,start``: the named sweeps with their default values (None)."""
    return dict.fromkeys(check_sweep_names([p.strip() for p in text.split(",") if p.strip()]))


def _base(values: Any) -> RowConfig:
    if values is None:
        return RowConfig()
    if not isinstance(values, Mapping):
        raise QzError(f"'base' is a mapping of {', '.join(f.name for f in fields(RowConfig))}; got {values!r}.")
    names = [f.name for f in fields(RowConfig)]
    for key in values:
        if key not in names:
            raise invalid_choice("base key", key, names)
    base = RowConfig(**values)
    _fusion(base.fuse_level)
    _calibration(base.calib_fraction)
    _relu6(base.relu6)
    if base.activation_observer is not None or base.weight_observer is not None:
        _observers({"activation": base.activation_observer or "histogram", "weight": base.weight_observer or "minmax"})
    return base


def read_axes_file(path: str | Path) -> tuple[dict[str, list[Any] | None], RowConfig]:
    """Sweeps and base configuration from a YAML (``.yaml``/``.yml``, needs PyYAML) or JSON file.

    The file maps sweep names to lists of values (null: the seed study's values) and may hold ``base``:
    the ``RowConfig`` fields every row starts from. Example::

        fusion: [none, all]
        observers:
          - {activation: histogram, weight: minmax, reduce_range: true}
        calibration: [10%, 50%, 100%]
        base: {calib_fraction: 0.5}
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise QzError(f"--axes {str(path)!r} is not an existing file.")
    data = _read_mapping(path)
    base = _base(data.pop("base", None))
    sweeps = {name: data[name] for name in check_sweep_names(list(data))}
    for name, values in sweeps.items():
        if values is not None and (not isinstance(values, list) or not values):
            raise QzError(f"--axes {str(path)!r}: sweep {name!r} needs a non-empty list of values; got {values!r}.")
    return sweeps, base


def _read_mapping(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise QzError(
                "Reading a YAML --axes file needs PyYAML (pip install pyyaml); or give a .json file."
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise QzError(f"--axes {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}.") from None
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise QzError(f"--axes {str(path)!r} is not valid JSON: {exc}.") from None
    else:
        raise QzError(f"--axes {str(path)!r} should end in .yaml, .yml or .json.")
    if not isinstance(data, dict):
        raise QzError(f"--axes {str(path)!r} must map sweep names to values; got {type(data).__name__}.")
    return data


def make_plan(sweeps: Mapping[str, list[Any] | None], base: RowConfig, stages: Sequence[str]) -> StudyPlan:
    """The configurations of each sweep: ``base`` with one axis set to each value (the defaults where None)."""
    plan = {}
    for name, values in sweeps.items():
        chosen = default_values(name, stages) if values is None else values
        configs = [replace(base, **axis_changes(name, value, stages)) for value in chosen]
        plan[name] = list(dict.fromkeys(configs))
    return StudyPlan(base, plan)


def row_label(sweep: str, config: RowConfig) -> str:
    """The short name of a row in one sweep's table: the value of the sweep's axis."""
    if sweep == "fusion":
        return config.fuse_level
    if sweep == "observers":
        rr = {None: "default", True: "True", False: "False"}[config.reduce_range]
        activation, weight = config.activation_observer or "default", config.weight_observer or "default"
        return f"act {activation} (reduce_range={rr}) / w {weight}"
    if sweep == "start":
        return config.quantize_from or ALL_STAGES
    if sweep == "relu6":
        return config.relu6
    return f"{config.calib_fraction:.0%}"
