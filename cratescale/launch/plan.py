"""--dry-run: validate a job at its target scale and print what would run, without a cluster."""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from cratescale.config import JobConfig, ProfileConfig, RunPaths
from cratescale.config.batching import resumable_node_counts, split_for_world
from cratescale.distributed import deepspeed_config
from cratescale.engine import optim
from cratescale.engine.model_build import build_model, count_train_samples
from cratescale.launch.executors import sbatch_script
from cratescale.models import train_flops_per_image


@dataclass
class Plan:
    model_name: str
    params_total: int
    params_trainable: int
    world_size: int
    global_batch: int
    micro_batch: int
    grad_accum: int
    train_samples: int | None
    steps_per_epoch: int | None
    total_steps: int | None
    peak_lr: float
    model_states_gb_per_gpu: float
    flops_per_image: float
    layout: str
    checkpoint_gb: float


def model_state_bytes(params: int, trainable: int, zero_stage: int, world: int, bf16: bool) -> float:
    """Bytes per GPU of weights + grads + fp32 master and Adam moments, as ZeRO partitions them."""
    low = 2 if bf16 else 4
    weights = params * low / (world if zero_stage >= 3 else 1)
    grads = trainable * low / (world if zero_stage >= 2 else 1)
    optimizer = trainable * (12 if bf16 else 8) / (world if zero_stage >= 1 else 1)
    return weights + grads + optimizer


def checkpoint_bytes(params: int, trainable: int, bf16: bool) -> float:
    """Bytes of one commit, all ranks together: the weights, plus fp32 master weights (bf16) and Adam's moments."""
    return params * (2 if bf16 else 4) + trainable * (12 if bf16 else 8)


def make_plan(job: JobConfig, paths: RunPaths) -> Plan:
    with torch.device("meta"):
        model = build_model(job)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    samples = count_train_samples(paths.manifest) if paths.manifest.exists() else job.data.expected_samples
    steps_per_epoch = samples // job.schedule.global_batch if samples else None
    total_steps = optim.total_steps(job, steps_per_epoch) if steps_per_epoch else job.schedule.steps
    state_bytes = model_state_bytes(total, trainable, job.parallel.zero_stage, job.world_size,
                                    job.parallel.precision == "bf16")
    return Plan(job.model.name, total, trainable, job.world_size, job.schedule.global_batch, job.schedule.micro_batch,
                job.grad_accum, samples, steps_per_epoch, total_steps, optim.peak_lr(job), state_bytes / 2**30,
                train_flops_per_image(model), model.encoder_tokens,
                checkpoint_bytes(total, trainable, job.parallel.precision == "bf16") / 2**30)


def estimate_line(plan: Plan, profile: ProfileConfig) -> str | None:
    """Compute-only time estimate from the profile's measured step (bench/scaling.py adds communication)."""
    measured = profile.measured_step.get(f"{plan.model_name}/{plan.layout}")
    if measured is None:
        return None
    micro_s = measured.micro_step_s(plan.micro_batch)
    step_s = plan.grad_accum * micro_s
    line = (f"estimate       {step_s * 1e3:.1f} ms per step (compute only), {plan.global_batch / step_s:,.0f} img/s "
            f"on {plan.world_size} GPUs")
    if plan.steps_per_epoch:
        line += f", {plan.steps_per_epoch * step_s / 60:.1f} min per epoch"
    if plan.total_steps:
        line += f", {plan.total_steps * step_s / 3600:,.1f} h in all"
    fixed_share = measured.fixed_ms / 1e3 / micro_s
    if fixed_share > 0.25:
        line += (f"; at {plan.micro_batch} images per GPU the fixed per-step cost is {fixed_share:.0%} of it "
                 f"(fewer GPUs or a larger global batch use them better)")
    return line + f"  [{measured.source or 'profile measured_step'}]"


def overheads_line(plan: Plan, job: JobConfig, profile: ProfileConfig) -> str:
    """What the run pays besides its steps: a (re)start, its commits, a resize's universal conversion."""
    cost = profile.measured_restart
    if cost is None:
        return (f"not measured for profile {profile.name} (measured_restart: bench/scale.py, bench/checkpoint.py, "
                f"bench/universal.py on one node); a commit is {plan.checkpoint_gb:.2f} GiB")
    commit_s = plan.checkpoint_gb / (cost.commit_gb_per_s * job.cluster.nodes)
    commits = -(-plan.total_steps // job.checkpoint.every_steps) if plan.total_steps else None
    line = f"start-up {cost.startup_s:.0f} s per (re)start; a commit {plan.checkpoint_gb:.2f} GiB in {commit_s:.1f} s"
    if commits:
        line += f" x {commits:,} = {commits * commit_s / 60:,.1f} min"
        if job.checkpoint.async_commit:
            line += " (asynchronous: mostly hidden behind the steps)"
    convert_s = cost.convert_fixed_s + plan.checkpoint_gb / cost.convert_gb_per_s
    line += (f"; a resize (another world size) adds the universal conversion, {convert_s:.0f} s"
             f"  [{cost.source or 'profile measured_restart'}]")
    return line


def resumable_line(job: JobConfig) -> str:
    """The node counts a restart after a lost node can run on (cluster.min_nodes up to cluster.nodes)."""
    counts = resumable_node_counts(job)
    splits = [(n, split_for_world(job.schedule.global_batch, n * job.cluster.tasks_per_node,
                                  job.schedule.micro_batch)) for n in counts]
    shown = ", ".join(f"{n} (micro {s[0]} x accum {s[1]})" for n, s in splits[::-1][:6])
    more = f" and {len(splits) - 6} smaller" if len(splits) > 6 else ""
    return (f"{shown}{more} nodes (cluster.min_nodes {job.cluster.min_nodes}); other counts do not split the global "
            f"batch {job.schedule.global_batch}" if splits else "no node count splits the global batch")


def finetune_line(job: JobConfig) -> str:
    """What the finetune stage will train: sets x arms, each a run of its own length and batch."""
    ft = job.finetune
    sets = [d.name for d in job.extract.datasets] or ["pretrain (the pretraining set's val split measures it)"]
    length = f"{ft.steps} steps" if ft.steps is not None else f"{ft.epochs:g} epochs"
    return (f"{len(sets)} set(s) x {len(ft.arms)} arm(s) ({', '.join(ft.arms)}), one run each: {length} of "
            f"{ft.global_batch} (micro {ft.micro_batch}), peak lr {ft.base_lr * ft.global_batch / 256:.3g}, "
            f"layer decay {ft.layer_decay}; sets: {', '.join(sets)}")


def render_plan(job: JobConfig, profile: ProfileConfig, paths: RunPaths) -> str:
    plan = make_plan(job, paths)
    lines = [
        f"job            {job.name}  ({job.cluster.executor} executor, profile {profile.name})",
        f"run dir        {paths.run_dir}",
        f"stages         {' -> '.join(job.stages)}",
        f"model          {plan.model_name}: {plan.params_total:,} parameters ({plan.params_trainable:,} trainable), "
        f"{plan.flops_per_image / 1e9:.2f} GFLOP per image per step",
        f"ranks          {job.cluster.nodes} nodes x {job.cluster.tasks_per_node} = {plan.world_size}",
        f"resumable on   {resumable_line(job)}",
        f"overheads      {overheads_line(plan, job, profile)}",
        f"batch          global {plan.global_batch} = micro {plan.micro_batch} x accum {plan.grad_accum} x "
        f"{plan.world_size} ranks; peak lr {plan.peak_lr:.3g}",
        f"data           {job.data.source} -> {paths.manifest}"
        + ("" if paths.manifest.exists() else " (ingest will create it)"),
        f"epoch          {plan.train_samples or 'unknown'} samples, {plan.steps_per_epoch or '?'} steps per epoch, "
        f"{plan.total_steps or '?'} steps in all",
        f"memory/GPU     {plan.model_states_gb_per_gpu:.2f} GiB model states under ZeRO-{job.parallel.zero_stage} "
        f"({job.parallel.precision}), activations extra",
        "deepspeed      " + json.dumps(deepspeed_config(job, plan.world_size)),
    ]
    estimate = estimate_line(plan, profile)
    if estimate:
        lines.insert(-1, estimate)
    if "finetune" in job.stages and job.finetune.enabled:
        lines.insert(-1, f"finetune       {finetune_line(job)}")
    if job.cluster.executor == "slurm":
        lines += ["sbatch script (what would be submitted):", sbatch_script(job, profile, paths.submitit_dir)]
    return "\n".join(lines)
