"""DESIGN.md section 2 as docs/imports.md tables it: imports flow one way. Parsed from the source, so lazy imports
count too."""
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

TABLE = REPO / "docs" / "imports.md"


def read_table(path: Path = TABLE) -> tuple[dict[str, set[str]], dict[str, dict[str, tuple[str, ...]]], set[str]]:
    """docs/imports.md's table: package -> packages it may import (besides itself); package -> {package: the only
    modules of it allowed} (an entry "embeddings.store"); the packages that may import data_pipeline."""
    allowed: dict[str, set[str]] = {}
    only: dict[str, dict[str, tuple[str, ...]]] = {}
    data: set[str] = set()
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("package", "---") or not line.startswith("|"):
            continue
        package, imports, uses_data = cells
        allowed[package] = set()
        if not imports.startswith("nothing"):
            for entry in (e.strip() for e in imports.split(",")):
                name, _, module = entry.partition(".")
                allowed[package].add(name)
                if module:
                    only.setdefault(package, {})[name] = (f"cratescale.{entry}",)
        if uses_data == "yes":
            data.add(package)
    return allowed, only, data


ALLOWED, ONLY, MAY_USE_DATA_PIPELINE = read_table()
# cratescale/files.py (durable writes, standard library only; docs/imports.md): every package but models and
# kernels may use it.
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


def test_the_table_names_every_package():
    packages = {p.name for p in (REPO / "cratescale").iterdir() if (p / "__init__.py").exists()}
    assert set(ALLOWED) == packages, f"{TABLE} lists {sorted(ALLOWED)}, cratescale has {sorted(packages)}"


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
                only = ONLY.get(package, {}).get(parts[1] if len(parts) > 1 else "")
                if parts[0] == "cratescale" and only is not None and name not in only:
                    problems.append(f"{path.relative_to(REPO)} imports {name} (only {', '.join(only)})")
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


def _cycles(package: str) -> list[str]:
    """Module pairs of cratescale/<package> that import each other, directly or through others (lazy imports too)."""
    root = REPO / "cratescale" / package
    mods = {f"cratescale.{package}.{p.stem}": p for p in root.glob("*.py") if p.stem != "__init__"}
    edges = {m: {n for n in imported_modules(p) if n in mods and n != m} for m, p in mods.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo.extend(edges[m])
        return False

    return [f"{m} -> {n}" for m in sorted(mods) for n in sorted(edges[m]) if reaches(n, m)]


def test_launch_modules_form_no_cycle():
    """stages runs the follow-ups, the follow-ups do not reach back into stages (the console and StageError
    live in display.py)."""
    assert not _cycles("launch"), "\n".join(_cycles("launch"))
