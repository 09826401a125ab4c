"""Resolving the ``weights=`` argument and loading state dicts strictly."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import WeightsEnum

from qz_core.errors import QzError, invalid_choice, unreadable_file

# Buffers that prepare()/prepare_qat() add; a float checkpoint never has them.
_QUANT_STATE_MARKERS = ("activation_post_process", "weight_fake_quant", "fake_quant")
# BatchNorm fills in a missing counter itself (checkpoints from before it existed lack it).
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)
_CHECKPOINT_KEYS = ("model", "state_dict", "model_state_dict")


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights come from: a torchvision enum member or a local checkpoint file."""

    enum_member: WeightsEnum | None = None
    path: Path | None = None

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.enum_member.meta) if self.enum_member is not None else {}

    @property
    def label(self) -> str:
        return str(self.enum_member) if self.enum_member is not None else str(self.path)

    def state_dict(self, progress: bool = True) -> dict[str, torch.Tensor]:
        """The weights: downloaded (or from torch's cache) for an enum member, read for a file.

        Raises:
            QzError: the download failed (with the URL to fetch by hand) or the file is not a checkpoint.
        """
        if self.enum_member is None:
            return read_checkpoint(self.path)
        try:
            return self.enum_member.get_state_dict(progress=progress, check_hash=True)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError; a hash mismatch a RuntimeError
            reason = str(getattr(exc, "reason", exc)).splitlines()[0]
            raise QzError(
                f"Downloading weights {self.label} failed ({reason}). Without network, fetch "
                f"{self.enum_member.url} elsewhere and pass the file: --weights path/to/file.pth."
            ) from None


def resolve_weights(
    weights: WeightsSource | WeightsEnum | str | os.PathLike | None, weights_enum: type[WeightsEnum] | None
) -> WeightsSource | None:
    """Turns ``weights`` into a ``WeightsSource``.

    Args:
        weights: None, a resolved source (returned as is), an enum member, its name (``"DEFAULT"``, ``"V2"``,
            ``"SomeModel_Weights.V2"``) or a path to a local checkpoint.
        weights_enum: the model's torchvision weights enum, if it has one.

    Raises:
        QzError: a name that is not a member and not an existing file.
    """
    if weights is None or isinstance(weights, WeightsSource):
        return weights
    if isinstance(weights, WeightsEnum):
        if weights_enum is not None and not isinstance(weights, weights_enum):
            raise invalid_choice("weights", str(weights), _names(weights_enum))
        return WeightsSource(enum_member=weights)
    if isinstance(weights, (str, os.PathLike)):
        text = os.fspath(weights)
        if weights_enum is not None:
            key = text.replace(weights_enum.__name__ + ".", "")
            if key in weights_enum.__members__:
                return WeightsSource(enum_member=weights_enum[key])
        path = Path(text).expanduser()
        if path.is_file():
            return WeightsSource(path=path)
        hint = "or a path to an existing checkpoint file"
        if path.suffix in {".pt", ".pth", ".ckpt", ".bin"} or os.sep in text:
            raise QzError(f"Weights file {text!r} does not exist. Expected {hint}, or one of {_names(weights_enum)}.")
        raise invalid_choice("weights", text, _names(weights_enum), hint=f"Pass one of them {hint}.")
    raise QzError(f"weights must be None, a WeightsEnum member, a name or a path; got {type(weights).__name__}.")


def _names(weights_enum: type[WeightsEnum] | None) -> list[str]:
    return sorted(weights_enum.__members__) if weights_enum is not None else []


def read_checkpoint(path: os.PathLike | str) -> dict[str, torch.Tensor]:
    """Reads a float state dict from a ``.pt``/``.pth`` file (plain, or under 'model'/'state_dict')."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and tensor errors all mean 'not a checkpoint'
        raise unreadable_file("checkpoint", path, exc) from exc
    if isinstance(payload, Mapping):
        for key in _CHECKPOINT_KEYS:
            if isinstance(payload.get(key), Mapping):
                payload = payload[key]
                break
    if not isinstance(payload, Mapping) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise QzError(
            f"Checkpoint {str(path)!r} holds no state dict: expected a mapping of tensor names to tensors, "
            f"or one under {', '.join(repr(k) for k in _CHECKPOINT_KEYS)}."
        )
    # Keep torch's `_metadata` (module versions): some modules load older layouts by version.
    metadata = getattr(payload, "_metadata", None)
    state = OrderedDict(payload)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = OrderedDict((k[len("module.") :], v) for k, v in state.items())
        if metadata is not None:
            metadata = OrderedDict(
                (k[len("module.") :] if k.startswith("module") else k, v) for k, v in metadata.items()
            )
    if metadata is not None:
        state._metadata = metadata
    return state


def _is_quant_state(key: str) -> bool:
    return any(marker in key for marker in _QUANT_STATE_MARKERS)


def _summarize(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Loads ``state_dict`` and raises on any missing, unexpected or misshapen key.

    Only observer and fake-quant buffers, which a float checkpoint never holds, may be absent.
    A model may define ``match_checkpoint(state_dict)`` to adapt an older checkpoint layout first.
    """
    adapt = getattr(model, "match_checkpoint", None)
    if adapt is not None:
        adapt(state_dict)
    expected = model.state_dict()
    missing = [
        k for k in expected if k not in state_dict and not _is_quant_state(k) and not k.endswith(_OPTIONAL_SUFFIXES)
    ]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and isinstance(v, torch.Tensor) and not v.is_quantized and v.shape != expected[k].shape
    ]
    non_finite = [
        k
        for k, v in state_dict.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.isfinite().all()
    ]
    if non_finite:
        raise QzError(f"Weights {source!r} hold NaN or Inf values in: {_summarize(non_finite)}.")
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_summarize(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_summarize(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_summarize(shapes, 4)}")
        raise QzError(
            f"Weights {source!r} do not match {type(model).__name__}: {'; '.join(parts)}. "
            "Check the model name, and pass num_classes= if the checkpoint has another number of classes."
        )
    model.load_state_dict(state_dict, strict=False)
