"""Scaling model of CRATE-MAE pretraining under DeepSpeed ZeRO: step time, images/s and the time of one
ImageNet-21k epoch for 8 to 512 GPUs at a fixed global batch, from a measured per-GPU step time.

    .venv/bin/python -m bench.scaling                              # assumed H100 compute (see ASSUMED below)
    .venv/bin/python -m bench.scaling --gpu-results bench/results/h100_run*.json [--layout all] [--compiled]
    .venv/bin/python -m bench.scaling --step-ms 120 --micro-batch 256 [--fixed-ms 8]
    .venv/bin/python -m bench.scaling --check-cpu                  # 2-rank gloo DeepSpeed check (bench/scaling_check.py)

The model (stated simplifications):
- Compute per micro-step t(b) = fixed + b / R (R: per-GPU images/s at large batch; fixed: launch overhead and
  the optimizer step, kept whole although ZeRO shards the optimizer step). A fit of the batch-search probes
  of bench/gpu.sh gives both; without them R comes from FLOPs x an assumed MFU.
- Per-GPU batch = global / W; above the largest micro-batch that fits, gradient accumulation splits it.
- Traffic per GPU of one reduce-scatter or all-gather of P values: P x bytes x (W-1)/W (one "unit").
  Textbook ZeRO-1: one reduce-scatter of the gradients and one all-gather of the updated parameters per step
  (2 units); ZeRO-2: the reduce-scatter on every micro-step (only partitioned gradients are kept) + one
  all-gather; ZeRO-3: per micro-step an all-gather in forward, one in backward and a reduce-scatter (3 units).
  DeepSpeed 0.19.8's ZeRO-1/2 all-reduce each gradient bucket (use_multi_rank_bucket_allreduce, default on),
  i.e. 2 units for the gradients: 3 units per step (--textbook-zero for the 2-unit form).
- Hierarchical links: inside a node (g GPUs) NVLink, across N nodes each GPU's own NIC carries its 1/g share:
  t = P b (g-1)/g / (eff x NVLink) + P b (N-1)/(N g) / (eff x NIC) + latency x ((g-1) + (N-1)).
  This is what NCCL's rail-aligned rings reach in bandwidth terms; no congestion, no stragglers.
- Overlap: a fraction `overlap` of the gradient reduce-scatters (and of ZeRO-3's gathers) hides behind
  compute, never more than the compute time itself; ZeRO-1/2's parameter all-gather after the optimizer step
  is exposed. DeepSpeed's default for ZeRO-1/2 (overlap_comm false, which the generated config keeps) is 0.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from bench.record import Run, add_json_arg

REPO = Path(__file__).resolve().parents[1]
IN21K_IMAGES = 14_197_122
GPU_COUNTS = (8, 16, 32, 64, 128, 256, 512)
# ASSUMED when no GPU results are given: H100 SXM dense bf16 datasheet, an MFU, eager launch overhead.
ASSUMED = dict(peak_tflops=989.0, mfu=0.30, fixed_ms=10.0, max_micro=256)


@dataclass(frozen=True)
class Links:
    gpus_per_node: int = 8
    nvlink_gbs: float = 450.0  # per GPU, one direction (H100 NVLink 4: 900 GB/s bidirectional)
    nic_gbs: float = 50.0  # per GPU: 8 x 400 Gb/s InfiniBand per 8-GPU node
    efficiency: float = 0.8  # achieved / nominal bandwidth (NCCL bus bandwidth)
    latency_us: float = 10.0  # per ring hop


@dataclass(frozen=True)
class Compute:
    rate: float  # per-GPU images/s at large batch (1/slope)
    fixed_s: float  # per micro-step overhead
    max_micro: int  # largest micro-batch that fits
    source: str

    def micro_step_s(self, batch: float) -> float:
        return self.fixed_s + batch / self.rate


def collective_s(params: int, nbytes: int, world: int, links: Links) -> float:
    """One reduce-scatter (or all-gather) of `params` values over `world` GPUs, hierarchical."""
    if world <= 1:
        return 0.0
    g = min(world, links.gpus_per_node)
    nodes = math.ceil(world / links.gpus_per_node)
    size = params * nbytes
    intra = size * (g - 1) / g / (links.nvlink_gbs * 1e9 * links.efficiency)
    inter = size * (nodes - 1) / (nodes * g) / (links.nic_gbs * 1e9 * links.efficiency)
    return intra + inter + links.latency_us * 1e-6 * ((g - 1) + (nodes - 1))


def collectives(stage: int, accum: int, ds_allreduce: bool = True) -> dict[str, int]:
    """Full-size (P) reduce-scatter/all-gather equivalents per optimizer step: overlappable and exposed.

    ds_allreduce: DeepSpeed 0.19.8's ZeRO-1/2 default (use_multi_rank_bucket_allreduce=true) reduces each
    gradient bucket with a full all-reduce (= reduce-scatter + all-gather: 2 units) and keeps its own slice,
    so ZeRO-1/2 move 3 units per step, not the textbook 2. ZeRO-3 uses a true reduce-scatter.
    """
    grad = 2 if ds_allreduce else 1
    if stage == 0:  # DDP: one all-reduce, overlapped with backward
        return {"overlappable": 2, "exposed": 0}
    if stage == 1:  # gradients reduced once, at the accumulation boundary; params gathered after the step
        return {"overlappable": grad, "exposed": 1}
    if stage == 2:  # partitioned gradients: reduced on every micro-step
        return {"overlappable": grad * accum, "exposed": 1}
    if stage == 3:  # gather in forward, gather in backward, reduce-scatter, every micro-step
        return {"overlappable": 3 * accum, "exposed": 0}
    raise ValueError(f"ZeRO stage must be 0..3, got {stage}")


def split_batch(per_gpu: float, max_micro: int) -> tuple[float, int]:
    accum = max(1, math.ceil(per_gpu / max_micro))
    return per_gpu / accum, accum


def predict(world: int, global_batch: int, params: int, compute: Compute, links: Links, stage: int = 2,
            nbytes: int = 2, overlap: float = 0.0, ds_allreduce: bool = True) -> dict[str, float]:
    """Step time and its parts for one world size."""
    micro, accum = split_batch(global_batch / world, compute.max_micro)
    compute_s = accum * compute.micro_step_s(micro)
    counts = collectives(stage, accum, ds_allreduce)
    one = collective_s(params, nbytes, world, links)
    over_s, exposed_s = counts["overlappable"] * one, counts["exposed"] * one
    hidden = min(overlap * over_s, accum * micro / compute.rate)  # never more than the math itself
    step = compute_s + over_s + exposed_s - hidden
    rate = global_batch / step
    return {"world": world, "nodes": math.ceil(world / links.gpus_per_node), "per_gpu": global_batch / world,
            "micro": micro, "accum": accum, "compute_s": compute_s, "comm_s": over_s + exposed_s,
            "step_s": step, "images_per_s": rate, "epoch_h": IN21K_IMAGES / rate / 3600,
            "efficiency": rate / (world * compute.rate),
            "compute_efficiency": (accum * micro / compute.rate) / compute_s}


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares y = a + c x; returns (a, c)."""
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        raise ValueError("fit_line needs at least two different x values")
    c = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    return my - c * mx, c


def _result_rows(paths: list[Path]) -> list[dict]:
    return [row for path in paths for row in json.loads(Path(path).read_text()).get("rows", [])]


def compute_from_results(paths: list[Path], model: str, layout: str, compiled: bool = False) -> Compute:
    """Per-GPU compute from bench/gpu.sh's JSON files (the last file wins where several have a row). The eager
    row's batch-search probes give t(b) = fixed + b/R; with `compiled`, R comes instead from the product's
    compiled DeepSpeed engine row (or the plain compiled row) at its batch, keeping the eager fixed cost."""
    rows = _result_rows(paths)
    eager = [r for r in rows if (r.get("extra") or {}).get("model") == model and r["extra"].get("layout") == layout
             and not r["extra"].get("compile") and not r["extra"].get("variant")]
    if not eager:
        raise ValueError(f"{', '.join(map(str, paths))}: no eager training row for model {model!r} layout {layout!r}")
    extra = eager[-1]["extra"]
    probes = [tuple(p) for p in extra.get("probes", [])]
    if len({p[0] for p in probes}) >= 2:
        fixed, slope = fit_line(probes[-3:])  # the large-batch end of the curve
        fixed = max(fixed, 0.0)
    else:
        fixed, slope = 0.0, extra["step_s"] / extra["batch"]
    source = f"measured ({model} {layout} eager)"
    if compiled:
        names = (f"{model} {layout} DeepSpeed ZeRO-2 engine compile", f"{model} {layout} compile")
        found = [[r for r in rows if r.get("what") == name and r.get("extra")] for name in names]
        row = next((match[-1] for match in found if match), None)  # the engine row if there is one
        if row is None:
            raise ValueError(f"no compiled training row for {model} {layout} in {', '.join(map(str, paths))}")
        slope = (row["extra"]["step_s"] - fixed) / row["extra"]["batch"]
        source = f"measured ({row['what']} at batch {row['extra']['batch']}; fixed cost from the eager probes)"
    return Compute(1.0 / slope, fixed, int(extra["batch"]), source)


def assumed_compute(model: str, layout: str) -> Compute:
    from cratescale.models import create_model, train_flops_per_image

    flops = train_flops_per_image(create_model(model, encoder_tokens=layout))
    rate = ASSUMED["peak_tflops"] * 1e12 * ASSUMED["mfu"] / flops
    return Compute(rate, ASSUMED["fixed_ms"] / 1e3, ASSUMED["max_micro"],
                   f"ASSUMED: {ASSUMED['peak_tflops']:.0f} TFLOP/s x MFU {ASSUMED['mfu']} / {flops / 1e9:.1f} GFLOP "
                   f"per image, fixed {ASSUMED['fixed_ms']} ms/micro-step, max micro-batch {ASSUMED['max_micro']}")


def trainable_params(model: str) -> int:
    from cratescale.models import create_model, param_counts

    return param_counts(create_model(model))["trainable"]


def table(params: int, compute: Compute, links: Links, args: argparse.Namespace) -> list[dict[str, float]]:
    print(f"model {args.model} ({params:,} trainable params), layout {args.layout}, global batch {args.global_batch}, "
          f"ZeRO-{args.zero} ({'textbook reduce-scatter' if args.textbook_zero else 'DeepSpeed all-reduce'} "
          f"gradients), {args.comm_bytes}-byte comm, overlap {args.overlap}")
    print(f"compute: {compute.rate:,.0f} img/s/GPU at large batch, fixed {compute.fixed_s * 1e3:.1f} ms per "
          f"micro-step, max micro-batch {compute.max_micro}; {compute.source}")
    print(f"links: NVLink {links.nvlink_gbs} GB/s, NIC {links.nic_gbs} GB/s per GPU, efficiency {links.efficiency}, "
          f"{links.gpus_per_node} GPUs/node, {links.latency_us} us/hop")
    print(f"{'GPUs':>5} {'nodes':>5} {'b/GPU':>6} {'micro x acc':>11} {'compute ms':>10} {'comm ms Z1/Z2/Z3':>18} "
          f"{'step ms':>8} {'img/s':>9} {'epoch min':>9} {'eff':>5}  note")
    out = []
    for world in args.gpus:
        ds = not args.textbook_zero
        p = predict(world, args.global_batch, params, compute, links, args.zero, args.comm_bytes, args.overlap, ds)
        comms = [predict(world, args.global_batch, params, compute, links, z, args.comm_bytes, args.overlap,
                         ds)["comm_s"] for z in (1, 2, 3)]
        note = []
        if p["compute_efficiency"] < 0.8:
            note.append(f"per-GPU batch too small: fixed overhead is {1 - p['compute_efficiency']:.0%} of compute")
        if p["comm_s"] > 0.25 * p["step_s"]:
            note.append("comm-bound")
        print(f"{world:>5} {p['nodes']:>5} {p['per_gpu']:>6.0f} {p['micro']:>6.0f} x {p['accum']:<2} "
              f"{p['compute_s'] * 1e3:>10.1f} {'/'.join(f'{c * 1e3:.1f}' for c in comms):>18} {p['step_s'] * 1e3:>8.1f} "
              f"{p['images_per_s']:>9,.0f} {p['epoch_h'] * 60:>9.1f} {p['efficiency']:>5.2f}  {'; '.join(note)}")
        out.append(p)
    best = max(r["images_per_s"] / r["world"] for r in out)
    print(f"data: the loader must deliver up to {best:,.0f} img/s per GPU (the best row above); "
          f"{args.decode_note}")
    print("trust: the compute term is only as good as its fit (below ~32 images per GPU the fixed per-step cost "
          "dominates and is a single number here); the comm term assumes ideal rail-aligned links, no congestion, "
          "no stragglers and one large bucket; the 2-rank CPU check (--check-cpu) matches the traffic exactly and "
          "the step within 1% on a quiet machine, but is 1.4-1.9x off once other jobs share the cores, the same "
          "failure a straggler GPU or a slow loader would cause.")
    return out


def decode_note(paths: list[Path]) -> str:
    if not paths:
        return "no GPU decode measurement given (bench/gpu.sh's decode row)"
    for row in reversed(_result_rows(paths)):
        if row.get("section") == "decode" and row.get("what", "").startswith("GPU") and row.get("measured"):
            return f"measured nvJPEG decode on one GPU: {row['measured']:,.0f} img/s (decode only, full-size photos)"
    return "the results given have no GPU decode row"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="crate_mae_base")
    p.add_argument("--layout", default="all", choices=("all", "visible"))
    p.add_argument("--gpu-results", type=Path, nargs="+", default=[], help="gpu_results.json file(s) of bench/gpu.sh")
    p.add_argument("--compiled", action="store_true", help="compute from the compiled (engine) row, not eager")
    p.add_argument("--step-ms", type=float, help="measured per-GPU step time at --micro-batch (instead of a file)")
    p.add_argument("--micro-batch", type=int, default=256)
    p.add_argument("--fixed-ms", type=float, default=None, help="per-micro-step overhead (default: fit or assumed)")
    p.add_argument("--global-batch", type=int, default=4096)
    p.add_argument("--gpus", type=int, nargs="+", default=list(GPU_COUNTS))
    p.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3))
    p.add_argument("--comm-bytes", type=int, default=2, help="bytes per value on the wire (bf16: 2)")
    p.add_argument("--overlap", type=float, default=0.0, help="fraction of overlappable comm hidden by compute")
    p.add_argument("--nic-gbs", type=float, default=50.0)
    p.add_argument("--nvlink-gbs", type=float, default=450.0)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--link-efficiency", type=float, default=0.8)
    p.add_argument("--textbook-zero", action="store_true", help="reduce-scatter gradients (2 units), not all-reduce")
    p.add_argument("--check-cpu", action="store_true", help="run the 2-rank gloo check (bench/scaling_check.py)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per worker in --check-cpu")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the --check-cpu runs")
    add_json_arg(p, "scaling_{check,model}")
    args = p.parse_args(argv)
    run = Run()
    if args.check_cpu:
        from bench.scaling_check import check_cpu

        run.save(args.json, {"steps": args.steps, "repeats": args.repeats, **check_cpu(args.steps, repeats=args.repeats)})
        return
    if args.gpu_results:
        compute = compute_from_results(args.gpu_results, args.model, args.layout, args.compiled)
    elif args.step_ms:
        fixed = (args.fixed_ms or 0.0) / 1e3
        rate = args.micro_batch / (args.step_ms / 1e3 - fixed)
        compute = Compute(rate, fixed, args.micro_batch, f"given: {args.step_ms} ms at micro-batch {args.micro_batch}")
    else:
        compute = assumed_compute(args.model, args.layout)
    if args.fixed_ms is not None and not args.step_ms:
        compute = Compute(compute.rate, args.fixed_ms / 1e3, compute.max_micro, compute.source + ", fixed given")
    links = Links(args.gpus_per_node, args.nvlink_gbs, args.nic_gbs, args.link_efficiency)
    args.decode_note = decode_note(args.gpu_results)
    rows = table(trainable_params(args.model), compute, links, args)
    run.save(args.json, {"compute": vars(compute), "links": vars(links), "rows": rows})


if __name__ == "__main__":
    main()
