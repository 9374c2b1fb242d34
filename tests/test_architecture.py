"""The project's shape: modules import downward only, methods are never recognised by name
outside ``vi/inference.py``, experiment modules stay small, and the documentation links only
inside the repository."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: the library's layers, bottom up: a module may import from its own layer or below
LAYERS = [
    {"files", "streams", "families", "nets", "data", "optim", "contract"},
    {"estimators", "linear_gaussian", "decoders"},
    {"objectives", "references", "ais"},
    {"inference"},
    {"evaluation", "gradstats"},
    {"config", "training"},
    {"probes"},
]
LAYER = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _vi_imports(path: Path) -> set[str]:
    """Every ``vi.<module>`` a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "vi":
                out |= {a.name for a in node.names}
            elif node.module.startswith("vi."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("vi.")}
    return out


def test_every_library_module_has_a_layer() -> None:
    modules = {p.stem for p in (ROOT / "vi").glob("*.py") if p.stem != "__init__"}
    assert modules == set(LAYER), f"unlayered {modules - set(LAYER)}, stale {set(LAYER) - modules}"


@pytest.mark.parametrize("name", sorted(LAYER))
def test_library_modules_import_downward_only(name: str) -> None:
    imports = _vi_imports(ROOT / "vi" / f"{name}.py") - {name}
    upward = sorted(m for m in imports if LAYER.get(m, -1) > LAYER[name])
    assert not upward, f"vi.{name} (layer {LAYER[name]}) imports {upward} from above"


def test_nothing_in_the_library_imports_the_experiments() -> None:
    for path in (ROOT / "vi").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) experiments", text, re.M), path.name


@pytest.mark.slow
def test_each_module_imports_in_isolation_with_only_lower_layers() -> None:
    """A fresh interpreter per module: importing it loads no module of a higher layer."""
    for name in sorted(LAYER):
        code = (f"import sys, vi.{name}; print(' '.join(sorted(m.split('.')[1] for m in "
                f"sys.modules if m.startswith('vi.'))))")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
        upward = sorted(m for m in out if LAYER.get(m, -1) > LAYER[name])
        assert not upward, f"importing vi.{name} loaded {upward}"


_METHOD_NAMES = ("vem", "amortized", "semi_amortized", "sa_vae")
_BRANCH = re.compile(
    r"""(==|!=)\s*["'](%s)["']|["'](%s)["']\s*(==|!=)|\bin\s*[(\[{]\s*["'](%s)["']"""
    r"""|hasattr\([^)]*["'](encoder|local|local_opt|refine)["']\)"""
    % (("|".join(_METHOD_NAMES),) * 3))


def test_no_method_name_branches_outside_the_methods_module() -> None:
    """Callers read what a method declares about itself (its traits), never its name.

    The findings are exempt: each tests a claim about named methods (e.g. Cremer et al.'s
    amortized VAE against variational EM), so choosing those methods' rows of a results table
    is the claim's data, not a dispatch on a method."""
    offenders = []
    for folder in ("vi", "experiments", "benchmarks", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "vi" / "inference.py" or "findings" in path.parts:
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if _BRANCH.search(line) and not re.match(r"\s*for .* in ", line):
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "method-name branches:\n" + "\n".join(offenders)


def test_no_experiments_file_exceeds_500_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "experiments").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


_LINK = re.compile(r"\]\(([^)\s]+)\)|\bsrc=\"([^\"]+)\"")


def test_documentation_links_resolve_inside_the_repository() -> None:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    assert (ROOT / "docs").is_dir(), "docs/ is missing"
    bad = []
    for doc in docs:
        for match in _LINK.finditer(doc.read_text()):
            target = (match.group(1) or match.group(2)).split("#")[0]
            if not target or re.match(r"^[a-z]+://|^mailto:", target):
                continue
            resolved = (doc.parent / target).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                bad.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not bad, bad


def test_no_text_refers_outside_the_repository_or_to_work_tickets() -> None:
    pattern = re.compile(r"\.\./shared|SPEC\.md|SPEC §|\bissue \d+|STYLE §")
    offenders = []
    for folder in ("vi", "experiments", "benchmarks", "docs", "examples", "tests"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".md", ".json") and path.name != Path(__file__).name:
                for i, line in enumerate(path.read_text().splitlines(), 1):
                    if pattern.search(line):
                        offenders.append(f"{path.relative_to(ROOT)}:{i}")
    for path in (ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "environment.yml"):
        if pattern.search(path.read_text()):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
