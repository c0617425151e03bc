"""RunProgress: a run's summary folded in from metrics.jsonl as it grows, reading only new lines."""
import json

from cratescale.launch.progress import RunProgress, run_summary


def _append(path, *rows, tail: str = "") -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_incremental_updates_match_one_read_and_wait_for_whole_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    progress = RunProgress(tmp_path)
    assert progress.update()["step"] == 0  # no file yet
    _append(path, {"kind": "start", "step": 0, "total_steps": 10, "resumed": False},
            {"kind": "first_step", "step": 1, "seconds_since_start": 3.04},
            {"kind": "train", "step": 4, "loss": 1.0}, {"kind": "commit", "step": 4},
            {"kind": "train", "step": 6, "loss": 0.9}, tail='{"kind": "commit", "st')  # a line being written
    mid = progress.update()
    assert (mid["step"], mid["commits"], mid["last"]["loss"], mid["first_step_s"]) == (6, 1, 0.9, 3.0)
    _append(path, tail='ep": 6}\n')  # its end arrives
    _append(path, {"kind": "end", "step": 6, "status": "preempted"},
            {"kind": "start", "step": 4, "total_steps": 10, "resumed": True},  # 2 steps lost since commit 4
            {"kind": "train", "step": 10, "loss": 0.5}, {"kind": "end", "step": 10, "status": "completed"})
    end = progress.update()
    assert end == run_summary(tmp_path)  # the same as reading the whole file once
    assert (end["restarts"], end["lost_steps"], end["preempted"], end["commits"]) == (1, 2, 1, 2)
    assert end["finished"] and end["step"] == 10 and end["total_steps"] == 10


def test_a_line_cut_by_a_kill_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _append(path, {"kind": "start", "step": 0, "total_steps": 5}, tail='{"kind": "tra')
    _append(path, {"kind": "train", "step": 2, "loss": 2.0})  # the next writer's line follows the cut one
    _append(path, {"kind": "train", "step": 3, "loss": 1.5})
    summary = run_summary(tmp_path)
    assert summary["step"] == 3 and summary["last"]["loss"] == 1.5


def test_logging_progress_false_turns_the_bar_off_but_keeps_the_state_lines():
    """logging.progress reaches the launcher's training display: no bar redraws in a log file, one line per state."""
    import io

    from rich.console import Console

    from cratescale.launch.display import TrainingDisplay

    status = {"last": None, "restarts": 0, "requeues": 0, "step": 3, "total_steps": 8, "state": "RUNNING",
              "job_id": "42"}
    out = {}
    for bar in (True, False):
        console = Console(file=io.StringIO(), force_terminal=True, color_system=None, width=100)
        with TrainingDisplay(console, bar=bar) as display:
            display.update(status)
        out[bar] = console.file.getvalue()
    assert "job 42: RUNNING" in out[True] and "job 42: RUNNING" in out[False]
    assert "step 3/8" in out[True] and "step 3/8" not in out[False]


def test_a_commit_sealed_without_its_row_is_recorded_at_the_next_start_and_lost_steps_agree(tmp_path):
    """Issue 27: the survivor of a lost node sealed step 15 and died in the agreement after the seal, before its
    metrics row; the next start records it from the store (`recovered`), and the lost steps count from it."""
    from cratescale.engine.metrics import MetricsWriter, unrecorded_commits

    path = tmp_path / "metrics.jsonl"
    _append(path, {"kind": "start", "step": 0, "total_steps": 30, "resumed": False},
            {"kind": "commit", "step": 5}, {"kind": "commit", "step": 10}, {"kind": "train", "step": 17})
    sealed = {5: 100.0, 10: 200.0, 15: 300.0}   # what the store's markers say
    missing = unrecorded_commits(tmp_path, sealed)
    assert [(r["step"], r["recovered"], r["sealed_at"]) for r in missing] == [(15, True, 300.0)]
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for record in missing:
        writer.write(record)
    writer.write({"kind": "start", "step": 15, "total_steps": 30, "resumed": True})
    writer.close()
    assert unrecorded_commits(tmp_path, sealed) == []   # recorded once
    summary = run_summary(tmp_path)
    assert summary["commits"] == 3 and summary["lost_steps"] == 2   # steps 16 and 17 ran again, not -2 or 5
