"""The one builder path of qz: a typed per-model spec, one build sequence, a typed recipe.

Every public builder of every task package is made by ``define_model(spec)``: resolve the weights and
the backend once, construct, load the weights once (strictly), eval, fuse (unless ``skip_fuse``), then
qconfig and prepare/prepare_qat. What differs per family arrives as the spec's named hooks.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Generic, Protocol, TypeVar

import torch
import torch.ao.quantization as tq
from torch import nn
from torchvision.models import WeightsEnum

from qz_core.backend import resolve_backend, set_backend
from qz_core.errors import QzError, invalid_choice
from qz_core.fusion import RELU6_MODES, check_fuse_level
from qz_core.partial import keep_float, quantize_from
from qz_core.qconfig import keep_relu6, make_qconfig
from qz_core.weights import WeightsSource, load_state_dict_strict, resolve_weights

WeightsArg = WeightsSource | WeightsEnum | str | os.PathLike | None
M = TypeVar("M", bound=nn.Module, covariant=True)


@dataclass
class QuantOptions:
    """Quantization keywords every qz builder accepts besides the model's own.

    Attributes:
        backend: quantized engine ('x86', 'qnnpack', ...); the platform's when None.
        fuse_level: 'all', 'blocks' (residual blocks only) or 'none'.
        activation_observer: activation observer name or None for the backend default.
        weight_observer: weight observer name or None for the backend default.
        reduce_range: 7-bit activations; None for the backend default.
        allow_saturation: accept full-range activations on x86 (warns instead of raising).
        float_modules: dotted names of submodules kept in float behind DeQuant/Quant stubs.
        quantize_from: dotted name of the stage where quantization starts; all before stays float.
        relu6: what a conv-bn-ReLU6 fused as conv-ReLU computes in INT8 (``qz_core.qconfig.keep_relu6``):
            'clamp' (its output range ends at 6: ReLU6 where saturation bounds it, at no cost), 'exact' (ReLU6
            on every engine, with a quantized ReLU6 where needed) or 'relu' (as torchvision's quantizable MobileNets).
    """

    backend: str | None = None
    fuse_level: str = "all"
    activation_observer: str | None = None
    weight_observer: str | None = None
    reduce_range: bool | None = None
    allow_saturation: bool = False
    float_modules: Sequence[str] = field(default_factory=tuple)
    quantize_from: str | None = None
    relu6: str = "clamp"

    def __post_init__(self) -> None:
        self.float_modules = tuple(self.float_modules)
        check_fuse_level(self.fuse_level)
        if self.relu6 not in RELU6_MODES:
            raise invalid_choice("relu6", self.relu6, RELU6_MODES)

    @classmethod
    def pop_from(cls, kwargs: dict[str, Any]) -> QuantOptions:
        """Takes this class's keys out of ``kwargs`` (leaving the model's own)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})


@dataclass
class BuildRecipe:
    """How a model was built: enough to rebuild it (``load_quantized``) without its weights.

    Attributes:
        name: the registered model name.
        model_kwargs: the constructor's keyword arguments (plain values only).
        quantize: prepared for quantization.
        is_qat: prepared for quantization-aware training.
        skip_fuse: fusion was left to the caller.
        options: the quantization options, with the backend resolved.
        converted: the model holds INT8 modules.
    """

    name: str
    model_kwargs: dict[str, Any]
    quantize: bool
    is_qat: bool
    skip_fuse: bool
    options: QuantOptions
    converted: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as an INT8 file stores them."""
        return asdict(self) | {"options": asdict(self.options) | {"float_modules": list(self.options.float_modules)}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BuildRecipe:
        """The recipe of a saved INT8 file; unknown or missing keys are an error."""
        try:
            options = QuantOptions(**({"relu6": "relu"} | data["options"]))  # files made before the option
            known = {f.name for f in fields(cls)} - {"options"}
            return cls(options=options, **{k: data[k] for k in known if k in data})
        except (KeyError, TypeError) as exc:
            raise QzError(f"The build recipe is damaged or from another qz version: {exc}.") from None


@dataclass(frozen=True)
class BuildContext:
    """What a spec's hooks see of one build: the resolved weights and the builder's own flags."""

    source: WeightsSource | None
    progress: bool
    quantize: bool
    is_qat: bool


@dataclass(frozen=True)
class LoadedWeights:
    """A state dict read by a spec's ``read_weights`` hook, and what it says of the model.

    Attributes:
        state_dict: float weights with the model's key names.
        model_kwargs: constructor arguments the checkpoint fixes (``num_classes``).
        attributes: attributes set on the built model (class names).
    """

    state_dict: Mapping[str, torch.Tensor]
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    attributes: Mapping[str, Any] = field(default_factory=dict)


def metadata_kwargs(source: WeightsSource) -> dict[str, Any]:
    """Constructor arguments an enum's metadata fixes: ``num_classes`` from its categories."""
    categories = source.meta.get("categories")
    return {"num_classes": len(categories)} if categories is not None else {}


def read_weights_default(context: BuildContext) -> LoadedWeights:
    """A torchvision enum's or a checkpoint file's state dict, with what the enum's metadata fixes."""
    source = context.source
    assert source is not None
    return LoadedWeights(source.state_dict(progress=context.progress), metadata_kwargs(source))


@dataclass(frozen=True)
class ModelSpec:
    """Everything qz knows of one model, fixed at definition: a missing field is an error then.

    Attributes:
        name: registered name (torchvision's where it has one).
        task: the name of the task package's ``Task`` (``qz list --task``).
        family: architecture family, for tables and targets.
        make_model: builds the unfused float quantizable model from keyword arguments.
        weights_enum: torchvision weights enum, if the model has one.
        input_size: (H, W) of a typical input, for examples, benchmarks and exports.
        fixed_kwargs: arguments this variant sets (ResNeXt's ``groups``); another value is an error.
        read_weights: reads the resolved weights (a hook for checkpoint formats of other tools).
        adjust_kwargs: adds or checks constructor arguments given the resolved weights.
        transient_kwargs: arguments used at build but not stored in the recipe (backbone weights).
        preprocess: the input transform when the weights do not bring their own.
        deployed_ratio_target: INT8/FP32 latency ratio ``qz bench`` asks of this model.
        probe_kwargs: builder arguments of the deployable model (support probes and exports).
        description: one line for docstrings and ``qz list``.
    """

    name: str
    task: str
    family: str
    make_model: Callable[..., nn.Module]
    weights_enum: type[WeightsEnum] | None = None
    input_size: tuple[int, int] = (224, 224)
    fixed_kwargs: Mapping[str, Any] = field(default_factory=dict)
    read_weights: Callable[[BuildContext], LoadedWeights] = read_weights_default
    adjust_kwargs: Callable[[BuildContext, dict[str, Any]], None] | None = None
    transient_kwargs: tuple[str, ...] = ()
    preprocess: Callable[[], Callable[..., Any]] | None = None
    deployed_ratio_target: float = 1.0
    probe_kwargs: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def variant(self, **changes: Any) -> ModelSpec:
        """A copy with other fields (a family's specs share all but a few)."""
        return replace(self, **changes)


class ModelBuilder(Protocol[M]):
    """The public builder of one model, with the seed signature."""

    spec: ModelSpec

    def __call__(
        self,
        *,
        weights: WeightsArg = None,
        progress: bool = True,
        quantize: bool = False,
        is_qat: bool = False,
        skip_fuse: bool = False,
        **kwargs: Any,
    ) -> M: ...


def prepare_quantizable(
    model: nn.Module, *, quantize: bool, is_qat: bool, skip_fuse: bool, options: QuantOptions, backend: str
) -> nn.Module:
    """Runs eval, fuse (unless ``skip_fuse``), then qconfig and prepare/prepare_qat on ``model``.

    With ``quantize=False`` nothing is fused or prepared, so the model computes exactly what the
    float model computes. The model must define ``fuse_model(is_qat, level)``.
    """
    model.eval()
    if not quantize:
        return model
    if not skip_fuse and options.fuse_level != "none":
        model.fuse_model(is_qat=is_qat, level=options.fuse_level)
    set_backend(backend)
    model.qconfig = make_qconfig(
        backend,
        is_qat=is_qat,
        activation=options.activation_observer,
        weight=options.weight_observer,
        reduce_range=options.reduce_range,
        allow_saturation=options.allow_saturation,
    )
    keep_float(model, options.float_modules)
    if options.quantize_from:
        quantize_from(model, options.quantize_from)
    if options.relu6 != "relu":
        keep_relu6(model, exact=options.relu6 == "exact")
    if is_qat:
        model.train()
        tq.prepare_qat(model, inplace=True)
    else:
        tq.prepare(model, inplace=True)
    return model


def _apply_fixed(spec: ModelSpec, kwargs: dict[str, Any]) -> None:
    for key, value in spec.fixed_kwargs.items():
        if kwargs.setdefault(key, value) != value:
            raise QzError(f"{spec.name} has {key}={value!r}; got {key}={kwargs[key]!r}.")


def _merge_checkpoint_kwargs(spec: ModelSpec, loaded: LoadedWeights, label: str, kwargs: dict[str, Any]) -> None:
    for key, expected in loaded.model_kwargs.items():
        given = kwargs.setdefault(key, expected)
        if given != expected:
            raise QzError(f"{key}={given!r} does not match weights {label} of {spec.name} ({key}={expected!r}).")


def build_model(
    spec: ModelSpec,
    *,
    weights: WeightsArg = None,
    progress: bool = True,
    quantize: bool = False,
    is_qat: bool = False,
    skip_fuse: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Builds model ``spec`` the qz way: the body of every public builder.

    Args:
        spec: the model's spec.
        weights: None, a weights enum member or name, or a local checkpoint path.
        progress: show a download progress bar.
        quantize: prepare for quantization (PTQ, or QAT with ``is_qat``).
        is_qat: prepare for quantization-aware training.
        skip_fuse: leave fusion to the caller.
        **kwargs: ``QuantOptions`` fields and the model constructor's own arguments.

    Raises:
        QzError: bad weights, arguments that contradict the variant or the weights, ``is_qat`` without
            ``quantize``.
    """
    if is_qat and not quantize:
        raise QzError("is_qat=True needs quantize=True: QAT is a way to quantize.")
    options = QuantOptions.pop_from(kwargs)
    backend = resolve_backend(options.backend)
    options.backend = backend
    source = resolve_weights(weights, spec.weights_enum)
    context = BuildContext(source, progress, quantize, is_qat)
    _apply_fixed(spec, kwargs)
    if spec.adjust_kwargs is not None:  # before reading weights: a bad argument fails before any download
        spec.adjust_kwargs(context, kwargs)
    if source is not None:  # what the metadata fixes is checked before any download
        _merge_checkpoint_kwargs(spec, LoadedWeights({}, metadata_kwargs(source)), source.label, kwargs)
    loaded = spec.read_weights(context) if source is not None else None
    if loaded is not None:
        _merge_checkpoint_kwargs(spec, loaded, source.label, kwargs)
    model = spec.make_model(**kwargs)
    if loaded is not None:
        load_state_dict_strict(model, loaded.state_dict, source.label)
        for key, value in loaded.attributes.items():
            setattr(model, key, value)
    prepare_quantizable(model, quantize=quantize, is_qat=is_qat, skip_fuse=skip_fuse, options=options, backend=backend)
    stored = {k: v for k, v in kwargs.items() if k not in spec.transient_kwargs}
    model.qz_recipe = BuildRecipe(spec.name, stored, quantize, is_qat, skip_fuse, options)
    return model


def prepare_built(model: nn.Module, *, is_qat: bool = False, **options: Any) -> nn.Module:
    """Prepares a float model built by a qz builder (``quantize=False``), as if built with ``quantize=True``.

    Lets one build serve both the FP32 reference and the INT8 model: copy the float model first.
    """
    recipe = recipe_of(model)
    if recipe.quantize:
        raise QzError(f"{recipe.name} is already prepared for quantization.")
    merged = QuantOptions(**(asdict(recipe.options) | options))
    merged.backend = resolve_backend(merged.backend)
    prepare_quantizable(model, quantize=True, is_qat=is_qat, skip_fuse=False, options=merged, backend=merged.backend)
    model.qz_recipe = replace(recipe, quantize=True, is_qat=is_qat, options=merged)
    return model


def recipe_of(model: nn.Module) -> BuildRecipe:
    """The build recipe of a model built by a qz builder."""
    recipe = getattr(model, "qz_recipe", None)
    if not isinstance(recipe, BuildRecipe):
        raise QzError(f"{type(model).__name__} was not built by a qz builder: it has no build recipe.")
    return recipe


_BUILDER_DOC = """Quantizable {name}{description}.

Args:
    weights: None (random weights), {weights}or a path to a checkpoint file.
    progress: show a download progress bar.
    quantize: prepare for quantization (PTQ; QAT with ``is_qat``).
    is_qat: prepare for quantization-aware training.
    skip_fuse: leave fusion to the caller.
    **kwargs: ``qz_core.QuantOptions`` fields and the model constructor's arguments.
"""

_SIGNATURE = inspect.Signature(
    [
        inspect.Parameter("weights", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="WeightsArg"),
        inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=True, annotation="bool"),
        inspect.Parameter("quantize", inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool"),
        inspect.Parameter("is_qat", inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool"),
        inspect.Parameter("skip_fuse", inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool"),
        inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD, annotation="Any"),
    ],
    return_annotation="nn.Module",
)


class _Builder(Generic[M]):
    """A public builder: calls ``build_model`` with its spec; reads like a function to help() and IDEs."""

    def __init__(self, spec: ModelSpec, module: str) -> None:
        self.spec = spec
        self.__name__ = self.__qualname__ = spec.name
        self.__module__ = module
        self.__signature__ = _SIGNATURE
        weights = f"a ``{spec.weights_enum.__name__}`` member or name (``'DEFAULT'``), " if spec.weights_enum else ""
        description = f": {spec.description}" if spec.description else ""
        self.__doc__ = _BUILDER_DOC.format(name=spec.name, description=description, weights=weights)

    def __call__(
        self,
        *,
        weights: WeightsArg = None,
        progress: bool = True,
        quantize: bool = False,
        is_qat: bool = False,
        skip_fuse: bool = False,
        **kwargs: Any,
    ) -> M:
        return build_model(  # type: ignore[return-value]
            self.spec,
            weights=weights,
            progress=progress,
            quantize=quantize,
            is_qat=is_qat,
            skip_fuse=skip_fuse,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"<qz builder {self.spec.name} ({self.spec.task}, {self.spec.family})>"


def define_model(spec: ModelSpec, *, module: str | None = None) -> ModelBuilder[Any]:
    """Registers ``spec`` and returns its public builder (``name = define_model(ModelSpec(...))``).

    Args:
        spec: the model's spec.
        module: the module the builder is documented in (the caller's by default).

    Raises:
        QzError: the name is taken.
    """
    from qz_core.registry import register_spec

    if module is None:
        frame = inspect.currentframe()
        module = frame.f_back.f_globals.get("__name__", __name__) if frame and frame.f_back else __name__
    builder: _Builder[Any] = _Builder(spec, module)
    register_spec(spec, builder)
    return builder
