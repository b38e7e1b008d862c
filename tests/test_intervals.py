"""The intervals cover the true value at about the nominal rate on synthetic data, and pair what they should."""
import numpy as np
import pytest

from intervals import as_arrays, bootstrap, outcome_string, paired_bootstrap, wilson


def test_wilson_against_a_worked_value():
    # k = 30 of n = 130 (an ASR of 23.1%): Wilson's formula by hand, z = 1.96
    lo, hi = wilson(30, 130)
    assert (round(lo, 4), round(hi, 4)) == (0.1667, 0.3103)  # centre 0.2455, half-width 0.0739, over 1.0296
    assert wilson(0, 50)[0] == 0.0 and wilson(50, 50)[1] == 1.0 and wilson(0, 50)[1] > 0.05  # no hits is not certainty
    assert wilson(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.6])
def test_wilson_covers_at_the_nominal_rate(p):
    rng = np.random.default_rng(1)
    k = rng.binomial(300, p, 4000)
    cover = np.mean([lo <= p <= hi for lo, hi in (wilson(int(x), 300) for x in k)])
    assert 0.93 <= cover <= 0.97, cover


def test_prompt_bootstrap_covers_at_the_nominal_rate():
    rng = np.random.default_rng(2)
    p, hits = 0.2, 0
    for t in range(300):
        run = [rng.random(300) < p]
        _, lo, hi = bootstrap([run], n_boot=500, seed=t)
        hits += lo <= p <= hi
    assert 0.91 <= hits / 300 <= 0.98, hits / 300


def test_hierarchical_bootstrap_covers_the_mean_over_seeds():
    """Seeds that truly differ (a seed effect of sd 0.05 around 0.3): with 3 seeds the interval undercovers; with
    10 it is near nominal. The figures are in the README."""
    rng = np.random.default_rng(3)

    def coverage(k, trials=200):
        hits = 0
        for t in range(trials):
            runs = [[rng.random(300) < p] for p in np.clip(0.3 + 0.05 * rng.standard_normal(k), 0, 1)]
            _, lo, hi = bootstrap(runs, n_boot=400, seed=t)
            hits += lo <= 0.3 <= hi
        return hits / trials

    three, ten = coverage(3), coverage(10)
    assert 0.6 <= three <= 0.92, three
    assert 0.85 <= ten <= 0.99, ten
    assert ten > three


def test_the_seed_level_widens_the_interval():
    rng = np.random.default_rng(4)
    same = [[rng.random(300) < 0.3] for _ in range(3)]
    apart = [[rng.random(300) < p] for p in (0.1, 0.3, 0.5)]
    w = lambda runs: np.subtract(*bootstrap(runs, seed=0)[:0:-1])
    assert w(apart) > 2 * w(same)


def test_pairing_cancels_what_the_prompts_share():
    """Two methods that differ on 10 of 300 prompts and agree on the rest: unpaired intervals overlap, the paired
    difference is sure of its sign."""
    rng = np.random.default_rng(5)
    base = rng.random(300) < 0.4
    better = base.copy()
    better[np.flatnonzero(base)[:10]] = False
    m, lo, hi = paired_bootstrap([[better]], [[base]])
    assert m == pytest.approx(-10 / 300) and hi < 0
    a, b = bootstrap([[better]]), bootstrap([[base]])
    assert a[2] > b[1]  # unpaired, they overlap


def test_paired_difference_covers_zero_when_methods_are_alike():
    rng = np.random.default_rng(6)
    hits = 0
    for t in range(200):
        a = [[rng.random(200) < 0.3] for _ in range(1)]
        b = [[rng.random(200) < 0.3] for _ in range(1)]
        _, lo, hi = paired_bootstrap(a, b, n_boot=400, seed=t)
        hits += lo <= 0 <= hi
    assert 0.9 <= hits / 200 <= 0.99, hits / 200


def test_groups_are_averaged_not_pooled():
    """Task accuracy over two tasks is the mean of the two accuracies, as results.json reports it."""
    run = [np.ones(10), np.zeros(100)]
    assert bootstrap([run])[0] == pytest.approx(0.5)


def test_outcome_strings_round_trip_and_pairs_must_match():
    s = outcome_string([True, False, True])
    assert s == "101" and list(as_arrays([s])[0]) == [1, 0, 1]
    with pytest.raises(ValueError, match="different prompts"):
        paired_bootstrap([[np.ones(3)]], [[np.ones(4)]])


def test_no_hits_in_any_run_is_not_certainty():
    """A percentile bootstrap of all-zero outcomes is [0, 0]; the interval keeps the pooled prompts' Wilson width."""
    runs = [[np.zeros(114)] for _ in range(3)]
    m, lo, hi = bootstrap(runs)
    assert (m, lo) == (0.0, 0.0) and hi == pytest.approx(wilson(0, 342)[1]) and hi > 0.005
    m, lo, hi = bootstrap([[np.ones(200)]])
    assert hi == 1.0 and lo == pytest.approx(wilson(200, 200)[0]) and lo < 0.99
