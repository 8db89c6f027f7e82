"""The run config: every stage's config composed into one validated, YAML round-trippable object.

Loading order: the embedded defaults, then a YAML file (``--config``), then ``--set
key.path=value`` overrides (values parsed as YAML scalars/lists). Unknown keys are errors
that suggest the closest valid key; every error is one line naming the offending key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from intraq_core.config import (
    DistillConfig,
    EvalConfig,
    ModelConfig,
    QuantConfig,
    StageConfig,
    SynthConfig,
)
from intraq_core.errors import format_validation_error
from pipeline.storage.location import StorageConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


#: Where a run location keeps its resolved config.
RUN_CONFIG_PATH = "run.yaml"


class ConfigError(ValueError):
    """The run config is invalid (unknown key, bad value, malformed YAML)."""


class RayConfig(StageConfig):
    """Where and how wide the pipeline runs on Ray.

    ``address`` None starts a local Ray (dashboard on 127.0.0.1); ``auto`` or
    ``ray://host:10001`` connects to a cluster (``--cluster FILE`` sets it).
    """

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    generation_actors: int | None = Field(default=None, ge=1)
    cpus_per_actor: float = Field(default=1.0, gt=0.0)
    gpus_per_actor: float = Field(default=1.0, ge=0.0)
    train_workers: int = Field(default=1, ge=1)
    cpus_per_train_worker: float = Field(default=1.0, gt=0.0)
    # Where each Train worker keeps its share of the synthetic images: "memory" (read once,
    # every epoch from RAM or the GPU), "stream" (one pass per epoch from storage), or "auto":
    # memory when a worker's share is at most train_memory_gb GiB.
    train_data: Literal["auto", "memory", "stream"] = "auto"
    train_memory_gb: float = Field(default=8.0, gt=0.0)
    # Placement of the Train workers: "pack" onto few nodes (fast collectives), or "spread" one
    # per node first (e.g. to use every node's CPUs, memory and disk bandwidth).
    train_placement: Literal["pack", "spread"] = "pack"
    use_gpu: Literal["auto", "yes", "no"] = "auto"

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _yaml_bool(cls, value: object) -> object:
        # YAML reads unquoted yes/no as booleans.
        if isinstance(value, bool):
            return "yes" if value else "no"
        return value

    dashboard: bool = True
    max_failures: int = Field(default=3, ge=0)


class TuneConfig(StageConfig):
    """Ray Tune search over loss weights and margins (see ``intraq-pipeline tune``)."""

    num_samples: int = Field(default=8, ge=1)
    max_concurrent: int = Field(default=2, ge=1)
    search: Literal["optuna", "random"] = "optuna"
    objective: Literal["agreement", "validation"] = "agreement"
    validation_data: str | None = None
    # ASHA's grace period, in reports: a trial reports after each generation round (the PTQ
    # agreement of a student calibrated on its images so far) and after each distillation epoch,
    # so a bad trial can be stopped before or during its most expensive phase.
    grace_reports: int = Field(default=1, ge=1)
    # GPUs per trial when the cluster has GPUs: fractional, so small (CIFAR) trials share one.
    gpus_per_trial: float = Field(default=0.25, gt=0.0)
    space: dict[str, list[float]] = Field(
        default_factory=lambda: {
            "generate.bns_weight": [0.1, 10.0],
            "generate.sil_weight": [0.1, 10.0],
            "generate.mdc_weight": [0.1, 10.0],
            "generate.sil_epsilon": [0.5, 1.0],
            "generate.mdc_lower": [0.0, 0.2],
            "generate.mdc_upper": [0.2, 1.0],
            "generate.lor_min_area": [0.2, 0.9],
            "distill.kd_alpha": [0.5, 4.0],
            "distill.kd_temperature": [1.0, 8.0],
        }
    )

    @field_validator("gpus_per_trial")
    @classmethod
    def _whole_or_fraction(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError("tune.gpus_per_trial must be a fraction of one GPU or a whole number of GPUs")
        return value


class RunConfig(StageConfig):
    """One run: generate → quantize → distil → evaluate, with its storage and Ray settings.

    ``dataset`` names another run location whose synthetic data to reuse (generation is
    skipped; e.g. one dataset quantized at several bit widths).
    """

    name: str = "intraq"
    seed: int = Field(default=0, ge=0)
    executor: Literal["ray", "local"] = "ray"
    dataset: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # How every process of the run allocates CPU memory: "reuse" keeps freed large tensors in the
    # C library's heap for the next ones (glibc; 1.2-1.7x faster synthesis at 224x224 on CPU, the
    # same results; a process keeps its peak memory until it exits), "system": the C library's
    # defaults. See intraq_core.memory.
    cpu_allocator: Literal["reuse", "system"] = "reuse"
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(weights="cifar10-resnet20"))
    quant: QuantConfig = Field(default_factory=QuantConfig)
    generate: SynthConfig = Field(default_factory=SynthConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @model_validator(mode="after")
    def _check_batch_split(self) -> RunConfig:
        workers, batch = self.ray.train_workers, self.distill.batch_size
        if self.executor == "ray" and batch % workers:
            raise ValueError(
                f"distill.batch_size={batch} is the global batch and must be divisible by ray.train_workers="
                f"{workers} (each worker takes batch_size / train_workers images per step)"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def needs_synthetic_data(self) -> bool:
        """Whether the run needs a synthetic dataset: all but SQuant without distillation
        (SQuant rounds weights and sets activation ranges from the BN statistics, no image)."""
        return not (self.quant.method == "squant" and self.distill.epochs == 0)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def dataset_hash(self) -> str:
        """Hash of everything that determines the synthetic dataset (not quantization/training)."""
        model = _model_identity(self)
        for k in _MODEL_PREPROCESSING:  # how real test images are resized: no effect on synthetic ones
            model.pop(k, None)
        keys = {
            "seed": self.seed,
            "model": model,
            "generate": _gen_identity(self),
        }
        return _hash(keys)

    def config_hash(self) -> str:
        """Hash of the whole run identity (storage and Ray placement excluded)."""
        d = self.to_dict()
        for k in ("storage", "ray", "tune", "executor", "device", "name", "dataset"):
            d.pop(k, None)
        d["generate"] = _gen_identity(self)
        d["model"] = _model_identity(self)
        d["eval"] = _eval_identity(self)
        return _hash(d)


_MODEL_PREPROCESSING = ("resize", "crop_pct", "interpolation")


def _model_identity(cfg: RunConfig) -> dict[str, Any]:
    m = cfg.model.model_dump(mode="json")
    # The hash of every config written before model.kwargs / model.output existed stays the same.
    if not m["kwargs"]:
        del m["kwargs"]
    if m["output"] is None:
        del m["output"]
    for k in _MODEL_PREPROCESSING:  # likewise for the preprocessing keys, when unset
        if m.get(k) is None:
            m.pop(k, None)
    return m


def _eval_identity(cfg: RunConfig) -> dict[str, Any]:
    e = cfg.eval.model_dump(mode="json")
    e.pop("num_workers", None)  # decoding processes: the images and their order do not depend on them
    for k in ("classes", "labels"):  # unset: the hash of configs written before these keys existed
        if e.get(k) is None:
            e.pop(k, None)
    return e


def _gen_identity(cfg: RunConfig) -> dict[str, Any]:
    g = cfg.generate.model_dump(mode="json")
    # Engineering knobs that do not change the images' law are not part of the identity.
    for k in ("channels_last", "compile", "amp", "generator_checkpoint_every", "micro_batch_size", "groups_per_pass"):
        g.pop(k, None)
    # The pixel storage is not in the hash either (``auto`` resolves by the image size, which the hash
    # does not know; every hash written before the key existed stays the same): the manifest records
    # the dtype the shards store, and a dataset stored in another dtype than the run's is refused
    # (pipeline.stages.generate.open_manifest), never mixed.
    g.pop("store_dtype", None)
    # The rule that sized the plan is not either: the plan it resolved to (num_images, iterations) is
    # (pipeline.context.RunContext.create), and every hash written before the key existed stays the same.
    g.pop("min_images_per_class", None)
    return g


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _model_at(path: tuple[Any, ...], root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    """The config class at a dotted location of ``root`` (RunConfig by default; None past a plain value)."""
    cls: type[BaseModel] | None = root or RunConfig
    for key in path:
        field = cls.model_fields.get(str(key)) if cls is not None else None
        annotation = field.annotation if field is not None else None
        cls = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return cls


def _format_validation_error(exc: ValidationError, root: type[BaseModel] | None = None, **kwargs: Any) -> str:
    """:func:`intraq_core.errors.format_validation_error` of a validation of ``root`` (RunConfig by
    default), an unknown key suggesting the closest valid one."""

    def unknown_key(loc: tuple[Any, ...]) -> str:
        if not loc:
            return "unknown key"
        owner = _model_at(tuple(loc[:-1]), root)
        close = _closest_key(str(loc[-1]), sorted(owner.model_fields)) if owner is not None else None
        suggestion = ".".join([*map(str, loc[:-1]), close]) if close else None
        return "unknown key" + (f"; did you mean '{suggestion}'?" if suggestion else "")

    return format_validation_error(exc, unknown_key=unknown_key, **kwargs)


M = TypeVar("M", bound=BaseModel)


def validate_section(
    cls: type[M], values: dict[str, Any], *, source: str, prefix: str | None = None, names: dict[str, str] | None = None
) -> M:
    """``cls.model_validate(values)``; a failure is one :class:`ConfigError` line, ``source: key: problem``.

    For values that come from somewhere other than the run config (a command-line option such
    as ``--bits W9A4``): ``--bits W9A4: quant.w_bits: 9 is above the maximum 8``.
    """
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format_validation_error(exc, cls, prefix=prefix, names=names)}") from None


#: Names users bring from other tools, mapped to ours (used only to suggest the valid key).
_KEY_ALIASES = {
    "learning_rate": "lr",
    "epoch": "epochs",
    "iters": "iterations",
    "n_iterations": "iterations",
    "images": "num_images",
    "n_images": "num_images",
    "bits": "w_bits",
    "weight_bits": "w_bits",
    "act_bits": "a_bits",
    "activation_bits": "a_bits",
    "bs": "batch_size",
    "output": "url",
    "path": "url",
}


def _closest_key(key: str, valid: list[str]) -> str | None:
    """The valid key ``key`` most likely means: a close spelling, or a known alias (or a typo of one)."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return close[0]
    aliases = {alias: real for alias, real in _KEY_ALIASES.items() if real in valid}
    close = difflib.get_close_matches(key, sorted(aliases), n=1, cutoff=0.75)
    return aliases[close[0]] if close else None


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    fields_cls: type[BaseModel] | None = RunConfig
    for i, key in enumerate(keys):
        if fields_cls is not None and key not in fields_cls.model_fields:
            valid = sorted(fields_cls.model_fields)
            close = _closest_key(key, valid)
            where = ".".join(keys[:i]) or "the run config"
            hint = f"; did you mean '{'.'.join([*keys[:i], close])}'?" if close else ""
            raise ConfigError(f"unknown key '{dotted}' (no '{key}' in {where}){hint}")
        if i == len(keys) - 1:
            node[key] = value
            return
        nxt = node.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            node[key] = nxt
        node = nxt
        annotation = fields_cls.model_fields[key].annotation if fields_cls is not None else None
        fields_cls = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` → nested dict, values parsed as YAML (so 1e-3, true, [1,2] work)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: cannot parse value '{raw}' ({exc})") from exc
        _set_path(out, key, value)
    return out


def nest_dotted(values: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` → ``{"a": {"b": 1}}``, each key checked against the run config (ConfigError naming the key)."""
    out: dict[str, Any] = {}
    for dotted, value in values.items():
        _set_path(out, dotted, value)
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, nested dicts key by key (``extra`` wins); neither is modified."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _duplicate_key(node: yaml.Node | None) -> tuple[str, int, int] | None:
    """The first key given twice in one mapping of a composed YAML document: (dotted key, line,
    line of its first occurrence), or None. Merge keys (``<<``) are not duplicates."""
    stack: list[tuple[yaml.Node, tuple[str, ...]]] = [(node, ())] if node is not None else []
    visited: set[int] = set()
    while stack:
        current, path = stack.pop()
        if id(current) in visited:  # an alias repeats a node already walked
            continue
        visited.add(id(current))
        if isinstance(current, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in current.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    line = key_node.start_mark.line + 1
                    if key_node.value in seen:
                        return ".".join((*path, key_node.value)), line, seen[key_node.value]
                    seen[key_node.value] = line
                    stack.append((value_node, (*path, key_node.value)))
                else:
                    stack.append((value_node, path))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend((item, path) for item in current.value)
    return None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, with one-line errors: a missing file, a syntax error or a key given
    twice (naming the line), an empty file (it would silently run every default)."""
    p = Path(path).expanduser()
    if not p.is_file():
        candidates = [Path("configs") / f"{path}.yaml", CONFIG_DIR / f"{path}.yaml"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise ConfigError(f"config file not found: {path} (shipped configs: {', '.join(shipped_configs())})")
        p = found[0]
    text = p.read_text()
    try:
        duplicate = _duplicate_key(yaml.compose(text, Loader=yaml.SafeLoader))
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"malformed YAML in {p}{where}: {problem}") from exc
    if duplicate is not None:
        key, line, first = duplicate
        raise ConfigError(
            f"{p}: duplicate key '{key}' at line {line} (first at line {first}); YAML would keep only the last "
            "one: remove one of them"
        )
    if data is None:
        raise ConfigError(
            f"{p} is empty (no settings): it would run with every default; give the settings to change, "
            "or leave out --config"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the config must be a YAML mapping, got {type(data).__name__}")
    return data


def load_run_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> RunConfig:
    """Defaults ← YAML file ← ``--set`` overrides, validated."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = deep_merge(data, read_yaml(path))
    data = deep_merge(data, parse_overrides(overrides))
    return validate_run_config(data)


def validate_run_config(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid config: {_format_validation_error(exc)}") from None


def shipped_configs() -> list[str]:
    """Names of the configs shipped with the package (``--config NAME`` works for them)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
