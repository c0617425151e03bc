"""The one durable replace (cratescale/files.py) and data_pipeline's copy: the new content or the old, never a
part, and no tmp file left behind by a write that failed."""
import os
from pathlib import Path

import pytest

from cratescale.files import replace_durable, replacing
from data_pipeline.durable import replaced_by


class Boom(RuntimeError):
    pass


def test_replace_durable_writes_text_and_bytes(tmp_path: Path):
    target = tmp_path / "state.json"
    replace_durable(target, '{"a": 1}')
    replace_durable(target, b'{"a": 2}', hidden=True)
    assert target.read_text() == '{"a": 2}' and os.listdir(tmp_path) == ["state.json"]


@pytest.mark.parametrize("hidden", [False, True])
def test_a_failed_write_keeps_the_old_content_and_no_tmp(tmp_path: Path, hidden: bool):
    target = tmp_path / "latest"
    target.write_bytes(b"old")
    with pytest.raises(Boom), replacing(target, hidden) as tmp:
        tmp.write_bytes(b"ne")  # half of the new content, then the writer dies
        # the names checkpoint/retention.py and the embedding store tidy after a kill
        assert tmp.name == (f".latest.tmp{os.getpid()}" if hidden else f"latest.{os.getpid()}.tmp")
        raise Boom
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["latest"]


def test_data_pipeline_copy_behaves_the_same(tmp_path: Path):
    target = tmp_path / "manifest.parquet"
    with replaced_by(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(Boom), replaced_by(target) as f:
        f.write(b"torn")
        raise Boom
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["manifest.parquet"]
