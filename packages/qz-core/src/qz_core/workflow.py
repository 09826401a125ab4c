"""Calibrate, train (QAT), convert, save and load INT8 models: the workflow, written once."""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from typing import Any

import torch
import torch.ao.quantization as tq
from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import FakeQuantizeBase, ObserverBase
from tqdm.auto import tqdm

from qz_core.backend import set_backend
from qz_core.builder import BuildRecipe
from qz_core.errors import QzError, unreadable_file
from qz_core.files import write_atomic

FORMAT = "qz.int8"
FORMAT_VERSION = 1


def batch_inputs(batch: Any) -> Any:
    """The model input of a batch: the batch itself, or the first item of (inputs, targets)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 1 and not isinstance(batch[0], (int, float)):
        return batch[0]
    return batch


def _activation_observers(model: nn.Module) -> dict[str, nn.Module]:
    # Activation observers hang off modules as `activation_post_process`; skip weight fake-quants
    # and the observer nested inside each FakeQuantize (its parent stands for it).
    found = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if (
            parts[-1] == "activation_post_process"
            and "weight_fake_quant" not in parts
            and parts[-2:-1] != ["activation_post_process"]
            and isinstance(module, (ObserverBase, FakeQuantizeBase))
        ):
            found[name] = module
    return found


def _observed(observer: nn.Module) -> bool:
    inner = getattr(observer, "activation_post_process", observer)
    min_val = getattr(inner, "min_val", None)
    if min_val is None:
        return True  # placeholder/fixed-qparams observers need no data
    return min_val.numel() > 0 and bool(torch.isfinite(min_val).all())


def is_prepared(model: nn.Module) -> bool:
    """True when ``model`` carries observers or fake-quant modules (it went through prepare)."""
    return bool(_activation_observers(model))


def ensure_calibrated(model: nn.Module) -> None:
    """Raises unless the prepared model's observers have seen data; warns about any that have not."""
    observers = _activation_observers(model)
    if not observers:
        raise QzError("The model is not prepared for quantization: build it with quantize=True first.")
    unseen = [name for name, obs in observers.items() if not _observed(obs)]
    if len(unseen) == len(observers):
        raise QzError(
            "The model has not been calibrated: none of its observers has seen data. "
            "Run qz_core.calibrate(model, data) (PTQ) or train it (QAT) before convert()."
        )
    if unseen:
        warnings.warn(
            f"{len(unseen)} observers saw no data and will use default scales: {', '.join(unseen[:5])}",
            stacklevel=3,
        )


@torch.no_grad()
def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    num_batches: int | None = None,
    fraction: float | None = None,
    progress: bool = True,
    inputs: Callable[[Any], Any] | None = None,
) -> int:
    """Feeds calibration batches through a PTQ-prepared model so its observers record ranges.

    Args:
        model: a model built with ``quantize=True``.
        data: batches (tensors, or (inputs, targets) tuples), e.g. a DataLoader.
        num_batches: stop after this many batches.
        fraction: use this fraction (0, 1] of ``data`` (which must have a length).
        progress: show a progress bar.
        inputs: what the model is called with for a batch (``Task.model_inputs``); ``batch_inputs`` by default.

    Returns:
        The number of batches fed.
    """
    if not is_prepared(model):
        raise QzError("calibrate() needs a model built with quantize=True (it has no observers).")
    if num_batches is not None and fraction is not None:
        raise QzError("Pass num_batches or fraction, not both.")
    total = len(data) if hasattr(data, "__len__") else None
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise QzError(f"fraction must be in (0, 1]; got {fraction}.")
        if total is None:
            raise QzError("fraction needs data with a length (a DataLoader or a list).")
        num_batches = max(1, math.ceil(fraction * total))
    if num_batches is not None and num_batches < 1:
        raise QzError(f"num_batches must be at least 1; got {num_batches}.")
    limit = min(x for x in (num_batches, total) if x is not None) if (num_batches or total) else None
    model.eval()
    seen = 0
    for batch in tqdm(data, total=limit, desc="calibrate", unit="batch", disable=not progress):
        if num_batches is not None and seen >= num_batches:
            break
        batch_input = (inputs or batch_inputs)(batch)
        _check_finite(batch_input, f"Calibration batch {seen + 1}")
        model(batch_input)
        seen += 1
    if seen == 0:
        raise QzError("Calibration saw no batches: the calibration data is empty.")
    return seen


def output_tensors(value: Any) -> list[Tensor]:
    """The tensors in a model input or output (tensors, dicts, lists, tuples), flattened in order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in output_tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in output_tensors(v)]
    return []


def _check_finite(value: Any, where: str) -> None:
    """Observers turn one NaN or Inf into a model whose every output is NaN: refuse it, saying where."""
    for tensor in output_tensors(value):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise QzError(f"{where} holds {bad} non-finite value(s) (NaN or Inf): check the images and the transform.")


def train_qat(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    *,
    step_loss: Callable[[nn.Module, Any], Tensor] | None = None,
    epochs: int = 1,
    lr: float = 1e-4,
    optimizer: torch.optim.Optimizer | None = None,
    freeze_bn_after: int | None = None,
    freeze_observers_after: int | None = None,
    progress: bool = True,
) -> list[float]:
    """Quantization-aware training of a model built with ``quantize=True, is_qat=True``.

    BatchNorm statistics and observer ranges can be frozen after given epochs, as the usual
    QAT recipe does once ranges settle. The loss of a batch is ``loss_fn(model(inputs), targets)``
    for (inputs, targets) batches, or ``step_loss(model, batch)`` (``Task.training_loss``).

    Returns:
        The mean loss of each epoch.
    """
    if not is_prepared(model):
        raise QzError("train_qat() needs a model built with quantize=True, is_qat=True.")
    if epochs < 1:
        raise QzError(f"epochs must be at least 1; got {epochs}.")
    if (loss_fn is None) == (step_loss is None):
        raise QzError("train_qat() takes loss_fn or step_loss, exactly one of them.")
    if step_loss is None:

        def step_loss(module: nn.Module, batch: Any) -> Tensor:
            inputs, targets = batch
            return loss_fn(module(inputs), targets)

    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    history = []
    for epoch in tqdm(range(epochs), desc="QAT", unit="epoch", disable=not progress):
        model.train()
        if freeze_observers_after is not None and epoch >= freeze_observers_after:
            model.apply(tq.disable_observer)
        if freeze_bn_after is not None and epoch >= freeze_bn_after:
            model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
        losses = []
        bar = tqdm(data, desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=not progress)
        for batch in bar:
            optimizer.zero_grad()
            loss = step_loss(model, batch)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if not losses:
            raise QzError("QAT saw no batches: the training data is empty.")
        history.append(sum(losses) / len(losses))
    model.eval()
    return history


def convert(model: nn.Module, *, inplace: bool = False, check: bool = True) -> nn.Module:
    """Converts a calibrated (PTQ) or trained (QAT) model to INT8 on the engine it was built for."""
    if check:
        ensure_calibrated(model)
    recipe = getattr(model, "qz_recipe", None)
    backend = set_backend(recipe.options.backend if isinstance(recipe, BuildRecipe) else None)
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    tq.convert(model, inplace=True)
    if isinstance(recipe, BuildRecipe):
        model.qz_recipe = replace(recipe, converted=True, options=replace(recipe.options, backend=backend))
    return model


@torch.no_grad()
def estimate_bn_stats(model: nn.Module, batches: Iterable[Any]) -> None:
    """Re-estimates BatchNorm running statistics from ``batches`` (cumulative average).

    Random-weight models otherwise push activations to zero or infinity, and their INT8 error
    and latency mean nothing. Only the BatchNorm layers are put in training mode: the rest of the
    model (dropout, an inference path that needs no targets) runs as in eval.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for batch in batches:
            model(batch)
    finally:
        for m, training in modes.items():
            m.training = training
        for m, momentum in momenta.items():
            m.momentum = momentum


def is_quantized(model: nn.Module) -> bool:
    """True when ``model`` holds converted INT8 modules."""
    return any(
        type(m).__module__.startswith("torch.ao.nn.quantized") and not isinstance(m, FloatFunctional)
        for m in model.modules()
    )


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Saves a converted INT8 model (state and build recipe) so it loads back without calibration."""
    if not is_quantized(model):
        raise QzError("save_quantized() takes a converted INT8 model: call qz_core.convert(model) first.")
    recipe = getattr(model, "qz_recipe", None)
    if not isinstance(recipe, BuildRecipe):
        raise QzError("The model has no qz build recipe: build it with a registered qz builder to save it.")
    plain = recipe.to_dict()
    _check_plain(plain, "recipe")
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "recipe": plain,
        "torch": str(torch.__version__),
        "state_dict": model.state_dict(),
    }
    write_atomic(path, lambda file: torch.save(payload, file))


def _check_plain(value: Any, where: str) -> None:
    # The recipe must load with weights_only=True: plain Python values only.
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise QzError(
            f"Cannot save {where}={value!r}: INT8 model files keep only plain builder arguments "
            "(str, int, float, bool, lists, dicts)."
        )


def _prime_observers(model: nn.Module) -> None:
    # Gives each observer a range so convert() can run; load_state_dict then sets the real scales.
    for observer in _activation_observers(model).values():
        observer(torch.tensor([0.0, 1.0]))


def load_quantized(path: str | os.PathLike) -> nn.Module:
    """Loads an INT8 model written by ``save_quantized``: rebuild, convert, then load its state."""
    from qz_core.registry import get_model  # the registry imports task packages lazily

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise QzError(f"INT8 model file {os.fspath(path)!r} does not exist.") from None
    except Exception as exc:  # noqa: BLE001
        raise unreadable_file("INT8 model file", os.fspath(path), exc) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise QzError(f"{os.fspath(path)!r} is not a qz INT8 model (written by qz_core.save_quantized).")
    if payload.get("version") != FORMAT_VERSION:
        raise QzError(
            f"{os.fspath(path)!r} is a qz INT8 file of format version {payload.get('version')!r}; "
            f"this qz reads version {FORMAT_VERSION}."
        )
    recipe = BuildRecipe.from_dict(payload.get("recipe") or {})
    # The saved state sets every scale; cheap min/max observers avoid histogram searches at convert.
    options = asdict(recipe.options) | {"activation_observer": "minmax"}
    model = get_model(
        recipe.name,
        quantize=True,
        is_qat=recipe.is_qat,
        skip_fuse=recipe.skip_fuse,
        **recipe.model_kwargs,
        **options,
    )
    _prime_observers(model)
    model = convert(model, inplace=True, check=False)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise QzError(
            f"INT8 model file {os.fspath(path)!r} does not match its recipe ({recipe.name}): {first}"
        ) from None
    model.qz_recipe = replace(model.qz_recipe, options=recipe.options)
    return model
