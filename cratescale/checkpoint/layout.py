"""What a DeepSpeed tag dir holds, read from its file names (the one place that knows DeepSpeed's names).

DeepSpeed 0.19 writes, per ZeRO stage and precision (2 ranks shown; measured on this machine):
    ZeRO-0    fp32 or bf16   mp_rank_00_model_states.pt  (bf16: the fp32 master copy is in its optimizer entry)
    ZeRO-1/2  fp32           mp_rank_00_model_states.pt + zero_pp_rank_{0,1}_mp_rank_00_optim_states.pt
    ZeRO-1/2  bf16           mp_rank_00_model_states.pt + bf16_zero_pp_rank_{0,1}_mp_rank_00_optim_states.pt
    ZeRO-3    fp32           zero_pp_rank_{0,1}_mp_rank_00_model_states.pt + zero_pp_rank_{0,1}_..._optim_states.pt
    ZeRO-3    bf16           zero_pp_rank_{0,1}_mp_rank_00_model_states.pt + bf16_zero_pp_rank_{0,1}_..._optim_states.pt
The fp32 master weights of a partitioned run (ZeRO 1-3) are only in the optimizer files; the model states of a
bf16 run hold bf16-rounded weights. Anything else (expert files, a mix of bf16 and fp32 partitions, a partition
missing) is not a layout this code knows, and is an error that lists the files found.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cratescale.checkpoint.commit import CheckpointError

_FULL_MODEL = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_PART_MODEL = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


class LayoutError(CheckpointError, ValueError):
    """A DeepSpeed tag dir whose files are not a layout this code knows."""


@dataclass(frozen=True)
class DsLayout:
    """`partitioned`: the fp32 master weights live in ZeRO optimizer partitions (stages 1-3), one per rank;
    `zero3`: the module is partitioned too; `precision`: "bf16" or "fp32" for a partitioned run, None for
    ZeRO-0 (its model states say: read them to know)."""
    partitioned: bool
    zero3: bool
    precision: Literal["bf16", "fp32"] | None
    ranks: int

    @property
    def stages(self) -> str:
        return "3" if self.zero3 else "1-2" if self.partitioned else "0"


def _unknown(tag_dir: Path, names: list[str], why: str) -> LayoutError:
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} files)" if len(names) > 12 else "")
    return LayoutError(f"checkpoint {tag_dir}: {why}; files found: [{shown}]")


def ds_layout(tag_dir: Path | str) -> DsLayout:
    """The layout of one DeepSpeed tag dir (`step_N/ds`); LayoutError names the files when it is not known."""
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"checkpoint: {tag_dir} is not a directory")
    names = sorted(p.name for p in tag_dir.iterdir())
    full = [n for n in names if _FULL_MODEL.match(n)]
    part = [n for n in names if _PART_MODEL.match(n)]
    optim = [m for m in map(_OPTIM.match, names) if m]
    other = sorted(set(names) - set(full) - set(part) - {m.string for m in optim})
    if other:
        raise _unknown(tag_dir, names, f"unrecognised DeepSpeed file(s) {other[:3]}")
    if not full and not part:
        raise _unknown(tag_dir, names, "no DeepSpeed model states")
    if full and part:
        raise _unknown(tag_dir, names, "both full (ZeRO 0-2) and partitioned (ZeRO-3) model states")
    if len(full) > 1:
        raise _unknown(tag_dir, names, "model-parallel ranks (more than one mp_rank model states file)")
    if not optim:
        if part:
            raise _unknown(tag_dir, names, "ZeRO-3 model states without optimizer partitions")
        return DsLayout(partitioned=False, zero3=False, precision=None, ranks=1)
    prefixes = {bool(m.group(1)) for m in optim}
    if len(prefixes) > 1:
        raise _unknown(tag_dir, names, "a mix of bf16 and fp32 optimizer partitions")
    ranks = sorted(int(m.group(2)) for m in optim)
    if ranks != list(range(len(ranks))) or (part and len(part) != len(ranks)):
        raise _unknown(tag_dir, names, f"optimizer partitions of ranks {ranks} do not form a whole run")
    return DsLayout(partitioned=True, zero3=bool(part), precision="bf16" if prefixes == {True} else "fp32",
                    ranks=len(ranks))
