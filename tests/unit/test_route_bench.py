"""The routing metric on hand-computable cases, the loader, and the shipped router's contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from frugalstream.classifier.router import DEFAULT_PATH, DIM, EscalationRouter
from frugalstream.tools.evals import route_eval as rb

# 10 prompts: weak right on 6 (0-5), strong right on 8 (0-3, 6-9); rows 6-9 gain +1, rows 4-5 lose.
WEAK = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
STRONG = [1, 1, 1, 1, 0, 0, 1, 1, 1, 1]
ROWS = [(f"q{i}", bool(w), bool(s)) for i, (w, s) in enumerate(zip(WEAK, STRONG, strict=True))]


def test_oracle_reaches_95_at_minimal_share() -> None:
    # acc_weak 0.6, acc_strong 0.8, target 0.76: two of the four gain rows are enough -> k = 2
    oracle = np.array([1, 1, 1, 1, 0, 0, 5, 5, 5, 5], float)
    r = rb.run_route_bench(ROWS, oracle)
    assert r["n"] == 10
    assert r["acc_weak"] == pytest.approx(0.6) and r["acc_strong"] == pytest.approx(0.8)
    assert r["strong_share_at_95"] == pytest.approx(0.2)
    assert r["cost_reduction_at_95"] == pytest.approx(0.8)
    assert r["oracle_strong_share_at_95"] == pytest.approx(0.2)
    # PGR = 0, .5, 1, 1.5, 2, 2, 2, 2, 2, 1.5, 1 at shares 0, .1 .. 1 -> trapezoid area 1.5
    assert r["apgr"] == pytest.approx(1.5)


def test_worst_router_needs_everything() -> None:
    worst = np.array([0, 0, 0, 0, 9, 9, 0, 0, 0, 0], float)  # losers first, then ties
    r = rb.run_route_bench(ROWS, worst)
    assert r["strong_share_at_95"] == pytest.approx(1.0)
    assert r["cost_reduction_at_95"] == pytest.approx(0.0)
    assert r["apgr"] < 0.5


def test_random_expectation_is_the_straight_line() -> None:
    r = rb.run_route_bench(ROWS, np.zeros(10))
    # expected acc(k) = 0.6 + 0.02 k >= 0.76 first at k = 8
    assert r["random_strong_share_at_95"] == pytest.approx(0.8)
    assert r["random_apgr"] == pytest.approx(0.5)
    # all-tied scores carry no information: they bench exactly like the expected random router
    assert r["apgr"] == pytest.approx(0.5)
    assert r["strong_share_at_95"] == pytest.approx(0.8)
    assert 0.3 < r["random_sim_apgr"] < 0.7


def test_random_simulation_matches_expectation_on_larger_data() -> None:
    rng = np.random.default_rng(1)
    w, s = rng.random(2000) < 0.65, rng.random(2000) < 0.85
    rows = [(str(i), bool(a), bool(b)) for i, (a, b) in enumerate(zip(w, s, strict=True))]
    r = rb.run_route_bench(rows, rng.random(2000), seed=3)
    assert r["random_sim_apgr"] == pytest.approx(0.5, abs=0.03)
    assert r["random_sim_strong_share_at_95"] == pytest.approx(r["random_strong_share_at_95"], abs=0.05)
    assert r["apgr"] == pytest.approx(0.5, abs=0.1)


def test_ties_do_not_depend_on_row_order() -> None:
    scores = np.array([1, 1, 1, 1, 0, 0, 1, 1, 1, 1], float)
    a = rb.run_route_bench(ROWS, scores)
    b = rb.run_route_bench(ROWS[::-1], scores[::-1])
    assert a["apgr"] == pytest.approx(b["apgr"])
    assert a["strong_share_at_95"] == pytest.approx(b["strong_share_at_95"])


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError):
        rb.run_route_bench(ROWS, np.zeros(3))
    with pytest.raises(ValueError):
        rb.run_route_bench(ROWS, np.full(10, np.nan))


def test_loader_excludes_contaminated(tmp_path: Path) -> None:
    csv_path = tmp_path / "mmlu_responses.csv"
    csv_path.write_text('prompt,W,S\n"What is 2+2?\nA. 4",True,True\nleaked question,False,True\nhard one,0,1\n')
    (tmp_path / "mmlu_contaminated_prompts.jsonl").write_text(
        json.dumps({"train_prompt": "x", "eval_prompt": "leaked question  "}) + "\n"
    )
    (tmp_path / "gsm8k_contaminated_prompts.jsonl").write_text(json.dumps({"eval_prompt": "hard one"}) + "\n")
    files = rb.find_contaminated_files(csv_path)
    assert [f.name for f in files] == ["mmlu_contaminated_prompts.jsonl"]
    rows = rb.load_route_csv(csv_path, "prompt", "W", "S", rb.load_contaminated(files))
    assert rows == [("What is 2+2?\nA. 4", True, True), ("hard one", False, True)]
    with pytest.raises(KeyError):
        rb.load_route_csv(csv_path, "prompt", "nope", "S", set())


def test_heldout_mask_is_a_stable_half() -> None:
    prompts = [f"prompt number {i}" for i in range(4000)]
    m = rb.heldout_mask(prompts)
    assert 0.45 < m.mean() < 0.55
    assert np.array_equal(m, rb.heldout_mask(prompts))
    assert rb.heldout_mask(["  same text "])[0] == rb.heldout_mask(["same text"])[0]


@pytest.mark.skipif(not DEFAULT_PATH.exists(), reason="router artifact not built")
def test_router_loads_and_scores_in_range() -> None:
    router = EscalationRouter.load()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    texts = [f"Tom has {i} apples and buys {i + 3} more. How many now?" for i in range(7)]
    s = router.score(x, texts)
    assert s.shape == (7,) and s.dtype == np.float32
    assert np.all((s >= 0) & (s <= 1))
    assert router.score(x[0], texts[:1]).shape == (1,)
    with pytest.raises(ValueError):
        router.score(np.zeros((2, 10), np.float32), texts[:2])
    with pytest.raises(ValueError):
        router.score(x, texts[:3])
    assert DEFAULT_PATH.stat().st_size < 10_000_000


@pytest.mark.skipif(not DEFAULT_PATH.exists(), reason="router artifact not built")
def test_half_variant_never_saw_heldout_rows() -> None:
    full = EscalationRouter.load()
    half = EscalationRouter.load(exclude_heldout=True)
    assert half.variant == "half" and len(half.train_hashes) < len(full.train_hashes)
    # every hash the half variant trained on lies outside the held-out half (low bit 0)
    assert not np.any(half.train_hashes & np.uint64(1))
    assert not half.seen(["a prompt nobody trained on"]).any()
