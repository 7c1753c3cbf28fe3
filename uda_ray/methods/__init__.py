"""The methods. Each is one small module composing shared parts; importing this package
registers every method's config section."""

from .adabn import AdaBN
from .adaptseg import AdaptSeg
from .base import Method, ScheduledOptimizer
from .curriculum import Curriculum
from .dast import DAST
from .jal import JAL
from .mat import MAT
from .pww import PWW
from .source_only import SourceOnly

METHODS: dict[str, type[Method]] = {m.name: m for m in (SourceOnly, AdaBN, AdaptSeg, MAT, DAST, JAL, PWW, Curriculum)}

__all__ = ["METHODS", "Method", "ScheduledOptimizer", "AdaBN", "AdaptSeg", "SourceOnly", "MAT", "DAST", "JAL", "PWW",
           "Curriculum"]
