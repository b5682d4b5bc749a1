"""How the always-valid sequential test behaves when a rollout controller peeks at it.

    cd /work/main && .venv/bin/python -m bench.abtest [--json] [--experiments N] [--smoke]
                                                      [--skip-correlated] [--pre-period X]
                                                      [--variants NAME,NAME]

Simulates A/B experiments on a 10% baseline conversion rate, with no Ray: per-look counts from
a seeded numpy Generator, run through `app.rollout.abtest.SequentialTest.evaluate_paths` (the
kernel `evaluate` uses) with a look every 500 samples per arm. Six scenarios, each
`--experiments` experiments (default 2,000; --smoke 30):

* A/A: both arms at 10%. Every 'better' is a false promotion.
* lift: the candidate at 10.3% (+3% relative). 'better' is a detection.
* drop: the candidate at 9.7% (-3% relative). 'worse' stops the rollout.

  Each outcome comes from another user (keyless traffic: each request is its own unit), so
  outcomes are independent. About 3 s.

* correlated A/A, lift, drop: the same questions when users come back. Each arm has 20,000
  users; a user's share of the traffic is exponential (a few heavy users) and their own click
  rate is Beta(1, 9) (mean 10%, sd 9%), times 1.03 or 0.97 on a lifted or dropped candidate.
  At the cap a user has 16 outcomes on average (up to a few hundred), and outcomes of one user
  are correlated through their rate. Outcomes arrive as Poisson streams (500 per look per arm
  on average) and are summed per unit cluster exactly as the feedback book does
  (`UNIT_CLUSTERS` clusters of whole users, `UnitMoments`), so the test sees what it sees in
  production. The same data are also judged as if every outcome were independent (the test
  before it took units into account): `outcomes_as_independent`. CUPED: each user also sent
  outcomes to the stable version in a pre-period `--pre-period` times as long as the
  experiment at the cap (default 1: 16 outcomes per user on average; 0: no CUPED), at the
  same activity and their own rate; the same data are judged with each cluster's
  pre-period sums as the covariate (`cuped`). 1 to 4 minutes per scenario; `--skip-correlated`
  leaves them out.

Tests (`variant_tests`), each run on the same data, each fixed before any data:
* shared (today's default; the top-level keys): alpha 0.05 two-sided, tau = mde = 3%;
* separate_tau_mde: a one-sided test per direction, alpha 0.05 each, tau = mde;
* separate: the same with tau = horizon_tau(...) = 1.95%, the tau whose boundary is lowest at
  the cap (computed from the baseline and the cap alone);
* separate_stop_10: separate, with a false stop allowed 10% of the time (a false promotion
  still 5%);
* horizon_shared, horizon_separate, horizon_separate_stop_10: the same three error
  allocations (alpha 5% two-sided; 5% per direction; 5% promote and 10% stop) with boundary
  horizon, horizon_samples_per_arm = the cap: valid for any number of looks up to the cap,
  the test ends there; horizon_separate_promote_2_5: a promotion at 2.5%, a stop at 5%
  (added after the first horizon runs, see docs/benchmarks.md).
`--variants name,name` runs a subset (`shared` always runs: the top-level keys are its).
Relative lift, min_samples_per_arm 1000; the decision is the always-valid interval against 0
(`Verdict.decision`, i.e. `improvement(0)` and `non_inferiority(0)`), taken at the first look
that decides.

The cap, max_samples per arm: twice the fixed-horizon sample size for +3% at alpha 0.05 and
80% power (`required_sample_size(0.10, 0.03)` = 159,066), rounded up to a whole look: 318,500.
A sequential test never ends on its own when there is no effect, so some cap is needed. The
mSPRT pays for peeking with a higher boundary (about z = 3.0 at best, against 1.96 for one
look), so it needs about twice the fixed sample to reach the planned 80% power; a cap of 2x
lets the lift and drop scenarios show that power, and gives the A/A scenario the same number
of looks (637) a real rollout would take.

For contrast, the A/A data are also judged by a fixed-horizon 95% Wald interval checked at
every look (`naive_peeking_false_promotion_rate`): the mistake the sequential test prevents.

Prints one JSON object (stdout): aa_false_promotion_rate, lift_detection_rate,
drop_stop_rate, median_samples_to_decision (the shared test), `variants` (every test's rates
with Monte-Carlo standard errors), `correlated` (the same for the correlated-users
scenarios, with `variants.<test>.per_unit` and `.cuped`), and the details and parameters
listed in docs/benchmarks.md; without --json, one JSON line per scenario comes first. Exit
status 0.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np

from app.rollout.abtest import OutcomeKind, SequentialTest, horizon_tau, required_sample_size
from app.rollout.abtest.arms import _design_effect
from app.rollout.abtest.sequential import COVARIATE_MOMENTS, _cuped
from app.rollout.feedback import UNIT_CLUSTERS
from bench.common import bench_parser, log, machine

BASELINE = 0.10
MDE = 0.03  # relative
ALPHA = 0.05
PEEK_EVERY = 500
MIN_SAMPLES = 1000
SCENARIOS = {"aa": BASELINE, "lift": BASELINE * (1 + MDE), "drop": BASELINE * (1 - MDE)}
Z95 = 1.959963984540054
# The correlated-users scenarios: users per arm, the gamma shape of a user's share of the
# traffic (1: exponential), and the Beta(a, b) of a user's own click rate (mean a / (a + b)).
USERS_PER_ARM = 20_000
ACTIVITY_SHAPE = 1.0
RATE_BETA = (1.0, 9.0)
CORRELATED = {"correlated_aa": 0.0, "correlated_lift": MDE, "correlated_drop": -MDE}
STOP_ALPHA = 0.10  # the separate_stop_10 variant's chance of a false stop
# horizon_separate_promote_2_5: a false promotion at the shared test's 2.5% a side, a false
# stop at 5% (its lower bound is horizon_shared's, its upper one horizon_separate's)
PROMOTE_ALPHA = 0.025


def max_samples_per_arm() -> int:
    """Twice the fixed-horizon sample size, rounded up to a whole look."""
    planned = 2 * required_sample_size(BASELINE, MDE, alpha=ALPHA, power=0.8)
    return math.ceil(planned / PEEK_EVERY) * PEEK_EVERY


def binary_paths(rng, p_candidate, p_control, experiments, peek_every, max_samples):
    """Cumulative (n, sum, sum_sq) per arm at every look, shape (experiments, looks), for
    binary outcomes with true rates p_candidate and p_control."""
    looks = max_samples // peek_every
    n = np.broadcast_to(np.arange(1, looks + 1) * float(peek_every), (experiments, looks))
    arms = []
    for p in (p_candidate, p_control):
        s = np.cumsum(rng.binomial(peek_every, p, (experiments, looks)), axis=1).astype(float)
        arms.append((n, s, s))
    return arms[0], arms[1]


def correlated_paths(
    rng: np.random.Generator,
    lift: float,
    experiments: int,
    peek_every: int,
    looks: int,
    users: int = USERS_PER_ARM,
    clusters: int = UNIT_CLUSTERS,
    chunk: int = 250,
) -> tuple[np.ndarray, ...]:
    """One arm of the correlated-users scenario: cumulative (n, sum, sum_sq, units,
    unit_sum_sq, unit_cross, unit_n_sq) at every look, shape (experiments, looks).

    Each user has a share of the traffic (gamma, ACTIVITY_SHAPE) and a click rate (Beta
    RATE_BETA, times 1 + lift) and falls in one of `clusters` clusters (the hash of the feedback
    book). A cluster's outcomes form a Poisson stream, its clicks one of rate sum(share x rate)
    (exact for users who arrive as Poisson streams), `peek_every` outcomes per look on average."""
    arm, _ = correlated_paths_with_pre(rng, lift, experiments, peek_every, looks, 0.0,
                                       users, clusters, chunk)  # fmt: skip
    return arm


def correlated_paths_with_pre(
    rng: np.random.Generator,
    lift: float,
    experiments: int,
    peek_every: int,
    looks: int,
    pre_looks: float,
    users: int = USERS_PER_ARM,
    clusters: int = UNIT_CLUSTERS,
    chunk: int = 250,
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...] | None]:
    """`correlated_paths` and, with pre_looks > 0, the arm's CUPED covariate: the nine
    `COVARIATE_MOMENTS` at every look, from a pre-period of `pre_looks` looks' worth of time
    in which the same users sent outcomes at the same activity to the stable version (their
    own rate, no lift). A cluster's pre-period totals are Poisson with the cluster's own
    intensities, so they share its users' rates with the experiment's outcomes and nothing
    else. The pre-period draws come from a child stream of `rng` (`rng.spawn`), so the
    experiment's outcomes are the same with and without it."""
    columns = np.empty((7, experiments, looks))
    covariates = np.empty((len(COVARIATE_MOMENTS), experiments, looks)) if pre_looks > 0 else None
    pre_rng = rng.spawn(1)[0] if pre_looks > 0 else None
    a, b = RATE_BETA
    for start in range(0, experiments, chunk):
        e = min(chunk, experiments - start)
        share = rng.gamma(ACTIVITY_SHAPE, 1.0, (e, users))
        own_rate = rng.beta(a, b, (e, users))
        rate = np.minimum(own_rate * (1 + lift), 1.0)
        where = rng.integers(0, clusters, (e, users)) + clusters * np.arange(e)[:, None]
        size = e * clusters
        arrivals = np.bincount(where.ravel(), share.ravel(), size).reshape(e, clusters)
        clicks = np.bincount(where.ravel(), (share * rate).ravel(), size).reshape(e, clusters)
        scale = peek_every / arrivals.sum(axis=1, keepdims=True)
        pre_p = pre_m = None
        if pre_rng is not None:
            stable = np.bincount(where.ravel(), (share * own_rate).ravel(), size)
            stable = stable.reshape(e, clusters) * scale * pre_looks
            pre_p = pre_rng.poisson(stable).astype(float)
            pre_m = pre_p + pre_rng.poisson(arrivals * scale * pre_looks - stable)
        arrivals, clicks = arrivals * scale, clicks * scale
        n = np.zeros((e, clusters))
        s = np.zeros((e, clusters))
        out = columns[:, start : start + e]
        for t in range(looks):
            hits = rng.poisson(clicks)
            n += hits + rng.poisson(arrivals - clicks)
            s += hits
            total_n, total_s = n.sum(axis=1), s.sum(axis=1)
            out[0, :, t], out[1, :, t], out[2, :, t] = total_n, total_s, total_s
            out[3, :, t] = np.count_nonzero(n, axis=1)
            out[4, :, t] = np.einsum("ij,ij->i", s, s)
            out[5, :, t] = np.einsum("ij,ij->i", s, n)
            out[6, :, t] = np.einsum("ij,ij->i", n, n)
            if covariates is not None and pre_p is not None and pre_m is not None:
                cov = covariates[:, start : start + e]
                if t == 0:  # the pre-period's own moments do not change during the test
                    cov[0] = pre_p.sum(axis=1)[:, None]
                    cov[1] = pre_m.sum(axis=1)[:, None]
                    cov[2] = np.einsum("ij,ij->i", pre_p, pre_p)[:, None]
                    cov[3] = np.einsum("ij,ij->i", pre_p, pre_m)[:, None]
                    cov[4] = np.einsum("ij,ij->i", pre_m, pre_m)[:, None]
                cov[5, :, t] = np.einsum("ij,ij->i", s, pre_p)
                cov[6, :, t] = np.einsum("ij,ij->i", s, pre_m)
                cov[7, :, t] = np.einsum("ij,ij->i", n, pre_p)
                cov[8, :, t] = np.einsum("ij,ij->i", n, pre_m)
    return tuple(columns), None if covariates is None else tuple(covariates)


def simulate(rng: np.random.Generator, p_candidate: float, experiments: int, looks: int):
    """The bench's experiments: candidate at p_candidate against the BASELINE control."""
    return binary_paths(rng, p_candidate, BASELINE, experiments, PEEK_EVERY, looks * PEEK_EVERY)


def naive_peeking_promotions(candidate, control) -> float:
    """Share of experiments a fixed-horizon 95% Wald interval, checked at every look, would
    have promoted (its lower bound above 0 at some look)."""
    n, sc, ss = candidate[0], candidate[1], control[1]
    pc, ps = sc / n, ss / n
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (pc - ps) / np.sqrt(pc * (1 - pc) / n + ps * (1 - ps) / n)
    return round(float(np.mean((z > Z95).any(axis=1))), 4)


def variant_tests(names: list[str] | None = None) -> dict[str, SequentialTest]:
    """The tests the bench compares, each fixed before any data: `shared` is today's default
    (alpha 5% two-sided, tau = mde); `separate` a one-sided test per direction, alpha 5% each,
    with tau = mde and with the tau whose boundary is lowest at the cap (`horizon_tau`, from
    the baseline and the cap alone); `separate_stop_10` the same with a false stop allowed
    twice as often as a false promotion (a stop only delays a rollout); `horizon_*` those
    three allocations with the horizon boundary at the cap, and one promoting at 2.5% and
    stopping at 5%. `names`: a subset (`shared`
    always kept); ValueError on an unknown name."""
    common: dict[str, Any] = {"scale": "relative", "mde": MDE, "min_samples_per_arm": MIN_SAMPLES}
    tau = round(horizon_tau(math.sqrt(BASELINE * (1 - BASELINE)), max_samples_per_arm(),
                            ALPHA, "separate", mean=BASELINE), 4)  # fmt: skip
    horizon: dict[str, Any] = {
        **common,
        "boundary": "horizon",
        "horizon_samples_per_arm": max_samples_per_arm(),
    }
    tests = {
        "shared": SequentialTest(alpha=ALPHA, **common),
        "separate_tau_mde": SequentialTest(alpha=ALPHA, directions="separate", **common),
        "separate": SequentialTest(alpha=ALPHA, directions="separate", tau=tau, **common),
        "separate_stop_10": SequentialTest(
            alpha=ALPHA, directions="separate", stop_alpha=STOP_ALPHA, tau=tau, **common
        ),
        "horizon_shared": SequentialTest(alpha=ALPHA, **horizon),
        "horizon_separate": SequentialTest(alpha=ALPHA, directions="separate", **horizon),
        "horizon_separate_stop_10": SequentialTest(
            alpha=ALPHA, directions="separate", stop_alpha=STOP_ALPHA, **horizon
        ),
        "horizon_separate_promote_2_5": SequentialTest(
            alpha=PROMOTE_ALPHA, directions="separate", stop_alpha=ALPHA, **horizon
        ),
    }
    if names is None:
        return tests
    unknown = sorted(set(names) - set(tests))
    if unknown:
        raise ValueError(f"unknown variants {unknown}: the bench has {sorted(tests)}")
    return {name: test for name, test in tests.items() if name == "shared" or name in names}


def _calls(code: np.ndarray, index: np.ndarray) -> dict[str, Any]:
    samples = (index + 1) * PEEK_EVERY
    decided = code != 0
    return {
        "better": int(np.sum(code == 1)),
        "worse": int(np.sum(code == -1)),
        "undecided": int(np.sum(~decided)),
        "median_samples_to_decision": int(np.median(samples[decided])) if decided.any() else None,
    }


def run_scenario(
    name: str,
    tests: dict[str, SequentialTest],
    rng: np.random.Generator,
    experiments: int,
    looks: int,
) -> dict[str, Any]:
    candidate, control = simulate(rng, SCENARIOS[name], experiments, looks)
    test = tests["shared"]
    started = time.perf_counter()
    code, index = test.evaluate_paths(OutcomeKind.BINARY, candidate, control).first_decision()
    seconds = time.perf_counter() - started
    samples = (index + 1) * PEEK_EVERY
    decided = code != 0
    fixed_n = required_sample_size(BASELINE, MDE, alpha=ALPHA, power=0.8)
    expected = {"aa": 0, "lift": 1, "drop": -1}[name]
    result: dict[str, Any] = {
        "scenario": name,
        "p_candidate": round(SCENARIOS[name], 6),
        "experiments": experiments,
        **_calls(code, index),
        "p90_samples_to_decision": int(np.percentile(samples[decided], 90))
        if decided.any()
        else None,
        "evaluate_paths_s": round(seconds, 3),
    }
    if expected:
        right = code == expected
        result["called_by_fixed_horizon_n"] = round(float(np.mean(right & (samples <= fixed_n))), 4)
    else:
        result["naive_peeking_false_promotions"] = naive_peeking_promotions(candidate, control)
    result["variants"] = {
        variant: _calls(*other.evaluate_paths(OutcomeKind.BINARY, candidate, control).first_decision())
        for variant, other in tests.items()
        if variant != "shared"
    }  # fmt: skip
    return result


def run_correlated(
    name: str,
    tests: dict[str, SequentialTest],
    rng: np.random.Generator,
    experiments: int,
    looks: int,
    pre_period: float,
) -> dict[str, Any]:
    lift = CORRELATED[name]
    pre_looks = pre_period * looks
    candidate, candidate_pre = correlated_paths_with_pre(
        rng, lift, experiments, PEEK_EVERY, looks, pre_looks
    )
    control, control_pre = correlated_paths_with_pre(
        rng, 0.0, experiments, PEEK_EVERY, looks, pre_looks
    )
    test = tests["shared"]
    started = time.perf_counter()
    code, index = test.evaluate_paths(OutcomeKind.BINARY, candidate, control).first_decision()
    seconds = time.perf_counter() - started
    # The same data with every outcome taken as independent (the test before units).
    naive, _ = test.evaluate_paths(OutcomeKind.BINARY, candidate[:3], control[:3]).first_decision()
    effect = _design_effect(*(c[:, -1] for c in control))
    result: dict[str, Any] = {
        "scenario": name,
        "lift": lift,
        "experiments": experiments,
        **_calls(code, index),
        "outcomes_as_independent": {
            "better": int(np.sum(naive == 1)),
            "worse": int(np.sum(naive == -1)),
        },
        "median_design_effect_at_cap": round(float(np.median(effect)), 2),
        "median_units_at_cap": int(np.median(control[3][:, -1])),
        "evaluate_paths_s": round(seconds, 3),
    }
    variants: dict[str, Any] = {}
    covariates = None
    if candidate_pre is not None and control_pre is not None:
        covariates = (candidate_pre, control_pre)
        last = [tuple(a[:, -1] for a in arm) for arm in (candidate, control, *covariates)]
        _, _, reduce_s = _cuped(last[0], last[1], (last[2], last[3]))
        result["median_design_effect_at_cap_cuped"] = round(float(np.median(effect * reduce_s)), 2)
    for variant, other in tests.items():
        per_unit = (code, index) if variant == "shared" else other.evaluate_paths(
            OutcomeKind.BINARY, candidate, control).first_decision()  # fmt: skip
        variants[variant] = {"per_unit": _calls(*per_unit)}
        if covariates is not None:
            cuped = other.evaluate_paths(OutcomeKind.BINARY, candidate, control, covariates)
            variants[variant]["cuped"] = _calls(*cuped.first_decision())
    result["variants"] = variants
    return result


def rate(count: int, experiments: int) -> float:
    return round(count / experiments, 4)


def standard_error(count: int, experiments: int) -> float:
    """Monte-Carlo standard error of a rate, sqrt(p (1 - p) / n)."""
    p = count / experiments
    return round(math.sqrt(p * (1 - p) / experiments), 4)


def _rates(aa: dict[str, Any], lift: dict[str, Any], drop: dict[str, Any], experiments: int):
    """The goal's four rates of one test (each scenario's better/worse counts) with their
    Monte-Carlo standard errors."""
    counts = {
        "aa_false_promotion_rate": aa["better"],
        "aa_false_stop_rate": aa["worse"],
        "lift_detection_rate": lift["better"],
        "drop_stop_rate": drop["worse"],
    }
    return {
        **{key: rate(count, experiments) for key, count in counts.items()},
        "standard_error": {key: standard_error(c, experiments) for key, c in counts.items()},
        "median_samples_to_decision": {
            "lift": lift["median_samples_to_decision"],
            "drop": drop["median_samples_to_decision"],
        },
        "wrong_direction": {"lift": lift["worse"], "drop": drop["better"]},
    }


def _describe(test: SequentialTest) -> dict[str, Any]:
    return {
        "directions": test.directions,
        "alpha": test.alpha,
        "stop_alpha": test.effective_stop_alpha,
        "tau": test.effective_tau,
        "boundary": test.boundary,
        "horizon_samples_per_arm": test.horizon_samples_per_arm,
    }


def independent_variants(
    scenarios: dict[str, dict[str, Any]], tests: dict[str, SequentialTest], experiments: int
) -> dict[str, Any]:
    aa, lift, drop = scenarios["aa"], scenarios["lift"], scenarios["drop"]
    out = {"shared": {**_describe(tests["shared"]), **_rates(aa, lift, drop, experiments)}}
    for variant, test in tests.items():
        if variant != "shared":
            calls = (s["variants"][variant] for s in (aa, lift, drop))
            out[variant] = {**_describe(test), **_rates(*calls, experiments)}
    return out


def correlated_summary(
    scenarios: dict[str, dict[str, Any]],
    tests: dict[str, SequentialTest],
    experiments: int,
    pre_period: float,
) -> dict[str, Any]:
    aa, lift, drop = (scenarios[f"correlated_{k}"] for k in ("aa", "lift", "drop"))
    independent = {
        "aa_false_promotion_rate": rate(aa["outcomes_as_independent"]["better"], experiments),
        "aa_false_stop_rate": rate(aa["outcomes_as_independent"]["worse"], experiments),
        "lift_detection_rate": rate(lift["outcomes_as_independent"]["better"], experiments),
        "drop_stop_rate": rate(drop["outcomes_as_independent"]["worse"], experiments),
    }
    variants: dict[str, Any] = {}
    for variant, test in tests.items():
        variants[variant] = _describe(test)
        for how in ("per_unit", "cuped"):
            if how in aa["variants"][variant]:
                calls = (s["variants"][variant][how] for s in (aa, lift, drop))
                variants[variant][how] = _rates(*calls, experiments)
    return {
        "aa_false_promotion_rate": rate(aa["better"], experiments),
        "lift_detection_rate": rate(lift["better"], experiments),
        "drop_stop_rate": rate(drop["worse"], experiments),
        "aa_false_stop_rate": rate(aa["worse"], experiments),
        "median_samples_to_decision": {
            "lift": lift["median_samples_to_decision"],
            "drop": drop["median_samples_to_decision"],
        },
        "wrong_direction": {"lift": lift["worse"], "drop": drop["better"]},
        "outcomes_as_independent": independent,
        "variants": variants,
        "median_design_effect_at_cap": aa["median_design_effect_at_cap"],
        "median_design_effect_at_cap_cuped": aa.get("median_design_effect_at_cap_cuped"),
        "pre_period": pre_period,
        "pre_period_outcomes_per_user": round(
            pre_period * max_samples_per_arm() / USERS_PER_ARM, 1
        ),
        "median_units_at_cap": aa["median_units_at_cap"],
        "users_per_arm": USERS_PER_ARM,
        "outcomes_per_user_at_cap": round(max_samples_per_arm() / USERS_PER_ARM, 1),
        "activity_shape": ACTIVITY_SHAPE,
        "rate_beta": list(RATE_BETA),
        "unit_clusters": UNIT_CLUSTERS,
    }


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(
        "bench.abtest",
        __doc__,
        json_help="only the JSON object on stdout (without it, one line per scenario first)",
    )
    parser.add_argument("--experiments", type=int, default=None,
                        help="experiments per scenario (default 2000; --smoke 30)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="30 experiments per scenario")
    parser.add_argument("--seed", type=int, default=0, help="numpy Generator seed (default 0)")
    parser.add_argument("--skip-correlated", action="store_true",
                        help="leave out the correlated-users scenarios (~1 min each)")  # fmt: skip
    parser.add_argument("--pre-period", type=float, default=1.0,
                        help="CUPED pre-period, in lengths of the experiment at the cap "
                             "(default 1; 0: no CUPED)")  # fmt: skip
    parser.add_argument("--variants", default=None,
                        help="comma-separated tests to run (default all; shared always runs): "
                             + ", ".join(variant_tests()))  # fmt: skip
    args = parser.parse_args(argv)
    experiments = args.experiments or (30 if args.smoke else 2000)
    if experiments < 1:
        parser.error("--experiments must be at least 1")
    if args.pre_period < 0:
        parser.error(f"--pre-period ({args.pre_period}) must be at least 0")

    names = None if args.variants is None else [n for n in args.variants.split(",") if n]
    try:
        tests = variant_tests(names)
    except ValueError as exc:
        parser.error(str(exc))
    started = time.perf_counter()
    test = tests["shared"]
    max_samples = max_samples_per_arm()
    looks = max_samples // PEEK_EVERY
    streams = np.random.default_rng(args.seed).spawn(len(SCENARIOS) + len(CORRELATED))
    scenarios = {}
    for (name, _), rng in zip(SCENARIOS.items(), streams):
        log(f"{name}: {experiments} experiments x {looks} looks")
        scenarios[name] = run_scenario(name, tests, rng, experiments, looks)
    if not args.skip_correlated:
        for name, rng in zip(CORRELATED, streams[len(SCENARIOS) :]):
            log(f"{name}: {experiments} experiments x {looks} looks, {USERS_PER_ARM} users per arm")
            scenarios[name] = run_correlated(name, tests, rng, experiments, looks, args.pre_period)
    aa, lift, drop = scenarios["aa"], scenarios["lift"], scenarios["drop"]
    correlated = None
    if not args.skip_correlated:
        correlated = correlated_summary(scenarios, tests, experiments, args.pre_period)
    result: dict[str, Any] = {
        "aa_false_promotion_rate": rate(aa["better"], experiments),
        "lift_detection_rate": rate(lift["better"], experiments),
        "drop_stop_rate": rate(drop["worse"], experiments),
        "median_samples_to_decision": {
            "lift": lift["median_samples_to_decision"],
            "drop": drop["median_samples_to_decision"],
        },
        "aa_false_stop_rate": rate(aa["worse"], experiments),
        "naive_peeking_false_promotion_rate": aa["naive_peeking_false_promotions"],
        "called_by_fixed_horizon_n": {
            "lift": lift["called_by_fixed_horizon_n"],
            "drop": drop["called_by_fixed_horizon_n"],
        },
        "wrong_direction": {"lift": lift["worse"], "drop": drop["better"]},
        "variants": independent_variants(scenarios, tests, experiments),
        "correlated": correlated,
        "fixed_horizon_samples": required_sample_size(BASELINE, MDE, alpha=ALPHA, power=0.8),
        "alpha": ALPHA,
        "tau": test.effective_tau,
        "mde": MDE,
        "scale": test.scale,
        "baseline": BASELINE,
        "max_samples": max_samples,
        "peek_every": PEEK_EVERY,
        "looks": looks,
        "min_samples_per_arm": MIN_SAMPLES,
        "experiments": experiments,
        "seed": args.seed,
        "smoke": args.smoke,
        "machine": machine(),
        "wall_s": round(time.perf_counter() - started, 2),
    }
    if not args.json:  # per-scenario details first; the JSON object is the last line
        for scenario in scenarios.values():
            print(json.dumps(scenario))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
