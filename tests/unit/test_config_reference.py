"""The config reference and the launcher's CLI as a newcomer meets them (issue 30 item 1): every field findable
with its doc, mistakes caught with one line that names where, options and overrides in any order."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from cratescale.config import load_job
from cratescale.config.reference import DOC_PATH, field_rows, render_markdown

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, module: str = "cratescale.launch") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_every_field_has_a_doc_and_docs_config_md_is_generated_from_the_schema():
    rows = field_rows()
    assert len(rows) > 80 and all(r.doc for r in rows), [r.name for r in rows if not r.doc]
    assert {"schedule.micro_batch", "cluster.min_nodes", "logging.progress", "extract.datasets[].source"} <= \
        {r.name for r in rows}
    assert DOC_PATH.read_text() == render_markdown(rows), \
        "docs/config.md is stale: python -m cratescale.launch config --markdown > docs/config.md"


def test_config_lists_fields_with_the_jobs_values():
    out = cli("config", "jobs/demo.yaml", "schedule.steps=20")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    steps = next(i for i, line in enumerate(lines) if line.startswith("schedule.steps "))
    assert lines[steps].endswith("= null  -> 20") and "optimizer steps" in lines[steps + 1]
    progress = next(line for line in lines if line.startswith("logging.progress "))
    assert progress.split()[1:] == ["bool", "=", "true"]


def test_a_misspelled_override_is_blamed_on_the_command_line_with_a_suggestion():
    out = cli("jobs/demo.yaml", "schedule.setps=3", "--dry-run")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "error: jobs/demo.yaml, command-line override 'schedule.setps=3': schedule.setps: Extra inputs are not "
        "permitted; did you mean 'steps'? (got 3)"]


def test_a_misspelled_field_in_the_file_is_blamed_on_the_file(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("name: x\nschedule: {steps: 10, warmup_step: 2}\n")
    out = cli(str(job), "--dry-run")
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: {job}: schedule.warmup_step: Extra inputs are not permitted; did you mean " \
                                 f"'warmup_steps'? (got 2)"


def test_an_empty_job_file_is_refused(tmp_path):
    job = tmp_path / "empty.yaml"
    job.write_text("# nothing yet\n")
    out = cli(str(job), "--dry-run")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith(f"error: {job}: the job file is empty")


def test_options_and_overrides_in_any_order_and_warm_up_past_the_end_is_said():
    out = cli("jobs/demo.yaml", "--dry-run", "schedule.steps=20")
    assert out.returncode == 0, out.stderr
    assert "warning: schedule: warm-up of 40 steps >= the run's 20 steps" in out.stdout
    assert "resumable on" in out.stdout


def test_print_config_is_the_resolved_job_and_loads_back(tmp_path):
    out = cli("--print-config", "jobs/demo.yaml", "schedule.steps=7")
    assert out.returncode == 0, out.stderr
    printed = tmp_path / "printed.yaml"
    printed.write_text(out.stdout)
    job = load_job(printed)
    assert job.schedule.steps == 7 and Path(job.run_dir).is_absolute()
    assert yaml.safe_load(out.stdout)["name"] == "demo"


def test_version_and_help_of_every_cli():
    for module in ("cratescale.launch", "cratescale.models", "data_pipeline.ingest"):
        version = cli("--version", module=module)
        assert version.returncode == 0 and version.stdout.startswith("cratescale "), (module, version.stderr)
    for module in ("cratescale.launch", "cratescale.models", "data_pipeline.ingest", "cratescale.embeddings",
                   "cratescale.evaluation"):
        helped = cli("--help", module=module)
        assert helped.returncode == 0 and helped.stdout.startswith("usage: "), (module, helped.stdout[:200])
