"""YAML -> JobConfig, with `key.sub=value` overrides and one-line errors."""
from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from cratescale.config.profile import ProfileConfig, profile_path
from cratescale.config.schema import JobConfig
from cratescale.files import replace_durable


class ConfigError(ValueError):
    """A job or profile that cannot run; the message names the file and the dotted field."""


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_override(tree: dict[str, Any], assignment: str, source: str = "command line") -> None:
    """`a.b.c=value`: value parsed as YAML (numbers, lists, null), set in place."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{source}: override {assignment!r} is not of the form key.sub=value")
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: override {assignment!r}: {part} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = raw


def _fields_at(loc: tuple) -> list[str]:
    """The field names of the section that `loc` (a pydantic error location) points into."""
    model: Any = JobConfig
    for part in loc[:-1]:
        info = model.model_fields.get(part) if isinstance(part, str) else None
        if info is None:
            continue  # a list index: stay on the list's item model
        annotation = info.annotation
        args = typing.get_args(annotation)
        model = args[0] if typing.get_origin(annotation) is list and args else annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return list(model.model_fields)


def _suggestion(first: dict) -> str:
    """ "; did you mean 'steps'?" for a misspelled field name."""
    if first["type"] != "extra_forbidden" or not first["loc"]:
        return ""
    close = difflib.get_close_matches(str(first["loc"][-1]), _fields_at(tuple(first["loc"])), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ") + _suggestion(first)
    given = first.get("input")
    shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {given!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{source}: {field}: {msg}{shown}{more}"


def validate(model: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def _blamed(err: ValidationError, path: Path, overrides: list[str] | tuple[str, ...]) -> str:
    """Where a validation error comes from: the command-line override that set the failing field, else the file."""
    failing = ".".join(str(p) for p in err.errors()[0]["loc"])
    for assignment in reversed(overrides):
        key = assignment.partition("=")[0].strip()
        if failing == key or failing.startswith(key + ".") or key.startswith(failing + "."):
            return f"{path}, command-line override {assignment!r}"
    return str(path)


def load_job(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    path = Path(path)
    tree = _read_yaml(path)
    if not tree:
        raise ConfigError(f"{path}: the job file is empty; a job names at least what differs from the defaults "
                          f"(see jobs/demo.yaml, or `python -m cratescale.launch config` for every field)")
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        job = JobConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err, _blamed(err, path, overrides))) from None
    job.run_dir = job.run_dir.replace("${name}", job.name)
    return job


def load_profile(name: str) -> ProfileConfig:
    path = profile_path(name)
    if not path.is_file():
        raise ConfigError(f"cluster.profile: no profile {name!r} (looked for {path})")
    return validate(ProfileConfig, _read_yaml(path), str(path))


def job_yaml(job: JobConfig) -> str:
    return yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False)


def dump_job(job: JobConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_durable(path, job_yaml(job))


def job_warnings(job: JobConfig) -> list[str]:
    """Settings that validate but are probably not what was meant, each one line (the launcher and the dry-run
    print them; nothing stops)."""
    sched, warnings = job.schedule, []
    warmup, length, unit = ((sched.warmup_steps, sched.steps, "steps") if sched.warmup_steps is not None
                            and sched.steps is not None else (sched.warmup_epochs, sched.epochs, "epochs"))
    if length is not None and warmup and warmup >= length:
        warnings.append(f"schedule: warm-up of {warmup} {unit} >= the run's {length} {unit}: the learning rate never "
                        f"reaches its peak; lower schedule.warmup_{unit}")
    if job.finetune.enabled and "finetune" not in job.stages:
        warnings.append(f"finetune.enabled is true but the finetune stage is not among the job's stages "
                        f"{list(job.stages)}: nothing is fine-tuned; add finetune after export")
    return warnings
