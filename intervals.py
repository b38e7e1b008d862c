"""95% intervals for the experiment's numbers: every one of them is a share of prompts (ASR, over-refusal, accuracy).

- One run: the Wilson score interval of k successes in n (wilson), which keeps its coverage near 0 and 1, where
  ASR and over-refusal live, unlike the normal approximation.
- A sweep: each run keeps its per-prompt outcomes (results.json "outcomes": a string of 0/1 per group of prompts;
  task accuracy has one group per task and is the mean of the groups' shares). A method's interval is a
  hierarchical bootstrap (bootstrap): resample the seeds, then the prompts within each drawn seed's run, and take
  the 2.5 and 97.5 percentiles of the resampled means, widened where needed to the Wilson interval of all the runs'
  prompts pooled (a percentile bootstrap of 0 hits in every run is [0, 0]: no hits is not certainty). Its difference from SFT is paired (paired_bootstrap): the
  same drawn seeds and the same drawn prompts for both methods, which cancels what the prompts and seeds share.

With three seeds the seed level has only ten distinct resamples: when seeds truly differ, the interval is
narrower than it should be (tests/test_intervals.py measures the coverage; README "How sure the numbers are").
"""
import math

import numpy as np

Z = 1.959963984540054  # the normal's 97.5% quantile


def wilson(k: int, n: int, z: float = Z) -> tuple[float, float]:
    """The Wilson score interval for a share k/n; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)
    return 0.0 if k == 0 else max(0.0, lo), 1.0 if k == n else min(1.0, hi)  # exact at the ends, not 1e-17 off


def outcome_string(flags) -> str:
    """[True, False, ...] -> "10...": how results.json keeps one run's per-prompt outcomes."""
    return "".join("1" if f else "0" for f in flags)


def as_arrays(groups) -> list[np.ndarray]:
    """One run's outcome strings (one per group of prompts) -> arrays of 0/1."""
    return [np.frombuffer(g.encode(), dtype=np.uint8) - ord("0") for g in groups]


def _value(groups, idx=None):
    """A run's number: the mean over its groups of each group's share (resampled at idx[g] when given)."""
    return np.mean([g[i].mean(-1) if i is not None else g.mean() for g, i in zip(groups, idx or [None] * len(groups))], 0)


def _resampled(runs, value, n_boot, seed):
    """n_boot hierarchical resamples of the mean of value(run, idx) over runs: seeds drawn with replacement, then
    prompt indices idx (one array per group, shared by everything in the run's tuple) within each drawn run."""
    rng = np.random.default_rng(seed)
    k = len(runs)
    draws = rng.integers(0, k, (n_boot, k)) if k > 1 else np.zeros((n_boot, 1), dtype=int)
    sums = np.zeros(n_boot)
    for slot in range(k):
        for r, run in enumerate(runs):
            rows = np.flatnonzero(draws[:, slot] == r)
            if len(rows):
                sums[rows] += value(run, [rng.integers(0, len(g), (len(rows), len(g))) for g in run[0]])
    return sums / k


def _floats(groups):
    return [np.asarray(g, dtype=np.float64) for g in groups]


def _pooled_wilson(runs):
    """The Wilson interval of every run's prompts pooled, per group, averaged over groups: only the prompts' noise,
    so a floor under the bootstrap's width, which collapses where every outcome is the same."""
    bounds = [wilson(int(sum(run[g].sum() for run in runs)), sum(len(run[g]) for run in runs))
              for g in range(len(runs[0]))]
    return float(np.mean([b[0] for b in bounds])), float(np.mean([b[1] for b in bounds]))


def bootstrap(runs, n_boot=2000, seed=0) -> tuple[float, float, float]:
    """(mean, low, high) over runs (one per seed, each a list of 0/1 arrays, one per group): seeds resampled, then
    prompts within each drawn run (one run: the prompt bootstrap alone); never narrower than the pooled Wilson."""
    runs = [_floats(groups) for groups in runs]
    means = _resampled([(run,) for run in runs], lambda run, idx: _value(run[0], idx), n_boot, seed)
    lo, hi = _pooled_wilson(runs)
    return (float(np.mean([_value(run) for run in runs])), min(lo, float(np.percentile(means, 2.5))),
            max(hi, float(np.percentile(means, 97.5))))


def paired_bootstrap(runs_a, runs_b, n_boot=2000, seed=0) -> tuple[float, float, float]:
    """(mean, low, high) of a - b, where runs_a[i] and runs_b[i] share seed i and its prompts: the same seeds and
    the same prompt indices are drawn for both."""
    runs = [(_floats(a), _floats(b)) for a, b in zip(runs_a, runs_b)]
    for a, b in runs:
        if [len(g) for g in a] != [len(g) for g in b]:
            raise ValueError("paired_bootstrap: the two runs of a seed were evaluated on different prompts")
    diffs = _resampled(runs, lambda run, idx: _value(run[0], idx) - _value(run[1], idx), n_boot, seed)
    mean = float(np.mean([_value(a) - _value(b) for a, b in runs]))
    return mean, float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def run_interval(groups) -> tuple[float, float]:
    """One run's 95% interval from its outcome strings: Wilson for one group, the prompt bootstrap for a mean of several."""
    arrays = as_arrays(groups)
    if len(arrays) == 1:
        return wilson(int(arrays[0].sum()), len(arrays[0]))
    return bootstrap([arrays])[1:]
