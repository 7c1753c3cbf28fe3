"""The methods. Each is one small module composing shared parts, its config section the
class's ``config`` dataclass; the registry of them is :data:`uda_ray.config.METHODS`."""

from .adabn import AdaBN
from .adaptseg import AdaptSeg
from .base import Method, ScheduledOptimizer
from .curriculum import Curriculum
from .dast import DAST
from .jal import JAL
from .mat import MAT
from .pww import PWW
from .source_only import SourceOnly

__all__ = ["Method", "ScheduledOptimizer", "AdaBN", "AdaptSeg", "SourceOnly", "MAT", "DAST", "JAL", "PWW",
           "Curriculum"]
