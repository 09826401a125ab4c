"""Top-k accuracy of classifiers, FP32 or INT8."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qz_core import QzError


@torch.inference_mode()
def topk_accuracy(
    model: nn.Module,
    data: Iterable[tuple[Tensor, Tensor]],
    topk: Sequence[int] = (1, 5),
    *,
    desc: str = "evaluate",
    progress: bool = True,
) -> dict[str, float]:
    """Top-k accuracy in percent over (images, labels) batches, e.g. ``{"top1": 76.1, "top5": 92.9}``."""
    model.eval()
    correct = dict.fromkeys(topk, 0)
    total = 0
    for images, labels in tqdm(data, desc=desc, unit="batch", disable=not progress):
        logits = model(images)
        k_max = min(max(topk), logits.shape[1])
        predicted = logits.topk(k_max, dim=1).indices
        hits = predicted.eq(labels.view(-1, 1))
        for k in topk:
            correct[k] += int(hits[:, :k].any(dim=1).sum())
        total += labels.numel()
    if total == 0:
        raise QzError("Evaluation saw no images: the data is empty.")
    return {f"top{k}": 100.0 * correct[k] / total for k in topk}
