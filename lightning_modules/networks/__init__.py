"""Hand-written networks: only where no installable library has them (see each module)."""

from .resnet import ResNet18GN
from .unet1d import ConditionalUnet1D

__all__ = ["ResNet18GN", "ConditionalUnet1D"]
