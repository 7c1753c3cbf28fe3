"""One typed config with flat dotted keys (``adaptseg.lambda_adv_main``).

Every knob is a typed scalar declared once with its default (the paper's where there is
one), its allowed range or choices, and a one-line comment. The same flat names are used
in YAML files, ``--set key=value`` overrides, Ray Tune search spaces and MLflow rows.
Unknown keys and out-of-range values are rejected when the config is built, with a message
naming the key.

Sections: ``run``, ``data``, ``model``, ``optim`` (shared by all methods) and the section of
the active method only (``method: adaptseg`` brings ``adaptseg.*``). A method declares its
section as its class's ``config`` dataclass of :func:`~uda_ray.knobs.knob` fields; the
registry :data:`METHODS` is filled here, where configs are built.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from .errors import did_you_mean
from .knobs import ConfigError, knob
from .methods import (AdaBN, AdaptSeg, Curriculum, DAST, JAL, MAT, PWW, Method, SourceOnly)


class _Devices:
    """The values of ``run.device``, as a knob's ``choices``: ``cuda:<index>`` is any index."""

    names = ("auto", "cpu", "cuda", "cuda:<index>")

    def __contains__(self, value) -> bool:
        return isinstance(value, str) and (value in self.names[:3] or re.fullmatch(r"cuda:\d+", value) is not None)

    def __iter__(self):
        return iter(self.names)


DEVICES = _Devices()


@dataclass
class RunConfig:
    name: str = knob("", "run name (default: <method>-s<seed>)")
    seed: int = knob(0, "seed of weights init, data order and augmentation", lo=0)
    out: str = knob("runs", "folder holding run directories")
    iterations: int = knob(150_000, "training iterations (AdaptSegNet stops at 150k)", lo=0)
    schedule_iterations: int = knob(250_000, "poly schedule horizon (AdaptSegNet: 250k; 0 = iterations)", lo=0)
    log_every: int = knob(50, "iterations between loss logs, at most iterations/20 so that a short run still "
                              "draws curves (each log is the loop's one host sync)", lo=1)
    eval_every: int = knob(5_000, "iterations between target-val evaluations (0 = at the end only)", lo=0)
    checkpoint_every: int = knob(5_000, "iterations between checkpoints (0 = at the end only)", lo=0)
    device: str = knob("auto", "auto, cpu, cuda or cuda:<index>", choices=DEVICES)
    amp: bool = knob(True, "bf16 autocast on CUDA (on CPU only with run.cpu_amp)")
    channels_last: bool = knob(True, "channels_last memory format on CUDA (on CPU only with run.cpu_amp)")
    cpu_amp: bool = knob(False, "apply run.amp and run.channels_last on CPU too (tests, benchmarks; bf16 is "
                                "slow on most CPUs, so CPU runs stay fp32 and contiguous by default)")
    compile: bool = knob(False, "torch.compile the segmenter's backbone and heads (first steps compile)")
    num_workers: int = knob(4, "data loader workers per domain", lo=0)
    init_from: str = knob("", "checkpoint (file or run dir) whose segmenter weights start this run")
    max_val_images: int = knob(0, "evaluate on the first N target-val images (0 = all)", lo=0)
    mosaic_images: int = knob(4, "target-val images in the prediction mosaic", lo=0)
    grad_probe_every: int = knob(0, "iterations between probes of each loss term's gradient norm and its ratio to "
                                    "the segmentation term's (grad/*; 0 = off; a diagnostic, not part of a row's "
                                    "identity: training is bit-identical)", lo=0)


@dataclass
class DataConfig:
    root: str = knob("data/synth", "data root; dataset folders below are relative to it")
    synth: bool = knob(False, "generate the embedded benchmark under data.root when it is missing (only into "
                              "an empty folder or one the benchmark wrote; an existing one is used as it is, or "
                              "refused if its seed or regime differ; the tiny-cpu/study-cpu presets set it)")
    synth_seed: int = knob(0, "seed of the embedded benchmark", lo=0)
    synth_regime: str = knob("default", "domain-shift regime of the embedded benchmark")
    source: str = knob("gta5", "source reader", choices=("gta5", "synthia", "cityscapes", "bdd100k"))
    source_dir: str = knob("gta5", "source folder (below data.root unless absolute)")
    source_split: str = knob("all", "source split")
    target: str = knob("cityscapes", "target reader", choices=("cityscapes", "bdd100k", "gta5", "synthia"))
    target_dir: str = knob("cityscapes", "target folder (below data.root unless absolute)")
    target_split: str = knob("train", "unlabelled target training split")
    val_split: str = knob("val", "target split that is evaluated and reported")
    select_n: int = knob(100, "labelled target-train images carved out as the selection split "
                              "(model/trial selection; removed from adaptation; 0 = none)", lo=0)
    select_seed: int = knob(0, "seed of the selection split's draw", lo=0)
    source_val_n: int = knob(0, "source images held out for the label-free src/mIoU criterion (0 = none)", lo=0)
    num_classes: int = knob(19, "label space: 19, or 16 for SYNTHIA -> Cityscapes", choices=(19, 16))
    source_w: int = knob(1280, "source resize width (GTA5 protocol: 1280x720)", lo=8)
    source_h: int = knob(720, "source resize height", lo=8)
    target_w: int = knob(1024, "target resize width (Cityscapes protocol: 1024x512)", lo=8)
    target_h: int = knob(512, "target resize height", lo=8)
    batch_size: int = knob(1, "images per domain per iteration (reference: 1)", lo=1)
    norm: str = knob("imagenet", "input normalisation of the backbone", choices=("imagenet", "caffe"))
    scale_min: float = knob(1.0, "random rescale lower bound (1 = off; reference: off)", lo=0.1, hi=4.0)
    scale_max: float = knob(1.0, "random rescale upper bound", lo=0.1, hi=4.0)
    crop_w: int = knob(0, "random crop width (0 = no crop)", lo=0)
    crop_h: int = knob(0, "random crop height (0 = no crop)", lo=0)
    flip: bool = knob(False, "random horizontal flip (reference: off)")


@dataclass
class ModelConfig:
    arch: str = knob("deeplabv2_r101", "segmenter",
                     choices=("deeplabv2_r101", "deeplabv2_vgg16", "r18_ppm", "tiny", "mat_r101", "mat_tiny",
                              "tiny_ppm"))
    pretrained: str = knob("", "encoder weights: a file path, 'torchvision' (ImageNet, the local cache), 'embedded' "
                               "(the embedded ImageNet stand-in), 'embedded_seg' (its ADE20k stand-in) or '' (random)")
    multi_level: bool = knob(True, "auxiliary head on the penultimate stage (multi-level adaptation)")
    num_decoders: int = knob(1, "PPM decoders on the shared encoder (r18_ppm, tiny_ppm; curriculum: 2)", lo=1)
    ppm_bins: str = knob("1,2,3,6", "pyramid pooling output sizes of each PPM decoder, comma-separated "
                                    "(PSPNet and the curriculum paper: 6, 3, 2, 1)")
    bn: str = knob("frozen", "BatchNorm: shared stats, frozen stats, or per-domain stats",
                   choices=("shared", "frozen", "per_domain"))
    reference_layout: bool = knob(False, "deeplabv2_r101 as AdaptSegNet's released code builds it: ASPP sums "
                                         "only its first two branches, ceil-mode stem pool, stride on the 1x1 "
                                         "convs (Caffe), first dilated blocks at their stage's dilation; off: the "
                                         "DeepLab-v2 paper's layout (torchvision's ResNet)")


@dataclass
class OptimConfig:
    lr: float = knob(2.5e-4, "segmenter SGD learning rate (reference 2.5e-4)", lo=0.0, lo_open=True)
    momentum: float = knob(0.9, "segmenter SGD momentum", lo=0.0, hi=1.0)
    weight_decay: float = knob(5e-4, "segmenter SGD weight decay", lo=0.0)
    head_lr_mult: float = knob(10.0, "learning-rate multiplier of the classifier heads", lo=0.0)
    poly_power: float = knob(0.9, "poly decay power", lo=0.0)
    d_lr: float = knob(1e-4, "discriminator Adam learning rate (reference 1e-4)", lo=0.0, lo_open=True)
    d_beta1: float = knob(0.9, "discriminator Adam beta1", lo=0.0, hi=1.0)
    d_beta2: float = knob(0.99, "discriminator Adam beta2", lo=0.0, hi=1.0)


SECTIONS: dict[str, type] = {"run": RunConfig, "data": DataConfig, "model": ModelConfig, "optim": OptimConfig}

# The one method registry: name -> Method class, whose ``config`` is its section's dataclass.
METHODS: dict[str, type[Method]] = {m.name: m for m in (SourceOnly, AdaBN, AdaptSeg, MAT, DAST, JAL, PWW,
                                                        Curriculum)}


@dataclass
class Config:
    method: str
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    params: Any = None  # the method's section

    def section(self, name: str):
        return self.params if name == self.method else getattr(self, name)

    def section_names(self) -> list[str]:
        return [*SECTIONS, self.method]

    def flat(self) -> dict[str, Any]:
        """One flat dict: ``{"method": ..., "run.seed": ..., "adaptseg.lambda_adv_main": ...}``."""
        out: dict[str, Any] = {"method": self.method}
        for name in self.section_names():
            sec = self.section(name)
            for f in fields(sec):
                out[f"{name}.{f.name}"] = getattr(sec, f.name)
        return out

    def get(self, key: str):
        sec, _, attr = key.partition(".")
        return getattr(self.section(sec), attr)

    @property
    def run_name(self) -> str:
        return self.run.name or f"{self.method}-s{self.run.seed}"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.flat(), sort_keys=False)


# Decimal text with an optional exponent. PyYAML follows YAML 1.1, which reads 1e-3, 1E3 and
# +1e-3 as strings (it wants a dot and a signed exponent: 1.0e-3), so these are parsed here.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _number(key: str, value, typ: type):
    """The value of an int or float knob from a number or its decimal text (``1e-3``). NaN and
    infinity are refused (they pass every range check); an int must be exact (``1e3`` is 1000,
    ``1.5e0`` is refused)."""
    num = Decimal(value.strip()) if isinstance(value, str) and _NUMBER.fullmatch(value.strip()) else value
    if isinstance(num, bool) or not isinstance(num, (numbers.Real, Decimal)):
        raise ConfigError(f"{key}: expected {'an integer' if typ is int else 'a number'}, got {value!r}")
    if typ is float:
        if not math.isfinite(num):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(num)
    if not isinstance(num, numbers.Integral) and not (math.isfinite(num) and abs(num) < 2**63
                                                      and num == math.floor(num)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return int(num)


def _coerce(key: str, f: dataclasses.Field, value):
    typ = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}[f.type]
    if isinstance(value, str) and typ is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{key}: cannot parse {value!r} as {typ.__name__}") from None
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif typ is int or typ is float:
        value = _number(key, value, typ)
    elif typ is str:
        if value is None:
            value = ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        value = str(value)
    m = f.metadata
    if m.get("choices") is not None and value not in m["choices"]:
        raise ConfigError(f"{key}: must be one of {list(m['choices'])}, got {value!r}")
    lo, hi = m.get("lo"), m.get("hi")
    if lo is not None and (value < lo or (m.get("lo_open") and value == lo)):
        raise ConfigError(f"{key}: must be {'>' if m.get('lo_open') else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: must be <= {hi}, got {value!r}")
    return value


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested YAML mappings -> dotted keys (``{"run": {"seed": 1}}`` -> ``{"run.seed": 1}``).

    Raises:
        ConfigError: a key given both nested and dotted (``{"run": {"seed": 1}, "run.seed": 2}``),
            where one of the two values would be dropped silently.
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        for sub, value in (flatten(v, key + ".") if isinstance(v, dict) else {key: v}).items():
            if sub in out:
                raise ConfigError(f"{sub} is set twice (nested and dotted); keep one")
            out[sub] = value
    return out


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, first: int, again: int):
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a config key given twice, which PyYAML resolves by
    keeping the last value silently: a key repeated in one mapping (``run:`` twice, or
    ``seed:`` twice under ``run:``), and a dotted key that repeats a nested one
    (``run: {seed: 1}`` and ``run.seed: 2``). A merge key (``<<: *base``) still overrides:
    its keys are YAML's way to be replaced."""

    def construct_document(self, node):
        self._check_keys(node, "", {}, set())
        return super().construct_document(node)

    def _check_keys(self, node, prefix: str, leaves: dict[str, int], path: set) -> None:
        if not isinstance(node, yaml.MappingNode) or id(node) in path:  # (an alias may refer to itself)
            return
        here: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key, line = prefix + key_node.value, key_node.start_mark.line + 1
            if key in here:
                raise _DuplicateKey(key, here[key], line)
            here[key] = line
            if isinstance(value_node, yaml.MappingNode):
                self._check_keys(value_node, key + ".", leaves, path | {id(node)})
            elif key in leaves:
                raise _DuplicateKey(key, leaves[key], line)
            else:
                leaves[key] = line


def build_config(values: dict[str, Any] | None = None, *, method: str | None = None,
                 preset: str | None = None) -> Config:
    """A validated config from flat (or nested) values over an optional preset.

    Precedence: defaults < preset < values. ``method`` may be given as an argument or as
    the ``method`` key; ``preset`` likewise.
    """
    values = flatten(dict(values or {}))
    preset = values.pop("preset", None) or preset
    merged: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"preset: unknown preset {preset!r}; expected one of {sorted(PRESETS)}"
                              + did_you_mean(preset, PRESETS))
        merged.update(PRESETS[preset])
    merged.update(values)
    method = merged.pop("method", None) or method
    if method is None:
        raise ConfigError("method: no method given; expected one of " + str(sorted(METHODS)))
    if method not in METHODS:
        raise ConfigError(f"method: unknown method {method!r}; expected one of {sorted(METHODS)}"
                          + did_you_mean(method, METHODS))
    cfg = Config(method=method, params=METHODS[method].config())
    for key, value in merged.items():
        sec_name, dot, attr = key.partition(".")
        if not dot:
            raise ConfigError(f"{key}: unknown key (keys are dotted, e.g. run.seed)")
        if sec_name in METHODS and sec_name != method and sec_name not in SECTIONS:
            if key not in values:
                continue  # a preset's setting for another method than the active one
            raise ConfigError(f"{key}: belongs to method {sec_name!r}, but the method is {method!r}")
        if sec_name not in SECTIONS and sec_name != method:
            keys = [k for k in _all_keys(cfg) if k.rsplit(".", 1)[-1] == attr]  # e.g. lr.optim for optim.lr
            hint = did_you_mean(key, keys or _all_keys(cfg)) or did_you_mean(sec_name, cfg.section_names())
            raise ConfigError(f"{key}: unknown section {sec_name!r}; expected one of {cfg.section_names()}{hint}")
        sec = cfg.section(sec_name)
        fmap = {f.name: f for f in fields(sec)}
        if attr not in fmap:
            raise ConfigError(f"{key}: unknown key; {sec_name}.* has {sorted(fmap)}{did_you_mean(key, _all_keys(cfg))} "
                              f"(`uda-ray config --method {method}` lists every key)")
        setattr(sec, attr, _coerce(key, fmap[attr], value))
    _check_defaults(cfg)
    _cross_checks(cfg)
    return cfg


def _all_keys(cfg: Config) -> list[str]:
    return [k for k in cfg.flat() if k != "method"]


def describe(preset: str | None = None, method: str | None = None) -> list[dict[str, str]]:
    """Every key of the shared sections and of ``method``'s section (every method's when None),
    with its type, value (the default, or the preset's), allowed range or choices, and help:
    what ``uda-ray config`` prints."""
    rows, seen = [], set()
    for m in [method] if method else list(METHODS):
        cfg = build_config({}, method=m, preset=preset)
        for name in cfg.section_names():
            sec = cfg.section(name)
            for f in fields(sec):
                key = f"{name}.{f.name}"
                if key in seen:
                    continue
                seen.add(key)
                md, value = f.metadata, getattr(sec, f.name)
                lo, hi, rng = md.get("lo"), md.get("hi"), ""
                if md.get("choices") is not None:
                    rng = " | ".join(map(str, md["choices"]))
                elif lo is not None and hi is not None:
                    rng = f"{'(' if md.get('lo_open') else '['}{lo}, {hi}]"
                elif lo is not None:
                    rng = f"{'>' if md.get('lo_open') else '>='} {lo}"
                elif hi is not None:
                    rng = f"<= {hi}"
                typ = f.type if isinstance(f.type, str) else f.type.__name__
                rows.append({"key": key, "type": typ, "value": "''" if value == "" else str(value).lower()
                             if isinstance(value, bool) else str(value), "range": rng, "help": md.get("help", "")})
    return rows


def _check_defaults(cfg: Config) -> None:
    # defaults pass through the same validation (catches a bad default in a method section)
    for name in cfg.section_names():
        sec = cfg.section(name)
        for f in fields(sec):
            _coerce(f"{name}.{f.name}", f, getattr(sec, f.name))


def _cross_checks(cfg: Config) -> None:
    d = cfg.data
    if d.scale_min > d.scale_max:
        raise ConfigError(f"data.scale_min: must be <= data.scale_max ({d.scale_max}), got {d.scale_min}")
    if (d.crop_w == 0) != (d.crop_h == 0):
        raise ConfigError("data.crop_w / data.crop_h: set both or neither")
    name = cfg.run.name
    # the run directory is run.out/<run.name>: a path there would write outside run.out
    if name and (not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0")):
        raise ConfigError(f"run.name: expected one folder name (no '/' or '\\', not '.' or '..', not blank; "
                          f"'' for the default <method>-s<seed>), got {name!r}")
    bins = cfg.model.ppm_bins.split(",")  # read by the PPM archs only, checked for all: a typo never trains
    if not all(b.strip().isdecimal() and int(b) > 0 for b in bins):
        raise ConfigError(f"model.ppm_bins: expected comma-separated positive integers (e.g. 1,2,3,6), "
                          f"got {cfg.model.ppm_bins!r}")


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["a.b=1", "c.d=x"]`` -> ``{"a.b": "1", "c.d": "x"}`` (values are typed by build_config)."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                preset: str | None = None, method: str | None = None) -> Config:
    """A config from a YAML file (nested or flat dotted keys, optional ``preset:`` and
    ``method:``), then ``overrides``; ``method`` is the file's when it names none.

    Raises:
        ConfigError: the file is missing, not UTF-8, not YAML, or gives a key twice (the
            key and both lines named, :class:`_ConfigLoader`); or a key or value is refused.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_ConfigLoader) or {}
        except _DuplicateKey as e:
            raise ConfigError(f"{path}: {e.key} is set twice, at lines {e.first} and {e.again} (YAML would keep "
                              f"the last silently); keep one") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                              "save the config as UTF-8") from None
        except yaml.YAMLError as e:
            mark, ctx = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            if ctx is not None and getattr(e, "context", None):
                what += f" ({e.context} at line {ctx.line + 1})"
            raise ConfigError(f"{path}:{where} invalid YAML: {what}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
        values = flatten(loaded)
    values.update(overrides or {})
    return build_config(values, preset=preset, method=method)


# Presets: flat overrides of the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # The embedded benchmark, the small backbone, a run in about 3 minutes on 2 CPU cores.
    "tiny-cpu": {
        "data.root": "data/synth", "data.synth": True,
        "data.source_w": 256, "data.source_h": 144, "data.target_w": 256, "data.target_h": 128,
        "data.batch_size": 4, "data.num_classes": 19,
        "model.arch": "tiny", "model.pretrained": "", "model.bn": "shared",
        "optim.lr": 0.01, "optim.weight_decay": 1e-4,
        "run.iterations": 1000, "run.schedule_iterations": 0, "run.log_every": 25,
        "run.eval_every": 250, "run.checkpoint_every": 250, "run.num_workers": 1,
        # AdaptSegNet's discriminators at half width: at full width they cost 5x the tiny
        # segmenter (they see input-size maps) and would dominate a CPU run.
        "adaptseg.ndf": 32,
    },
    # The method studies' scale: tiny-cpu at 160x88 -> 160x80 with shorter runs and
    # discriminators at a quarter width, so that a table of rows x 3 seeds runs in minutes
    # on 2 cores. Studies set the iterations of each stage.
    "study-cpu": {
        "data.root": "data/synth", "data.synth": True,
        "data.source_w": 160, "data.source_h": 88, "data.target_w": 160, "data.target_h": 80,
        "data.batch_size": 4, "data.num_classes": 19, "data.select_n": 50,
        "model.arch": "tiny", "model.pretrained": "", "model.bn": "shared",
        "optim.lr": 0.01, "optim.weight_decay": 1e-4,
        "run.iterations": 400, "run.schedule_iterations": 0, "run.log_every": 25,
        "run.eval_every": 0, "run.checkpoint_every": 100, "run.num_workers": 0, "run.max_val_images": 0,
        "run.grad_probe_every": 50,
        "adaptseg.ndf": 16,
        "jal.ndf": 16,
        "pww.ndf": 16,
        "mat.ndf": 16,
        "dast.ndf": 16, "dast.d_width": 64,
    },
    # The papers' setting: DeepLab-v2 ResNet-101, GTA5 1280x720 -> Cityscapes 1024x512.
    # data.synth stays false: data.root holds the user's real datasets, never the benchmark.
    "paper": {
        "data.synth": False, "data.source_w": 1280, "data.source_h": 720, "data.target_w": 1024, "data.target_h": 512,
        "data.batch_size": 1, "model.arch": "deeplabv2_r101", "model.pretrained": "torchvision",
        "model.bn": "frozen", "optim.lr": 2.5e-4, "run.iterations": 150_000,
        "run.schedule_iterations": 250_000,
    },
}
