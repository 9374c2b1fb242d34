"""Step-size selection (``experiments.selection``): the median over seeds decides, unstable and
unconverged candidates lose to stable converged ones, an optimum at an edge extends the search,
and shared choices name their source. Pure pandas: synthetic ``runs.csv`` tables, no training."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest

from experiments import selection as sel

SELECT = {"metric": "elbo", "split": "validation", "unstable_gap": 20.0, "extend_factor": 3.0,
          "max_extensions": 2,
          "candidates": {"amortized": {"lr": 0.003, "encoder_lr": 0.003},
                         "vem": {"digits": {"lr": 0.001, "local_lr": 0.1}}}}


def runs(cells: list[tuple[float, float, list[float | None]]], *, method: str = "amortized",
         inference: str = "encoder_lr", capped: set[tuple[float, float, int]] = frozenset(),
         rnd: int = 0) -> pd.DataFrame:
    """A runs.csv: one row per (lr, inference step size, seed); a score None is a diverged seed."""
    rows = []
    for lr, other, scores in cells:
        for seed, score in enumerate(scores):
            rows.append({"dataset": "digits", "method": method, "estimator": "reparam",
                         "baseline": "none", "seed": seed,
                         "status": "diverged" if score is None else "ok",
                         "stop_reason": "max_epochs" if (lr, other, seed) in capped else "plateau",
                         "method.lr": lr, f"method.{inference}": other,
                         "final_elbo_validation": math.nan if score is None else score,
                         "selection_round": rnd})
    return pd.DataFrame(rows)


CROSS = [(0.003, 0.003, [50.0, 51.0, 52.0]), (0.001, 0.003, [49.0, 48.0, 50.0]),
         (0.009, 0.003, [47.0, 46.0, 45.0]), (0.003, 0.001, [48.0, 49.0, 47.0]),
         (0.003, 0.009, [46.0, 47.0, 48.0])]


def test_the_cross_around_a_centre_and_per_dataset_centres() -> None:
    cands = sel.initial_candidates(SELECT, "amortized")
    assert cands[0] == {"lr": 0.003, "encoder_lr": 0.003}
    assert {(c["lr"], c["encoder_lr"]) for c in cands} == {
        (0.003, 0.003), (0.001, 0.003), (0.009, 0.003), (0.003, 0.001), (0.003, 0.009)}
    assert sel.initial_candidates(SELECT, "vem", "digits")[0] == {"lr": 0.001, "local_lr": 0.1}
    with pytest.raises(ValueError, match="no centre for dataset 'ppca'"):
        sel.initial_candidates(SELECT, "vem", "ppca")


def test_per_estimator_centres_within_a_data_set() -> None:
    select = {"candidates": {"vem": {"digits": {
        "reparam+none": {"lr": 0.000333, "local_lr": 0.1},
        "score+loo": {"lr": 0.001, "local_lr": 0.3}}}}}
    sel.check_select(select)
    sel.check_candidates(select, {"vem": ("lr", "local_lr")})
    assert sel.initial_candidates(select, "vem", "digits", "reparam+none")[0] == {
        "lr": 0.000333, "local_lr": 0.1}
    assert {(c["lr"], c["local_lr"]) for c in sel.initial_candidates(
        select, "vem", "digits", "score+loo")} == {
        (0.001, 0.3), (0.000333, 0.3), (0.003, 0.3), (0.001, 0.1), (0.001, 0.9)}
    assert {c["lr"] for c in sel.initial_candidates(select, "vem", "digits", "reparam+none")
            } == {0.000333, 0.000111, 0.001}  # 0.000333 · 3 meets 0.001, not 0.000999
    missing = "vem.digits has no centre for estimator 'stl+none'"
    with pytest.raises(ValueError, match=re.escape(missing)):
        sel.initial_candidates(select, "vem", "digits", "stl+none")
    bad = {"candidates": {"vem": {"digits": {"reparam+none": {"lr": 0.001}}}}}
    with pytest.raises(ValueError, match=re.escape("reparam+none: no centre for local_lr")):
        sel.check_candidates(bad, {"vem": ("lr", "local_lr")})


def test_an_interior_median_optimum_is_chosen_and_nothing_extends() -> None:
    table = sel.candidate_table(runs(CROSS), SELECT)
    best = table[table["rank"] == 1].iloc[0]
    assert (best["method.lr"], best["method.encoder_lr"]) == (0.003, 0.003)
    assert best["score"] == 51.0  # the median, not the mean
    chosen = sel.choose(table, SELECT).iloc[0]
    assert bool(chosen["interior"]) and chosen["edge"] == "" and not bool(chosen["at_cap"])
    assert sel.extensions(table, SELECT) == {}


def test_a_catastrophic_seed_does_not_decide_but_makes_the_candidate_unstable() -> None:
    cells = [*CROSS[1:], (0.003, 0.003, [60.0, 61.0, -300.0])]  # best median, one seed far below
    table = sel.candidate_table(runs(cells), SELECT)
    row = table[(table["method.lr"] == 0.003) & (table["method.encoder_lr"] == 0.003)].iloc[0]
    assert row["score"] == 60.0 and bool(row["unstable"])
    best = table[table["rank"] == 1].iloc[0]  # the stable runner-up is chosen
    assert (best["method.lr"], best["method.encoder_lr"]) == (0.001, 0.003)
    assert not bool(best["unstable"])


def test_a_diverged_seed_makes_a_candidate_unstable() -> None:
    cells = [*CROSS[1:], (0.003, 0.003, [70.0, None, 71.0])]
    table = sel.candidate_table(runs(cells), SELECT)
    row = table[(table["method.lr"] == 0.003) & (table["method.encoder_lr"] == 0.003)].iloc[0]
    assert row["n_diverged"] == 1 and bool(row["unstable"]) and row["rank"] > 1


def test_unconverged_candidates_lose_to_converged_ones() -> None:
    cells = [*CROSS[1:], (0.003, 0.003, [70.0, 71.0, 72.0])]
    table = sel.candidate_table(runs(cells, capped={(0.003, 0.003, 1)}), SELECT)
    row = table[(table["method.lr"] == 0.003) & (table["method.encoder_lr"] == 0.003)].iloc[0]
    assert bool(row["unconverged"]) and not bool(row["unstable"]) and row["rank"] > 1
    best = table[table["rank"] == 1].iloc[0]
    assert not bool(best["unconverged"])


def test_a_binding_epoch_cap_is_counted_and_shown_in_the_choice() -> None:
    capped = {(0.003, 0.003, 0), (0.003, 0.003, 2), (0.009, 0.003, 1)}
    table = sel.candidate_table(runs(CROSS, capped=capped), SELECT)
    n = {(r["method.lr"], r["method.encoder_lr"]): r["n_capped"] for _, r in table.iterrows()}
    assert n[(0.003, 0.003)] == 2 and n[(0.009, 0.003)] == 1 and n[(0.001, 0.003)] == 0
    chosen = sel.choose(table, SELECT).iloc[0]  # the centre loses: its seeds hit the cap
    assert (chosen["method.lr"], chosen["method.encoder_lr"]) == (0.001, 0.003)
    assert chosen["capped_candidates"] == 2 and not bool(chosen["cap_binds"])
    only_capped = sel.candidate_table(
        runs(CROSS, capped={(lr, o, k) for lr, o, _ in CROSS for k in range(3)}), SELECT)
    chosen = sel.choose(only_capped, SELECT).iloc[0]  # nothing converged: the cap chose
    assert bool(chosen["cap_binds"]) and chosen["n_capped"] == 3
    assert chosen["capped_candidates"] == len(CROSS)


def test_a_data_set_searched_in_its_own_right_keeps_its_choice_beside_shared_ones() -> None:
    mnist = runs([(lr, o, [v + 100.0 for v in sc]) for lr, o, sc in CROSS[1:]]
                 + [(0.003, 0.003, [10.0] * 3)]).assign(dataset="mnist5k")
    select = {**SELECT, "share": [
        {"from": {"estimator": "reparam", "baseline": "none"},
         "to": {"estimator": "stl", "baseline": "none"}},
        {"from": {"dataset": "digits"}, "to": {"dataset": "mnist5k"}}]}
    both = pd.concat([runs(CROSS), mnist], ignore_index=True)
    chosen = sel.choose(sel.candidate_table(both, select), select).set_index(
        ["dataset", "estimator"])
    assert bool(chosen.loc[("mnist5k", "reparam"), "searched"])
    assert chosen.loc[("mnist5k", "reparam"), "shared_from"] == ""
    assert chosen.loc[("mnist5k", "reparam"), "method.lr"] == 0.001  # its own optimum
    assert chosen.loc[("digits", "reparam"), "method.lr"] == 0.003
    stl = chosen.loc[("mnist5k", "stl")]  # shared within mnist5k, not from digits
    assert not bool(stl["searched"]) and stl["shared_from"] == "amortized/reparam+none"
    assert stl["method.lr"] == 0.001


def test_an_optimum_at_an_edge_extends_that_step_size_and_is_flagged() -> None:
    cells = [(0.003, 0.003, [50.0] * 3), (0.001, 0.003, [55.0] * 3),  # best at the low lr edge
             (0.009, 0.003, [45.0] * 3), (0.003, 0.001, [48.0] * 3), (0.003, 0.009, [47.0] * 3)]
    table = sel.candidate_table(runs(cells), SELECT)
    chosen = sel.choose(table, SELECT).iloc[0]
    assert not bool(chosen["interior"]) and "lr:low" in chosen["edge"]
    assert "encoder_lr" in chosen["edge"]  # no other encoder step size tried at lr 0.001
    grow = sel.extensions(table, SELECT)
    new = grow[("digits", "amortized", "reparam", "none")]
    assert {"lr": 0.000333, "encoder_lr": 0.003} in new  # the lr moved x1/3 past the edge
    assert {"lr": 0.001, "encoder_lr": 0.001} in new and {"lr": 0.001, "encoder_lr": 0.009} in new


def test_the_extension_stops_at_the_cap_and_the_choice_says_so() -> None:
    cells = [(0.003, 0.003, [50.0] * 3), (0.001, 0.003, [55.0] * 3), (0.009, 0.003, [45.0] * 3),
             (0.003, 0.001, [48.0] * 3), (0.003, 0.009, [47.0] * 3)]
    table = sel.candidate_table(runs(cells, rnd=2), SELECT)  # already two extension rounds
    assert sel.extensions(table, SELECT) == {}
    assert bool(sel.choose(table, SELECT).iloc[0]["at_cap"])


def test_shared_choices_name_their_source() -> None:
    select = {**SELECT, "share": [
        {"from": {"estimator": "reparam", "baseline": "none"},
         "to": {"estimator": "stl", "baseline": "none"}},
        {"from": {"method": "amortized"}, "to": {"method": "semi_amortized"}}]}
    chosen = sel.choose(sel.candidate_table(runs(CROSS), select), select)
    keys = {(r["method"], r["estimator"]): r["shared_from"] for _, r in chosen.iterrows()}
    assert keys[("amortized", "reparam")] == ""
    assert keys[("amortized", "stl")] == "amortized/reparam+none"
    assert keys[("semi_amortized", "reparam")] == "amortized/reparam+none"
    assert keys[("semi_amortized", "stl")] == "amortized/reparam+none"  # two hops, first source
    assert (chosen["method.lr"] == 0.003).all()


def test_a_choice_shared_with_another_data_set_names_the_data_set_it_was_made_on() -> None:
    select = {**SELECT, "share": [
        {"from": {"estimator": "reparam", "baseline": "none"},
         "to": {"estimator": "stl", "baseline": "none"}},
        {"from": {"dataset": "digits"}, "to": {"dataset": "mnist5k"}}]}
    chosen = sel.choose(sel.candidate_table(runs(CROSS), select), select)
    source = {(r["dataset"], r["estimator"]): r["shared_from"] for _, r in chosen.iterrows()}
    assert source[("digits", "stl")] == "amortized/reparam+none"
    assert source[("mnist5k", "reparam")] == "digits:amortized/reparam+none"
    assert source[("mnist5k", "stl")] == "digits:amortized/reparam+none"


@pytest.mark.parametrize("bad", [
    {"candidates": {}},
    {"candidates": {"vem": {"lr": -1.0}}},
    {"candidates": {"vem": {"digits": {"lr": 0.1, "local_lr": 0.1}, "ppca": {"lr": 0.1}}}},
    {"candidates": {"vem": {"lr": 0.1}}, "extend_factor": 1.0},
    {"candidates": {"vem": {"lr": 0.1}}, "max_extensions": 11},
    {"candidates": {"vem": {"lr": 0.1}}, "share": [{"from": {"method": "vem"}}]},
    {"candidates": {"vem": {"lr": 0.1}}, "surprise": 1},
])
def test_malformed_select_blocks_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        sel.check_select(bad)


def test_the_candidates_name_exactly_each_methods_step_sizes_from_its_traits() -> None:
    """The axes a selection searches are the methods' ``step_sizes`` traits (one list): a centre
    missing one of a method's step sizes, naming one it does not use, or naming an unknown
    method is refused, and the real grid passes."""
    import json

    from experiments.grids import GRID_DIR
    from vi.inference import METHODS

    traits = {name: cls.step_sizes for name, cls in METHODS.items()}
    sel.check_candidates(SELECT, traits)
    real = json.loads((GRID_DIR / "lr_selection.json").read_text())["select"]
    sel.check_candidates(real, traits)
    semi = {"candidates": {"semi_amortized": {"digits": {"lr": 0.001, "refine_lr": 0.03}}}}
    with pytest.raises(ValueError, match=r"semi_amortized\.digits: no centre for encoder_lr "
                                         r"\(semi_amortized's step sizes, from its traits: "
                                         r"lr, encoder_lr, refine_lr\)"):
        sel.check_candidates(semi, traits)
    with pytest.raises(ValueError, match="'momentum' not a step size of vem"):
        sel.check_candidates({"candidates": {"vem": {"lr": 0.1, "local_lr": 0.1,
                                                     "momentum": 0.9}}}, traits)
    with pytest.raises(ValueError, match="unknown method 'vme'"):
        sel.check_candidates({"candidates": {"vme": {"lr": 0.1}}}, traits)
    assert sel.step_size_columns(real) == ["method.lr", "method.local_lr", "method.encoder_lr",
                                           "method.refine_lr"]
