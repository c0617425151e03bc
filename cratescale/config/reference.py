"""Every job field with its type, default and one line of doc, generated from the schema (issue 30).

The doc of a field is the comment block written above it in config/schema.py (or its same-line comment): the
schema stays the one place where a field is explained, and `python -m cratescale.launch config [JOB]` and
docs/config.md are both generated from it (tests/unit/test_config_reference.py keeps docs/config.md current).
"""
from __future__ import annotations

import inspect
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cratescale.config.schema import JobConfig

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "config.md"
_FIELD_LINE = re.compile(r"^\s+([a-z_][a-z0-9_]*)\s*:")


@dataclass
class FieldRow:
    name: str  # dotted, e.g. schedule.micro_batch; list items as extract.datasets[].source
    type: str
    default: str
    doc: str  # the whole comment block
    value: str | None = None  # in a given job, when it differs from the default

    @property
    def summary(self) -> str:
        """The doc's first sentence."""
        return re.split(r"(?<=\.)\s", self.doc, maxsplit=1)[0]


def comment_docs(model: type[BaseModel]) -> dict[str, str]:
    """field name -> the comment block above its line in the class body (or its trailing comment)."""
    docs: dict[str, str] = {}
    block: list[str] = []
    for line in inspect.getsource(model).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("#").strip())
            continue
        match = _FIELD_LINE.match(line)
        if match and match.group(1) in model.model_fields:
            trailing = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            docs[match.group(1)] = " ".join(block) or trailing
        if not line.startswith(" " * 8):  # a continuation line keeps the pending block for nobody
            block = []
    return docs


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType")):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (list, tuple, dict):
        inner = ", ".join(_type_name(a) for a in typing.get_args(annotation) if a is not Ellipsis)
        return f"{typing.get_origin(annotation).__name__}[{inner}]"
    if annotation is Any:
        return "any"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _shown(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return json.dumps(value, default=str)


def _submodel(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """A nested section (model) or a list of models (with the '[]' suffix), else (None, '')."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list and args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0], "[]"
    return None, ""


def field_rows(model: type[BaseModel] = JobConfig, prefix: str = "") -> list[FieldRow]:
    """Every leaf field of `model`, depth first in declaration order."""
    rows: list[FieldRow] = []
    docs = comment_docs(model)
    for name, info in model.model_fields.items():
        sub, suffix = _submodel(info.annotation)
        dotted = f"{prefix}{name}"
        if sub is not None and (suffix or info.annotation is sub):
            rows += field_rows(sub, f"{dotted}{suffix}.")
            continue
        default = info.get_default(call_default_factory=True)
        rows.append(FieldRow(dotted, _type_name(info.annotation), _shown(default), docs.get(name, "")))
    return rows


def _value_at(job: JobConfig, dotted: str) -> Any:
    node: Any = job
    for part in dotted.split("."):
        if part.endswith("[]"):
            return None  # list items are shown by their parent's value, not one by one
        node = getattr(node, part)
    return node


def rows_for_job(job: JobConfig | None) -> list[FieldRow]:
    rows = field_rows()
    if job is not None:
        for row in rows:
            if "[]" in row.name:
                continue
            shown = _shown(_value_at(job, row.name))
            row.value = shown if shown != row.default else None
    return rows


def render_text(rows: list[FieldRow]) -> str:
    """The console listing: one line per field; `-> value` where the job sets another value than the default."""
    width = max(len(r.name) for r in rows)
    lines = []
    for row in rows:
        value = f"  -> {row.value}" if row.value is not None else ""
        lines.append(f"{row.name:<{width}}  {row.type}  = {row.default}{value}\n{'':<{width}}  {row.summary}")
    return "\n".join(lines)


def render_markdown(rows: list[FieldRow]) -> str:
    head = ["# Job configuration reference", "",
            "Generated from `cratescale/config/schema.py` by `python -m cratescale.launch config --markdown`; "
            "`python -m cratescale.launch config JOB` shows the same fields with a job's values. Paths in a job "
            "(run_dir, data.source, data.root, extract.datasets[].source) are relative to the directory the "
            "launcher runs in.", "",
            "| field | type | default | what it does |", "|---|---|---|---|"]
    body = [f"| `{r.name}` | {r.type.replace('|', ' / ')} | `{r.default}` | {r.doc.replace('|', '/')} |" for r in rows]
    return "\n".join(head + body) + "\n"
