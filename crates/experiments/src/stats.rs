//! The statistics every results page uses to decide a comparison.
//!
//! An experiment compares two arms (say dense fine-tuning and EMoE) trained
//! with the same seeds and scored on the same full test set. Two kinds of
//! pairing are available and both are used:
//!
//! - **over seeds**: arm A's and arm B's score under seed `s` form a pair. The
//!   mean of the per-seed differences gets a two-sided 95% Student-t interval
//!   and a paired t-test (`n - 1` degrees of freedom);
//! - **over examples**: for classification, arm A and arm B under the same seed
//!   either agree on an example or one of them is right and the other wrong.
//!   The discordant counts `b` (A right, B wrong) and `c` (A wrong, B right),
//!   pooled over seeds, give McNemar's exact test: under the null hypothesis
//!   that both arms are equally accurate, `b ~ Binomial(b + c, 1/2)`, and the
//!   two-sided p-value is `min(1, 2 · P[X ≤ min(b, c)])`. A paired bootstrap
//!   over examples (resampling example indices, the same draw for both arms)
//!   gives an interval for the accuracy difference of a single seed.
//!
//! **Verdict.** A difference is called *better* (or *worse*) only when the
//! 95% interval over seeds lies entirely above (below) zero **and** McNemar's
//! pooled test rejects at the 5% level; anything else is *no significant
//! difference*. With one seed the interval over seeds is undefined and only
//! McNemar decides. Requiring both guards against a seed-to-seed spread that
//! the per-example test cannot see, and against a handful of seeds agreeing by
//! luck on a difference the examples do not support.
//!
//! The special functions (log-gamma, the regularised incomplete beta function,
//! Student's t distribution and its quantile) are written here, so the crate
//! needs nothing beyond the standard library; `tests/stats.rs` checks them and
//! the tests against SciPy and statsmodels (fixture made by
//! `scripts/stats_reference.py`).

use std::fmt;

use tensor_core::rng::SplitMix64;

/// Bad input to a statistic: the message names the argument.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsError(pub String);

impl fmt::Display for StatsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StatsError {}

fn bad<T>(msg: impl Into<String>) -> Result<T, StatsError> {
    Err(StatsError(msg.into()))
}

/// Mean and sample standard deviation (0 for one value; NaN for none), as
/// every results table reports them.
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let v = if xs.len() > 1 {
        xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, v.sqrt())
}

/// `ln Γ(x)` for `x > 0` (Lanczos approximation, g = 7, nine coefficients;
/// relative error below 1e-15 on the range used here).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 - x) = π / sin(πx).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).abs().ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The regularised incomplete beta function `I_x(a, b)` for `a, b > 0` and
/// `0 ≤ x ≤ 1`, by its continued fraction (modified Lentz), using the
/// symmetry `I_x(a, b) = 1 - I_{1-x}(b, a)` where the fraction converges
/// slowly.
pub fn incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x > (a + 1.0) / (a + b + 2.0) {
        return 1.0 - incomplete_beta(1.0 - x, b, a);
    }
    const TINY: f64 = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=10_000 {
        let m = m as f64;
        // Even step.
        let num = m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m));
        d = 1.0 + num * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + num / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        h *= d * c;
        // Odd step.
        let num = -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0));
        d = 1.0 + num * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + num / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        let delta = d * c;
        h *= delta;
        if (delta - 1.0).abs() < 1e-15 {
            break;
        }
    }
    ln_front.exp() * h / a
}

/// Student's t cumulative distribution function with `df > 0` degrees of freedom.
pub fn t_cdf(t: f64, df: f64) -> f64 {
    if t.is_nan() || df.is_nan() || df <= 0.0 {
        return f64::NAN;
    }
    if t.is_infinite() {
        return if t > 0.0 { 1.0 } else { 0.0 };
    }
    // P[|T| > |t|] = I_{df/(df+t²)}(df/2, 1/2).
    let tail = 0.5 * incomplete_beta(df / (df + t * t), 0.5 * df, 0.5);
    if t > 0.0 { 1.0 - tail } else { tail }
}

/// The two-sided p-value `P[|T| ≥ |t|]` of Student's t with `df` degrees of freedom.
pub fn t_two_sided_p(t: f64, df: f64) -> f64 {
    if t.is_nan() || df.is_nan() || df <= 0.0 {
        return f64::NAN;
    }
    if t.is_infinite() {
        return 0.0;
    }
    incomplete_beta(df / (df + t * t), 0.5 * df, 0.5).min(1.0)
}

/// The `p`-quantile of Student's t with `df` degrees of freedom (`0 < p < 1`),
/// by bisection on [`t_cdf`] to machine precision.
pub fn t_quantile(p: f64, df: f64) -> f64 {
    if !(p > 0.0 && p < 1.0) || df.is_nan() || df <= 0.0 {
        return f64::NAN;
    }
    if p == 0.5 {
        return 0.0;
    }
    if p < 0.5 {
        return -t_quantile(1.0 - p, df);
    }
    let (mut lo, mut hi) = (0.0_f64, 1.0_f64);
    while t_cdf(hi, df) < p {
        lo = hi;
        hi *= 2.0;
        if hi > 1e300 {
            return f64::INFINITY;
        }
    }
    for _ in 0..2000 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// A paired t analysis of `a[i] - b[i]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairedT {
    /// Number of pairs.
    pub n: usize,
    /// Mean difference `mean(a - b)`.
    pub mean: f64,
    /// Sample standard deviation of the differences (0 for one pair).
    pub sd: f64,
    /// Two-sided 95% interval for the mean difference (NaN with fewer than two pairs).
    pub low: f64,
    /// Upper end of the 95% interval.
    pub high: f64,
    /// The t statistic (NaN with fewer than two pairs; ±∞ when all differences are equal and non-zero).
    pub t: f64,
    /// Two-sided p-value of `mean(a - b) = 0` (NaN with fewer than two pairs; 1 when all differences are 0).
    pub p: f64,
}

impl PairedT {
    /// Whether the 95% interval excludes zero.
    pub fn excludes_zero(&self) -> bool {
        self.low > 0.0 || self.high < 0.0
    }
}

fn check_finite(name: &str, xs: &[f64]) -> Result<(), StatsError> {
    match xs.iter().position(|x| !x.is_finite()) {
        Some(i) => bad(format!("{name}[{i}] = {} is not finite", xs[i])),
        None => Ok(()),
    }
}

/// The paired t-test and 95% interval of `mean(a - b)`: the same numbers as
/// SciPy's `ttest_rel(a, b)` and its `confidence_interval(0.95)`.
pub fn paired_t(a: &[f64], b: &[f64]) -> Result<PairedT, StatsError> {
    if a.len() != b.len() {
        return bad(format!(
            "paired_t: the two arms have {} and {} scores; pairs need the same seeds",
            a.len(),
            b.len()
        ));
    }
    if a.is_empty() {
        return bad("paired_t: no pairs");
    }
    check_finite("a", a)?;
    check_finite("b", b)?;
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let (mean, sd) = mean_std(&d);
    let n = d.len();
    if n < 2 {
        return Ok(PairedT {
            n,
            mean,
            sd,
            low: f64::NAN,
            high: f64::NAN,
            t: f64::NAN,
            p: f64::NAN,
        });
    }
    let df = (n - 1) as f64;
    let se = sd / (n as f64).sqrt();
    let (t, p, half) = if se == 0.0 {
        if mean == 0.0 {
            (f64::NAN, 1.0, 0.0)
        } else {
            (mean.signum() * f64::INFINITY, 0.0, 0.0)
        }
    } else {
        let t = mean / se;
        (t, t_two_sided_p(t, df), t_quantile(0.975, df) * se)
    };
    Ok(PairedT {
        n,
        mean,
        sd,
        low: mean - half,
        high: mean + half,
        t,
        p,
    })
}

/// `ln C(n, k)`.
fn ln_choose(n: u64, k: u64) -> f64 {
    ln_gamma(n as f64 + 1.0) - ln_gamma(k as f64 + 1.0) - ln_gamma((n - k) as f64 + 1.0)
}

/// `P[X ≤ k]` for `X ~ Binomial(n, 1/2)`, summed in log space.
pub fn binomial_half_cdf(k: u64, n: u64) -> f64 {
    if k >= n {
        return 1.0;
    }
    let ln_half_n = n as f64 * 0.5f64.ln();
    let terms: Vec<f64> = (0..=k).map(|i| ln_choose(n, i) + ln_half_n).collect();
    let m = terms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    (m + terms.iter().map(|t| (t - m).exp()).sum::<f64>().ln())
        .exp()
        .min(1.0)
}

/// McNemar's exact test on the discordant counts `b` (A right, B wrong) and
/// `c` (A wrong, B right): `min(1, 2 · P[X ≤ min(b, c)])` with
/// `X ~ Binomial(b + c, 1/2)`, as statsmodels' `mcnemar(table, exact=True)`.
/// 1 when there are no discordant pairs.
pub fn mcnemar_exact(b: u64, c: u64) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    (2.0 * binomial_half_cdf(b.min(c), n)).min(1.0)
}

/// Discordant counts `(b, c)` of two arms' per-example correctness.
pub fn discordant(a: &[bool], b: &[bool]) -> Result<(u64, u64), StatsError> {
    if a.len() != b.len() {
        return bad(format!(
            "discordant: the two arms scored {} and {} examples; pairs need the same test set",
            a.len(),
            b.len()
        ));
    }
    let mut out = (0, 0);
    for (x, y) in a.iter().zip(b) {
        match (x, y) {
            (true, false) => out.0 += 1,
            (false, true) => out.1 += 1,
            _ => {}
        }
    }
    Ok(out)
}

/// A percentile interval from a paired bootstrap over examples (in points
/// for [`paired_bootstrap`], in the data's units for [`bootstrap_mean_diff`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bootstrap {
    /// Observed difference, e.g. `acc(a) - acc(b)` in points (×100).
    pub diff: f64,
    /// 2.5th percentile of the resampled differences.
    pub low: f64,
    /// 97.5th percentile.
    pub high: f64,
}

impl Bootstrap {
    pub fn excludes_zero(&self) -> bool {
        self.low > 0.0 || self.high < 0.0
    }
}

/// The paired bootstrap of the accuracy difference between two arms scored on
/// the same examples, in points: [`bootstrap_mean_diff`] of the per-example
/// correctness as 0 / 100.
pub fn paired_bootstrap(
    a: &[bool],
    b: &[bool],
    resamples: usize,
    seed: u64,
) -> Result<Bootstrap, StatsError> {
    let points =
        |v: &[bool]| -> Vec<f64> { v.iter().map(|&x| if x { 100.0 } else { 0.0 }).collect() };
    bootstrap_mean_diff(&points(a), &points(b), resamples, seed)
}

/// The mean of real-valued paired differences `a_i − b_i` (same examples,
/// same order) with a percentile-bootstrap 95% interval: `resamples` seeded
/// draws of `n` indices with replacement. In the units of `a` and `b`.
pub fn bootstrap_mean_diff(
    a: &[f64],
    b: &[f64],
    resamples: usize,
    seed: u64,
) -> Result<Bootstrap, StatsError> {
    if a.len() != b.len() {
        return bad(format!(
            "bootstrap_mean_diff: {} and {} values; pairs need the same examples",
            a.len(),
            b.len()
        ));
    }
    if a.is_empty() {
        return bad("bootstrap_mean_diff: no examples");
    }
    if resamples < 2 {
        return bad(format!(
            "bootstrap_mean_diff: resamples = {resamples} (need at least 2)"
        ));
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    if d.iter().any(|x| !x.is_finite()) {
        return bad("bootstrap_mean_diff: a difference is NaN or infinite");
    }
    let n = d.len();
    let mut rng = SplitMix64::new(seed);
    let mut draws: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| d[rng.below(n as u64) as usize]).sum::<f64>() / n as f64)
        .collect();
    draws.sort_by(f64::total_cmp);
    Ok(Bootstrap {
        diff: d.iter().sum::<f64>() / n as f64,
        low: percentile(&draws, 2.5),
        high: percentile(&draws, 97.5),
    })
}

/// Linear-interpolation percentile of sorted values (NumPy's default method).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (pos - lo as f64) * (sorted[hi] - sorted[lo])
}

/// The outcome of a comparison, from arm A's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Better,
    Worse,
    NoSignificantDifference,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Better => "better",
            Verdict::Worse => "worse",
            Verdict::NoSignificantDifference => "no significant difference",
        })
    }
}

/// Significance level of every verdict.
pub const ALPHA: f64 = 0.05;

/// Arm A against arm B on one classification test set, over the same seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Paired t over seeds of the accuracy difference, in points.
    pub seeds: PairedT,
    /// Discordant counts pooled over seeds: (A right B wrong, A wrong B right).
    pub discordant: (u64, u64),
    /// McNemar's exact p-value on the pooled discordant counts.
    pub mcnemar_p: f64,
    /// The decision (see the module documentation).
    pub verdict: Verdict,
}

/// Decide arm A against arm B from their per-example correctness:
/// `a[s][i]` is whether arm A under seed `s` got example `i` right.
pub fn compare(a: &[Vec<bool>], b: &[Vec<bool>]) -> Result<Comparison, StatsError> {
    if a.len() != b.len() {
        return bad(format!(
            "compare: the two arms ran {} and {} seeds; pairs need the same seeds",
            a.len(),
            b.len()
        ));
    }
    if a.is_empty() {
        return bad("compare: no seeds");
    }
    let acc = |v: &Vec<bool>| 100.0 * v.iter().filter(|x| **x).count() as f64 / v.len() as f64;
    let mut disc = (0, 0);
    for (s, (x, y)) in a.iter().zip(b).enumerate() {
        if x.is_empty() {
            return bad(format!("compare: seed {s} scored no examples"));
        }
        let (p, q) = discordant(x, y).map_err(|e| StatsError(format!("seed {s}: {e}")))?;
        disc.0 += p;
        disc.1 += q;
    }
    let sa: Vec<f64> = a.iter().map(acc).collect();
    let sb: Vec<f64> = b.iter().map(acc).collect();
    let seeds = paired_t(&sa, &sb)?;
    let mcnemar_p = mcnemar_exact(disc.0, disc.1);
    let verdict = decide(&seeds, mcnemar_p);
    Ok(Comparison {
        seeds,
        discordant: disc,
        mcnemar_p,
        verdict,
    })
}

/// Decide arm A against arm B on several test sets at once, by the
/// unweighted mean of their accuracies: `a[s][t][i]` is whether arm A under
/// seed `s` got example `i` of test set `t` right. The interval over seeds
/// is on the per-seed mean over sets; McNemar's test pools the discordant
/// examples over seeds and sets. With one set this is [`compare`].
pub fn compare_macro(a: &[Vec<Vec<bool>>], b: &[Vec<Vec<bool>>]) -> Result<Comparison, StatsError> {
    if a.len() != b.len() || a.is_empty() {
        return bad(format!(
            "compare_macro: the two arms ran {} and {} seeds; pairs need the same, at least one",
            a.len(),
            b.len()
        ));
    }
    let macro_acc = |sets: &Vec<Vec<bool>>| -> Result<f64, StatsError> {
        if sets.is_empty() || sets.iter().any(Vec::is_empty) {
            return bad("compare_macro: a seed with no sets or an empty set");
        }
        let accs: Vec<f64> = sets
            .iter()
            .map(|v| 100.0 * v.iter().filter(|x| **x).count() as f64 / v.len() as f64)
            .collect();
        Ok(accs.iter().sum::<f64>() / accs.len() as f64)
    };
    let mut disc = (0, 0);
    let (mut sa, mut sb) = (Vec::new(), Vec::new());
    for (s, (x, y)) in a.iter().zip(b).enumerate() {
        if x.len() != y.len() {
            return bad(format!(
                "compare_macro: seed {s} has {} and {} sets",
                x.len(),
                y.len()
            ));
        }
        for (t, (u, v)) in x.iter().zip(y).enumerate() {
            let (p, q) =
                discordant(u, v).map_err(|e| StatsError(format!("seed {s}, set {t}: {e}")))?;
            disc.0 += p;
            disc.1 += q;
        }
        sa.push(macro_acc(x)?);
        sb.push(macro_acc(y)?);
    }
    let seeds = paired_t(&sa, &sb)?;
    let mcnemar_p = mcnemar_exact(disc.0, disc.1);
    Ok(Comparison {
        verdict: decide(&seeds, mcnemar_p),
        seeds,
        discordant: disc,
        mcnemar_p,
    })
}

/// The verdict rule: the interval over seeds (when there are at least two)
/// must exclude zero and the per-example test must reject at [`ALPHA`].
pub fn decide(seeds: &PairedT, example_p: f64) -> Verdict {
    let seeds_agree = seeds.n < 2 || seeds.excludes_zero();
    if seeds_agree && example_p < ALPHA && seeds.mean != 0.0 {
        if seeds.mean > 0.0 {
            Verdict::Better
        } else {
            Verdict::Worse
        }
    } else {
        Verdict::NoSignificantDifference
    }
}

/// The verdict of a paired comparison over seeds only (for metrics without a
/// per-example test, such as macro-F1): the 95% interval must exclude zero.
pub fn decide_seeds_only(seeds: &PairedT) -> Verdict {
    if seeds.n >= 2 && seeds.excludes_zero() {
        if seeds.mean > 0.0 {
            Verdict::Better
        } else {
            Verdict::Worse
        }
    } else {
        Verdict::NoSignificantDifference
    }
}

/// Format a p-value for a table: three significant digits, `< 1e-4` below that.
pub fn fmt_p(p: f64) -> String {
    if p.is_nan() {
        "n/a".into()
    } else if p < 1e-4 {
        "< 1e-4".into()
    } else {
        format!("{p:.3}")
    }
}

/// `+1.23 [-0.40, +2.86]` (the interval omitted with one seed).
pub fn fmt_interval(t: &PairedT) -> String {
    if t.n < 2 {
        format!("{:+.2} (one seed)", t.mean)
    } else {
        format!("{:+.2} [{:+.2}, {:+.2}]", t.mean, t.low, t.high)
    }
}

/// The columns every comparison table shares after its label:
/// `| Δ [95% CI] | paired t p | b / c | McNemar p | verdict |`.
pub const COMPARISON_HEADER: &str = "| Δ points, mean [95% CI over seeds] | paired t p (seeds) | discordant A✓B✗ / A✗B✓ | McNemar p (examples) | verdict |";
/// The separator row matching [`COMPARISON_HEADER`].
pub const COMPARISON_RULE: &str = "|---|---|---|---|---|";

impl Comparison {
    /// This comparison's cells, matching [`COMPARISON_HEADER`].
    pub fn cells(&self) -> String {
        format!(
            "| {} | {} | {} / {} | {} | {} |",
            fmt_interval(&self.seeds),
            fmt_p(self.seeds.p),
            self.discordant.0,
            self.discordant.1,
            fmt_p(self.mcnemar_p),
            self.verdict
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_macro_is_compare_for_one_set_and_averages_sets() {
        let a = vec![
            vec![true, true, false, true],
            vec![true, false, false, true],
        ];
        let b = vec![
            vec![false, true, false, false],
            vec![true, true, false, false],
        ];
        let wrap = |v: &Vec<Vec<bool>>| v.iter().map(|x| vec![x.clone()]).collect::<Vec<_>>();
        assert_eq!(
            compare_macro(&wrap(&a), &wrap(&b)).unwrap(),
            compare(&a, &b).unwrap()
        );
        // Two sets of different sizes: the mean is unweighted.
        let a2 = vec![
            vec![vec![true; 2], vec![true; 8]],
            vec![vec![true; 2], vec![false; 8]],
        ];
        let b2 = vec![
            vec![vec![false; 2], vec![true; 8]],
            vec![vec![true; 2], vec![false; 8]],
        ];
        let c = compare_macro(&a2, &b2).unwrap();
        // Seed 0: (100 + 100)/2 - (0 + 100)/2 = 50; seed 1: 0.
        assert_eq!((c.seeds.n, c.seeds.mean), (2, 25.0));
        assert_eq!(c.discordant, (2, 0));
        assert!(compare_macro(&a2, &b2[..1]).is_err());
        assert!(compare_macro(&[vec![vec![]]], &[vec![vec![]]]).is_err());
    }

    #[test]
    fn mean_std_of_known_values() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((s - (5.0f64 / 3.0).sqrt()).abs() < 1e-15);
        assert_eq!(mean_std(&[7.0]), (7.0, 0.0));
        assert!(mean_std(&[]).0.is_nan());
    }

    #[test]
    fn gamma_matches_factorials() {
        let mut f = 1.0f64;
        for n in 1..20 {
            f *= n as f64;
            assert!((ln_gamma(n as f64 + 1.0) - f.ln()).abs() < 1e-12, "{n}");
        }
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-14);
    }

    #[test]
    fn t_with_one_degree_is_cauchy() {
        for t in [-3.0f64, -0.4, 0.0, 0.7, 12.0] {
            let cauchy = 0.5 + t.atan() / std::f64::consts::PI;
            assert!((t_cdf(t, 1.0) - cauchy).abs() < 1e-13, "{t}");
        }
        assert!((t_quantile(0.975, 1.0) - (0.475 * std::f64::consts::PI).tan()).abs() < 1e-9);
    }

    #[test]
    fn mcnemar_of_a_balanced_table_is_one_and_of_a_lopsided_one_small() {
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        // 10 vs 0: 2 / 2^10.
        assert!((mcnemar_exact(10, 0) - 2.0 / 1024.0).abs() < 1e-15);
        assert_eq!(mcnemar_exact(3, 9), mcnemar_exact(9, 3));
    }

    #[test]
    fn paired_t_rejects_bad_input_by_name() {
        assert!(
            paired_t(&[1.0], &[1.0, 2.0])
                .unwrap_err()
                .0
                .contains("same seeds")
        );
        assert!(
            paired_t(&[f64::NAN], &[1.0])
                .unwrap_err()
                .0
                .contains("a[0]")
        );
        assert!(
            compare(&[vec![true]], &[vec![true, false]])
                .unwrap_err()
                .0
                .contains("seed 0")
        );
    }

    #[test]
    fn constant_differences_are_decided_without_nan() {
        let t = paired_t(&[2.0, 3.0, 4.0], &[1.0, 2.0, 3.0]).unwrap();
        assert_eq!((t.mean, t.low, t.high, t.p), (1.0, 1.0, 1.0, 0.0));
        let z = paired_t(&[1.0, 2.0], &[1.0, 2.0]).unwrap();
        assert_eq!((z.p, z.excludes_zero()), (1.0, false));
    }

    #[test]
    fn verdict_needs_both_the_seeds_and_the_examples() {
        // A is right on 40 examples B misses, B on none: McNemar rejects.
        let a: Vec<bool> = (0..200).map(|i| i % 5 != 0).collect();
        let mut b = a.clone();
        for x in b.iter_mut().take(40) {
            *x = false;
        }
        let c = compare(&[a.clone(), a.clone()], &[b.clone(), b.clone()]).unwrap();
        assert_eq!(c.verdict, Verdict::Better);
        let w = compare(&[b.clone(), b.clone()], &[a.clone(), a.clone()]).unwrap();
        assert_eq!(w.verdict, Verdict::Worse);
        // Seeds disagree in sign: no verdict although one seed alone is lopsided.
        let n = compare(&[a.clone(), b.clone()], &[b.clone(), a.clone()]).unwrap();
        assert_eq!(n.verdict, Verdict::NoSignificantDifference);
        assert_eq!(n.discordant, (32, 32));
    }

    #[test]
    fn bootstrap_is_seeded_and_brackets_the_difference() {
        let a: Vec<bool> = (0..300).map(|i| i % 3 != 0).collect();
        let b: Vec<bool> = (0..300).map(|i| i % 4 != 0).collect();
        let x = paired_bootstrap(&a, &b, 500, 3).unwrap();
        assert_eq!(x, paired_bootstrap(&a, &b, 500, 3).unwrap());
        assert!(x.low <= x.diff && x.diff <= x.high, "{x:?}");
        let same = paired_bootstrap(&a, &a, 100, 0).unwrap();
        assert_eq!((same.low, same.high, same.diff), (0.0, 0.0, 0.0));
    }

    #[test]
    fn mean_bootstrap_matches_the_normal_interval_on_a_large_sample() {
        // d = a - b has mean 0.5 and standard deviation 1 (a fixed ±1 pattern):
        // the interval is close to 0.5 ± 1.96 / sqrt(n).
        let n = 2000;
        let a: Vec<f64> = (0..n)
            .map(|i| if i % 2 == 0 { 1.5 } else { -0.5 })
            .collect();
        let b = vec![0.0; n];
        let x = bootstrap_mean_diff(&a, &b, 2000, 11).unwrap();
        assert!((x.diff - 0.5).abs() < 1e-12);
        let half = 1.96 / (n as f64).sqrt();
        assert!(
            (x.high - x.low - 2.0 * half).abs() < 0.15 * 2.0 * half,
            "{x:?}"
        );
        assert!(x.excludes_zero());
        assert_eq!(x, bootstrap_mean_diff(&a, &b, 2000, 11).unwrap());
        let same = bootstrap_mean_diff(&a, &a, 50, 0).unwrap();
        assert_eq!((same.low, same.high, same.diff), (0.0, 0.0, 0.0));
        assert!(!same.excludes_zero());
        assert!(bootstrap_mean_diff(&a, &b[1..], 50, 0).is_err());
        assert!(bootstrap_mean_diff(&[f64::NAN], &[0.0], 50, 0).is_err());
    }
}
