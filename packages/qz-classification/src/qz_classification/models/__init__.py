"""Quantizable classification models; importing this module registers them with qz-core."""

from qz_classification.models.convnext import *  # noqa: F403
from qz_classification.models.densenet import *  # noqa: F403
from qz_classification.models.efficientnet import *  # noqa: F403
from qz_classification.models.googlenet import *  # noqa: F403
from qz_classification.models.inception import *  # noqa: F403
from qz_classification.models.mnasnet import *  # noqa: F403
from qz_classification.models.mobilenetv2 import *  # noqa: F403
from qz_classification.models.mobilenetv3 import *  # noqa: F403
from qz_classification.models.regnet import *  # noqa: F403
from qz_classification.models.resnet import *  # noqa: F403
from qz_classification.models.shufflenetv2 import *  # noqa: F403
from qz_classification.models.squeezenet import *  # noqa: F403
from qz_classification.models.vgg import *  # noqa: F403
