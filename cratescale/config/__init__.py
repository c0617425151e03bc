"""Typed job configuration: schema, YAML loading, overrides, cluster profiles, the resume identity."""
from cratescale.config.identity import identity_change, identity_hash, job_identity, schedule_note
from cratescale.config.load import (ConfigError, apply_override, dump_job, job_warnings, job_yaml, load_job,
                                   load_profile)
from cratescale.config.paths import RunPaths
from cratescale.config.profile import ProfileConfig
from cratescale.config.schema import JobConfig

__all__ = ["ConfigError", "JobConfig", "ProfileConfig", "RunPaths", "apply_override", "dump_job", "identity_change",
           "identity_hash", "job_identity", "job_warnings", "job_yaml", "load_job", "load_profile", "schedule_note"]
