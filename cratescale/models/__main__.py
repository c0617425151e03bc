"""`python -m cratescale.models`: every registered model's parameter counts and training FLOPs.

Models are built on the meta device, so this takes a second and allocates nothing."""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version

import torch

from . import create_model, list_models, param_counts, train_flops_per_image


def _version() -> str:
    try:
        return f"cratescale {version('cratescale')}"
    except PackageNotFoundError:
        return "cratescale (not installed: run from a checkout)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cratescale.models", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    parser.parse_args(argv)
    header = f"{'name':<20} {'layout':<8} {'total':>13} {'trainable':>13} {'reference':>13} {'train GFLOP/img':>16}"
    print(header)
    print("-" * len(header))
    for name in list_models():
        with torch.device("meta"):
            model = create_model(name)
        c = param_counts(model)
        gflops = train_flops_per_image(model) / 1e9
        print(f"{name:<20} {model.encoder_tokens:<8} {c['total']:>13,} {c['trainable']:>13,} {c['reference']:>13,} {gflops:>16.2f}")


if __name__ == "__main__":
    main()
