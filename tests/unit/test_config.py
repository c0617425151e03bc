"""The job config: validation, overrides, one-line errors that name the file and field."""
from pathlib import Path

import pytest

from cratescale.config import (ConfigError, JobConfig, dump_job, identity_change, job_identity, load_job, load_profile,
                               schedule_note)
from cratescale.config.identity import identity_fields

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
    ("finetune.enabled=true", "finetune"),                        # enabled without a length
    ("finetune.steps=5|finetune.epochs=1", "finetune"),
    ("finetune.arms=[scratch, scratch]", "finetune"),
    ("finetune.arms=[linear]", "finetune.arms"),
    ("finetune.drop_path=1.0", "finetune.drop_path"),
    ("finetune.enabled=true|finetune.steps=9|finetune.global_batch=48", "(top level)"),  # 24 per rank, micro 16
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_job(DEMO, override.split("|"))
    message = str(err.value)
    assert message.startswith(str(DEMO)) and f": {field}" in message and "\n" not in message
    # a field an override set is blamed on the command line (issue 30); a check of the whole job, on the file
    assert ("command-line override" in message) == (field != "(top level)"), message


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
    assert again == job and job_identity(again, "m") == job_identity(job, "m")


def test_identity_is_the_marked_fields_not_paths_hints_speed_or_length():
    base = identity_fields(load_job(DEMO))
    assert sorted(base) == ["data.image_size", "model.name", "model.overrides", "optim.base_lr", "optim.betas",
                            "optim.grad_clip", "optim.weight_decay", "schedule.global_batch", "seed"]
    # where the data lives, dry-run hints, how steps are computed and decoded, and how long to train: free
    free = ["cluster.tasks_per_node=1", "data.source=/elsewhere/in21k.tar", "data.root=/scratch/moved",
            "data.expected_samples=14197122", "schedule.steps=60", "schedule.warmup_steps=7",
            "schedule.micro_batch=8", "parallel.compile=true", "parallel.attention=cudnn",
            "parallel.activation_checkpointing=true", "data.hw_decoder_load=0.9", "data.prefetch_depth=4",
            "data.num_threads=4", "data.ingest_workers=3", "logging.every_steps=1",
            "finetune.enabled=true", "finetune.steps=50", "finetune.layer_decay=0.65"]  # fine-tuning: its own run
    assert identity_fields(load_job(DEMO, free)) == base
    for what_is_learned, key in (("model.overrides.lambd=0.1", "model.overrides"), ("seed=1", "seed"),
                                 ("optim.base_lr=0.0421", "optim.base_lr"), ("data.image_size=64", "data.image_size"),
                                 ("schedule.global_batch=128", "schedule.global_batch")):
        changed = identity_fields(load_job(DEMO, [what_is_learned]))
        assert [k for k in base if base[k] != changed[k]] == [key], what_is_learned


def test_identity_change_names_what_differs_in_one_line():
    job = load_job(DEMO)
    saved = {"identity": job_identity(job, "aaaa"), "config_hash": "x"}
    assert identity_change(saved, job_identity(load_job(DEMO, ["data.root=/moved", "schedule.steps=60"]), "aaaa")) \
        is None
    why = identity_change(saved, job_identity(job, "bbbb"))
    assert why.startswith("the samples differ") and "aaaa" in why and "bbbb" in why and "\n" not in why
    assert identity_change(saved, job_identity(load_job(DEMO, ["seed=5"]), "aaaa")) == \
        "the job changed what training continues with: seed 0 -> 5"
    # a checkpoint of an earlier cratescale (whole-config hash, paths included) cannot be checked: refused
    assert "earlier cratescale (config hash 9f3e" in identity_change({"config_hash": "9f3e"}, job_identity(job, "a"))


def test_schedule_note_when_the_length_changes():
    meta = {"step": 20, "total_steps": 20, "warmup_steps": 2}
    assert schedule_note(meta, 20, 2) is None
    note = schedule_note(meta, 60, 2)
    assert note == ("schedule: the checkpoint at step 20 was trained toward 20 steps (warmup 2), this job runs 60 "
                    "(warmup 2): the learning-rate schedule was recomputed for the new length")


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


def test_data_pipeline_defaults_are_the_schemas():
    """config may not import data_pipeline (DESIGN.md section 2), so a default both state is checked here: a
    loader or ingest called without the job (evaluation, the ingest CLI) behaves as the job's default."""
    from data_pipeline.gpu_decode import HW_DECODER_LOAD
    from data_pipeline.work import SHARD_SIZE

    fields = JobConfig.model_fields["data"].annotation.model_fields
    assert fields["hw_decoder_load"].default == HW_DECODER_LOAD
    assert fields["shard_size"].default == SHARD_SIZE
