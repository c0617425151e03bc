"""Library internals behind one door per library: the only modules that reach into private or undocumented
parts of DeepSpeed (compat/deepspeed.py) and submitit (compat/submitit.py). Ray's door is
data_pipeline/local_ray.py, which ingest, extraction, the launcher, bench and tests already share, and
data_pipeline imports nothing from cratescale (DESIGN.md section 2).

Each door names the pinned version it was written against; tests/unit/test_compat.py checks that the
installed version is pyproject.toml's pin and that every internal a door uses is still there, and fails
naming the pin and what changed. compat imports no other cratescale package, and every package may use it.
"""
