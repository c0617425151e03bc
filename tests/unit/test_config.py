"""The job config: validation, overrides, one-line errors that name the file and field."""
from pathlib import Path

import pytest

from cratescale.config import ConfigError, JobConfig, config_hash, dump_job, load_job, load_profile

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "jobs" / "demo.yaml"


def test_overrides_parse_yaml_values():
    job = load_job(DEMO, ["schedule.steps=7", "optim.betas=[0.8, 0.9]", "data.root=null", "model.overrides.lambd=0.1"])
    assert job.schedule.steps == 7 and job.optim.betas == (0.8, 0.9) and job.data.root is None
    assert job.model.overrides["lambd"] == 0.1


@pytest.mark.parametrize("override, field", [
    ("model.foo=1", "model.foo"),
    ("schedule.micro_batch=-4", "schedule.micro_batch"),
    ("schedule.global_batch=100", "schedule"),          # not a multiple of the micro-batch
    ("cluster.tasks_per_node=3", "(top level)"),        # 64 cannot be split over 3 ranks
    ("parallel.zero_stage=5", "parallel.zero_stage"),
    ("name=a $(rm -rf x)", "(top level)"),
    ("optim.base_lr=fast", "optim.base_lr"),
    ("parallel.attention=flash3", "parallel.attention"),
    ("parallel.compile=true|parallel.zero_stage=3", "parallel"),  # ZeRO-3's hooks break the compiled graph
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_job(DEMO, override.split("|"))
    message = str(err.value)
    assert message.startswith(f"{DEMO}: {field}") and "\n" not in message


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: demo\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+.*invalid YAML"):
        load_job(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_job(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not of the form"):
        load_job(DEMO, ["schedule.steps"])


def test_resolved_config_round_trips(tmp_path):
    job = load_job(DEMO, ["schedule.steps=11"])
    dump_job(job, tmp_path / "config.yaml")
    again = load_job(tmp_path / "config.yaml")
    assert again == job and config_hash(again) == config_hash(job)


def test_config_hash_ignores_cluster_but_not_model():
    base = load_job(DEMO)
    assert config_hash(load_job(DEMO, ["cluster.tasks_per_node=1"])) == config_hash(base)
    assert config_hash(load_job(DEMO, ["model.overrides.lambd=0.1"])) != config_hash(base)
    # how the steps are computed and the images decoded may change across a resume; what is learned may not
    speed_knobs = ["parallel.compile=true", "parallel.attention=cudnn", "parallel.activation_checkpointing=true",
                   "data.hw_decoder_load=0.9", "data.prefetch_depth=4", "data.num_threads=4"]
    assert config_hash(load_job(DEMO, speed_knobs)) == config_hash(base)


def test_profiles_validate():
    for path in sorted((REPO / "cluster" / "profiles").glob("*.yaml")):
        profile = load_profile(str(path))
        assert profile.peak_flops_per_gpu > 0
    with pytest.raises(ConfigError, match="no profile 'nope'"):
        load_profile("nope")


def test_profile_measured_step_is_validated(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: x\nscheduler: slurm\npeak_flops_per_gpu: 1.0e+15\n"
                    "measured_step:\n  crate_mae_base/all: {images_per_s: 0, fixed_ms: 5}\n")
    with pytest.raises(ConfigError, match=r"measured_step\.crate_mae_base/all\.images_per_s"):
        load_profile(str(path))


def test_profile_missing_field(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: x\nscheduler: slurm\npartition: debug\n")
    with pytest.raises(ConfigError, match="peak_flops_per_gpu"):
        load_profile(str(path))


def test_defaults_are_a_valid_job():
    assert JobConfig().world_size == 2
