"""The QAT loss of torchvision's segmentation recipe."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from torch.nn import functional as F

from qz_core import QzError

# Pascal VOC marks object borders and unlabelled pixels with 255.
IGNORE_INDEX = 255


class SegmentationLoss(nn.Module):
    """Per-pixel cross-entropy of torchvision's segmentation recipe: ``out`` plus 0.5 x ``aux``.

    Takes the model's output (an ``OrderedDict`` with ``"out"`` and maybe ``"aux"``, or a bare
    logits tensor) and integer masks ``(N, H, W)`` in which ``ignore_index`` pixels do not count.
    """

    def __init__(self, aux_weight: float = 0.5, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index

    def forward(self, output: Mapping[str, Tensor] | Tensor, target: Tensor) -> Tensor:
        if isinstance(output, Tensor):
            output = {"out": output}
        if "out" not in output:
            raise QzError(f"SegmentationLoss needs an 'out' entry in the model output; got {sorted(output)}.")
        target = target.long()
        if target.dim() == 4 and target.shape[1] == 1:
            target = target[:, 0]
        loss = F.cross_entropy(output["out"], target, ignore_index=self.ignore_index)
        if "aux" in output and self.aux_weight:
            loss = loss + self.aux_weight * F.cross_entropy(output["aux"], target, ignore_index=self.ignore_index)
        return loss
