"""The resume identity: what a checkpoint's training continues with, and nothing about where it lives.

Identity = the schema fields marked IDENTITY (model, optimizer, global batch, seed, image size) plus the
manifest's content fingerprint (sample ids, labels, sizes, checksums, splits; data_pipeline/manifest.py).
Paths, dry-run hints, speed knobs and the schedule's length are not identity: a moved dataset resumes, and a
longer schedule resumes with its learning-rate schedule recomputed.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

from cratescale.config.schema import JobConfig

# 1: the whole config hash of earlier versions (paths and schedule included); 2: this allowlist + fingerprint.
IDENTITY_VERSION = 2


def identity_fields(config: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Dotted name -> JSON value of every field marked IDENTITY, walking the config's sections."""
    fields: dict[str, Any] = {}
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            fields.update(identity_fields(value, f"{prefix}{name}."))
        elif isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("identity"):
            fields[prefix + name] = json.loads(json.dumps(value, default=str))  # tuples as lists, as saved
    return fields


def job_identity(job: JobConfig, manifest_fingerprint: str) -> dict[str, Any]:
    """What a checkpoint records (meta "identity") and what a resume compares."""
    return {"version": IDENTITY_VERSION, "fields": identity_fields(job), "manifest": manifest_fingerprint}


def identity_hash(identity: dict[str, Any]) -> str:
    """A short name for an identity (the catalog's and the export's config_hash)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def identity_change(saved_meta: dict[str, Any], identity: dict[str, Any]) -> str | None:
    """Why a checkpoint with `saved_meta` is not this job's training (one line), or None when it is."""
    saved = saved_meta.get("identity")
    if not isinstance(saved, dict) or saved.get("version") != IDENTITY_VERSION:
        return (f"saved by an earlier cratescale (config hash {saved_meta.get('config_hash')}, which covered paths "
                f"and the whole schedule), so it cannot be checked against this job's identity (marked config "
                f"fields + the manifest's content)")
    if saved.get("manifest") != identity["manifest"]:
        return (f"the samples differ: the checkpoint was trained on a manifest with content fingerprint "
                f"{saved.get('manifest')}, this job's manifest has {identity['manifest']} (samples added, removed, "
                f"relabelled or changed)")
    old, new = saved.get("fields", {}), identity["fields"]
    changed = [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
               if old.get(key) != new.get(key)]
    if changed:
        return "the job changed what training continues with: " + "; ".join(changed)
    return None


def schedule_note(saved_meta: dict[str, Any], total_steps: int, warmup_steps: int) -> str | None:
    """One line when this job's schedule length (or warmup) differs from the one the checkpoint trained under."""
    before = (saved_meta.get("total_steps"), saved_meta.get("warmup_steps"))
    if None in before or before == (total_steps, warmup_steps):
        return None
    return (f"schedule: the checkpoint at step {saved_meta.get('step')} was trained toward {before[0]} steps "
            f"(warmup {before[1]}), this job runs {total_steps} (warmup {warmup_steps}): the learning-rate "
            f"schedule was recomputed for the new length")
