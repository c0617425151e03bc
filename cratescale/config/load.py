"""YAML -> JobConfig, with `key.sub=value` overrides and one-line errors."""
from __future__ import annotations

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


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    given = first.get("input")
    shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {given!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{source}: {field}: {msg}{shown}{more}"


def validate(model: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_job(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    path = Path(path)
    tree = _read_yaml(path)
    for assignment in overrides:
        apply_override(tree, assignment)
    job = validate(JobConfig, tree, str(path))
    job.run_dir = job.run_dir.replace("${name}", job.name)
    return job


def load_profile(name: str) -> ProfileConfig:
    path = profile_path(name)
    if not path.is_file():
        raise ConfigError(f"cluster.profile: no profile {name!r} (looked for {path})")
    return validate(ProfileConfig, _read_yaml(path), str(path))


def dump_job(job: JobConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_durable(path, yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
