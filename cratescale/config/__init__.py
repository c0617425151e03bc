"""Typed job configuration: schema, YAML loading, overrides, cluster profiles."""
from cratescale.config.load import (ConfigError, apply_override, config_hash, dump_job, load_job,
                                    load_profile)
from cratescale.config.profile import ProfileConfig
from cratescale.config.schema import JobConfig

__all__ = ["ConfigError", "JobConfig", "ProfileConfig", "apply_override", "config_hash", "dump_job",
           "load_job", "load_profile"]
