"""The results contract (``vi.contract``): one torch-free declaration of what the trainer and the
probes write, read by the library and by the torch-free tools; a probe that writes something
undeclared is refused before anything is trained."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pytest

from experiments import schema
from experiments.grids import load_grid
from vi import contract, probes
from vi.config import RunConfig
from vi.probes import PROBES, ProbeBase, build_probes
from vi.training import ProbeResult, Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = RunConfig.from_dict({"data": {"name": "ppca", "options": {"data_dim": 4, "latent_dim": 1,
                                                                    "n": 40}},
                              "model": {"latent_dim": 1, "hidden": [4]},
                              "method": {"name": "amortized", "encoder_hidden": [4]},
                              "training": {"max_epochs": 1, "batch_size": 10, "stopping": None,
                                           "eval_n_mc": 2}})


@pytest.fixture
def registries():
    """Leave the probe registry and the contract as they were, whatever a test declares."""
    saved = (dict(PROBES), copy.deepcopy(contract.METRICS), dict(contract.TABLES),
             dict(contract.PROBES), dict(contract.ESTIMATORS))
    yield
    for live, old in zip((PROBES, contract.METRICS, contract.TABLES, contract.PROBES,
                          contract.ESTIMATORS), saved, strict=True):
        live.clear()
        live.update(old)


def test_the_contract_and_the_schema_import_without_torch() -> None:
    code = ("import sys, vi.contract, experiments.schema\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] == 'torch'\n"
            "         or (m.startswith('vi.') and m != 'vi.contract')]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_schema_reads_the_contract_itself() -> None:
    """One list: the schema's names are the contract's objects, not copies."""
    assert schema.METRICS is contract.METRICS and schema.PROBES is contract.PROBES
    assert schema.METRIC_COLUMNS is contract.METRIC_COLUMNS
    for table in contract.TABLES:
        assert schema.TABLE_COLUMNS[table] == (*contract.IDENTITY_COLUMNS,
                                               *contract.TABLES[table])
    assert set(schema.TABLE_COLUMNS) == set(contract.TABLES) | set(schema.EXPERIMENT_TABLES)


@pytest.mark.parametrize("name", sorted(contract.PROBES))
def test_every_study_probe_is_implemented_and_declared(name: str) -> None:
    """Each probe the contract declares has a class writing exactly that, every entry declared
    (``test_each_probe_returns_the_metrics_it_declares`` runs each one)."""
    cls = PROBES[name]
    declared = contract.check_probe(name)
    assert (cls.metrics, cls.tables) == (declared.metrics, declared.tables)
    assert issubclass(cls.Options, ProbeBase.Options)
    assert set(contract.TRAINER_METRICS).isdisjoint(cls.metrics)


def test_metric_descriptions_are_written_once() -> None:
    """No description of the contract is repeated in the probes' source."""
    source = (ROOT / "vi" / "probes.py").read_text()
    repeated = [m for m, text in contract.METRICS.items() if text in source]
    assert not repeated


def test_a_probe_class_declares_its_own_metrics_and_tables(registries, tmp_path) -> None:
    """One class anywhere: its metric and table become known to the torch-free schema, a grid
    may name it, and its rows pass validation."""

    class Toy(ProbeBase):
        name = "toy"
        metrics: ClassVar = {"toy_value": "a toy measurement (nats)"}
        tables: ClassVar = {"toy_table": ("epoch", "x")}

        @dataclass(frozen=True)
        class Options(ProbeBase.Options):
            scale: float = 1.0

    assert Toy.metrics == ("toy_value",) and Toy.tables == ("toy_table",)
    assert build_probes({"toy": {"scale": 2.0}}, CONFIG)[0].options.scale == 2.0
    assert schema.METRICS["toy_value"] == "a toy measurement (nats)" and "toy" in schema.PROBES
    assert schema.TABLE_COLUMNS["toy_table"][-2:] == ("epoch", "x")
    row = dict.fromkeys(schema.METRIC_COLUMNS, "x") | {"metric": "toy_value", "value": 1.0,
                                                        "split": "test", "param_group": None}
    schema.validate_metrics(pd.DataFrame([row]))
    grid = {"name": "g", "description": "d", "cost": "seconds", "base": {},
            "axes": {"seed": [0]}, "probes": {"toy": {}}}
    path = tmp_path / "g.json"
    path.write_text(json.dumps(grid))
    assert "toy" in load_grid(path).probes


@pytest.mark.parametrize("what, message", [
    ("metric", "metric 'toy_undeclared'"),
    ("table", "table 'toy_table'"),
])
def test_a_probe_naming_an_undeclared_entry_is_refused_before_training(registries, what,
                                                                        message) -> None:
    class Toy(ProbeBase):
        name = "toy"
        metrics: ClassVar = ("toy_undeclared",) if what == "metric" else ("elbo_qstar",)
        tables: ClassVar = ("toy_table",) if what == "table" else ()

    with pytest.raises(ValueError, match=message) as err:
        build_probes({"toy": {}}, CONFIG)
    assert "does not declare" in str(err.value) and "'toy'" in str(err.value)


def test_options_not_subclassing_the_base_options_get_a_clear_error(registries) -> None:
    class Toy(ProbeBase):
        name = "toy"

        @dataclass(frozen=True)
        class Options:  # forgot ProbeBase.Options (and with it, validate)
            scale: float = 1.0

    with pytest.raises(ValueError, match=r"Options must be a dataclass subclassing "
                                         r"ProbeBase\.Options"):
        build_probes({"toy": {}}, CONFIG)


def test_a_second_description_of_a_metric_is_a_clash(registries) -> None:
    with pytest.raises(contract.ContractError, match="already declared"):
        contract.declare_metric("elbo", "something else")
    contract.declare_metric("elbo", contract.METRICS["elbo"])  # the same again: nothing
    with pytest.raises(contract.ContractError, match="already declared"):
        contract.declare_table("gaps", ("epoch",))
    with pytest.raises(contract.ContractError, match="lower-case"):
        contract.declare_metric("Bad Name", "x")
    with pytest.raises(contract.ContractError, match="needs a description"):
        contract.declare_metric("toy_empty", " ")


def test_the_trainer_refuses_a_row_its_probe_does_not_declare(registries) -> None:
    class Liar(ProbeBase):
        name = "liar"
        metrics: ClassVar = {"liar_value": "declared (nats)"}

        def __call__(self, ctx) -> ProbeResult:
            return ProbeResult([{"split": "test", "metric": "elbo_qstar", "value": [0.0]}])

    (probe,) = build_probes({"liar": {}}, CONFIG)
    with pytest.raises(contract.ContractError, match="wrote metric 'elbo_qstar'"):
        Trainer([CONFIG]).fit([probe])


def test_probe_metrics_lists_every_probe_metric_with_its_description() -> None:
    out = probes.probe_metrics()
    assert set(out) == {m for cls in PROBES.values() for m in cls.metrics}
    assert set(out) | set(contract.TRAINER_METRICS) | set(contract.TABLE_ONLY_METRICS) == set(
        contract.METRICS)
    assert not set(out) & set(contract.TABLE_ONLY_METRICS)


def test_a_recorded_contract_round_trips_and_keeps_known_declarations(registries) -> None:
    contract.declare_metric("toy_value", "a toy measurement (nats)")
    contract.declare_table("toy_table", ("epoch", "x"))
    recorded = contract.record(["toy_value", "elbo", "toy_value"], ["toy_table"],
                               {"toy_est": {"none": 1, "mean": 2}})
    assert recorded == {"metrics": {"elbo": contract.METRICS["elbo"],
                                    "toy_value": "a toy measurement (nats)"},
                        "tables": {"toy_table": ["epoch", "x"]},
                        "estimators": {"toy_est": ["mean", "none"]}}
    json.dumps(recorded)  # it travels as JSON
    for live in (contract.METRICS, contract.TABLES):
        live.pop(f"toy_{'value' if live is contract.METRICS else 'table'}")
    revised = copy.deepcopy(recorded)
    revised["metrics"]["elbo"] = "an older description"
    assert contract.adopt(revised, "x.json") == revised
    assert contract.METRICS["toy_value"] == "a toy measurement (nats)"
    assert contract.METRICS["elbo"] != "an older description"  # the known one stays
    assert contract.TABLES["toy_table"] == ("epoch", "x")
    assert contract.ESTIMATORS["toy_est"] == ("mean", "none")
    with pytest.raises(contract.ContractError, match="not declared"):
        contract.record(["toy_nobody"])


@pytest.mark.parametrize("bad, message", [
    ([], "not an object"),
    ({"metrics": {"Bad Name": "x"}}, "lower-case"),
    ({"metrics": {"toy_m": " "}}, "has no description"),
    ({"tables": {"toy_t": "epoch"}}, "expected a list of names"),
    ({"estimators": {"toy_e": [1]}}, "expected a list of names"),
    ({"probes": {}}, "unknown key"),
])
def test_a_malformed_recorded_contract_is_refused_naming_the_file(registries, bad,
                                                                   message) -> None:
    before = dict(contract.METRICS)
    with pytest.raises(contract.ContractError, match=message) as err:
        contract.adopt(bad, "somewhere/contract.json")
    assert str(err.value).startswith("somewhere/contract.json:")
    assert contract.METRICS == before


def test_a_fresh_process_reads_metrics_declared_in_the_contract_beside_them(tmp_path) -> None:
    """A metric no module of this process declares is read once its experiment's
    contract.json declares it, and refused without it; a malformed one is a SchemaError."""
    row = dict.fromkeys(schema.METRIC_COLUMNS, "x") | {"metric": "toy_fresh", "value": 1.0,
                                                        "split": "test", "param_group": None}
    pd.DataFrame([row]).to_csv(tmp_path / "metrics.csv", index=False)
    code = ("import sys\nfrom experiments import schema\n"
            "try:\n    schema.read_metrics(sys.argv[1])\n"
            "except schema.SchemaError as err:\n    sys.exit(str(err))\n")
    read = [sys.executable, "-c", code, str(tmp_path / "metrics.csv")]
    out = subprocess.run(read, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and "unknown metric name(s) ['toy_fresh']" in out.stderr
    (tmp_path / schema.CONTRACT_FILE).write_text(json.dumps(
        {"metrics": {"toy_fresh": "a measurement (nats)"}}))
    subprocess.run(read, cwd=ROOT, check=True)
    (tmp_path / schema.CONTRACT_FILE).write_text('{"metrics": []}')
    out = subprocess.run(read, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and "contract.json: the recorded contract is malformed" \
        in out.stderr
