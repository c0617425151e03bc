"""DESIGN.md section 2: imports flow one way. Parsed from the source, so lazy imports count too."""
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# package -> cratescale packages it may import (besides itself)
ALLOWED = {
    "models": set(),
    "kernels": set(),  # Triton kernels that training hands to the models from outside (distributed/wrap.py)
    "config": set(),
    "distributed": {"config", "kernels"},
    "checkpoint": {"config"},
    "engine": {"models", "distributed", "checkpoint", "config"},
    "embeddings": {"models", "distributed", "checkpoint", "config"},
    "evaluation": {"models", "distributed", "checkpoint", "config", "embeddings"},
    "launch": {"models", "distributed", "checkpoint", "config", "engine", "embeddings", "evaluation"},
}
MAY_USE_DATA_PIPELINE = {"engine", "embeddings", "evaluation", "launch"}
# cratescale/files.py (durable writes, standard library only): every package but models and kernels may use it.
SHARED = {"files"}
# Models: torch and the standard library only; no distributed, launcher or I/O libraries.
MODEL_ALLOWED_ROOTS = {"torch", *sys.stdlib_module_names} - {"os", "subprocess", "socket", "pickle", "shutil"}
MODEL_FORBIDDEN = ("torch.distributed",)


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_import_direction():
    problems = []
    for package, allowed in ALLOWED.items():
        for path in sorted((REPO / "cratescale" / package).rglob("*.py")):
            for name in imported_modules(path):
                parts = name.split(".")
                shared = SHARED if package not in ("models", "kernels") else set()
                if parts[0] == "cratescale" and len(parts) > 1 and parts[1] != package and \
                        parts[1] not in allowed | shared:
                    problems.append(f"{path.relative_to(REPO)} imports {name}")
                if parts[0] == "data_pipeline" and package not in MAY_USE_DATA_PIPELINE:
                    problems.append(f"{path.relative_to(REPO)} imports {name}")
                if package == "models" and (parts[0] not in MODEL_ALLOWED_ROOTS | {"cratescale"}
                                            or name.startswith(MODEL_FORBIDDEN)):
                    problems.append(f"{path.relative_to(REPO)} (models are torch-only) imports {name}")
    for path in sorted((REPO / "cratescale" / "kernels").rglob("*.py")):
        for name in imported_modules(path):
            if name.split(".")[0] not in {"torch", "triton", *sys.stdlib_module_names} or \
                    name.startswith(MODEL_FORBIDDEN):
                problems.append(f"{path.relative_to(REPO)} (kernels are torch + triton only) imports {name}")
    for name in imported_modules(REPO / "cratescale" / "files.py"):
        if name.split(".")[0] not in sys.stdlib_module_names:
            problems.append(f"cratescale/files.py (standard library only) imports {name}")
    for path in sorted((REPO / "data_pipeline").rglob("*.py")):
        for name in imported_modules(path):
            if name.split(".")[0] == "cratescale" or name.startswith("torch.distributed"):
                problems.append(f"{path.relative_to(REPO)} imports {name}")
    assert not problems, "\n".join(problems)


def test_the_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from cratescale.launch import run\n")
    assert "cratescale.launch" in imported_modules(bad)
