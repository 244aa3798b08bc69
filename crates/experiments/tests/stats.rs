//! `experiments::stats` against SciPy 1.17 and statsmodels 0.15
//! (fixture from `scripts/stats_reference.py`), and its properties on random
//! inputs.

use experiments::stats::{
    Verdict, compare, incomplete_beta, mcnemar_exact, paired_t, t_cdf, t_quantile,
};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/stats_reference.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

fn f(v: &Value) -> f64 {
    v.as_f64().expect("number")
}

fn close(got: f64, want: f64, rel: f64, what: &str) {
    let tol = rel * want.abs().max(1e-300) + 1e-300;
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got:e}, SciPy/statsmodels {want:e}"
    );
}

#[test]
fn student_t_matches_scipy() {
    let fx = fixture();
    for r in fx["t_cdf"].as_array().unwrap() {
        let (t, df, want) = (f(&r[0]), f(&r[1]), f(&r[2]));
        close(t_cdf(t, df), want, 1e-12, &format!("t_cdf({t}, {df})"));
    }
    for r in fx["t_quantile"].as_array().unwrap() {
        let (p, df, want) = (f(&r[0]), f(&r[1]), f(&r[2]));
        let got = t_quantile(p, df);
        if want == 0.0 {
            assert_eq!(got, 0.0);
        } else {
            close(got, want, 1e-10, &format!("t_quantile({p}, {df})"));
        }
    }
}

#[test]
fn incomplete_beta_matches_scipy() {
    for r in fixture()["betainc"].as_array().unwrap() {
        let (x, a, b, want) = (f(&r[0]), f(&r[1]), f(&r[2]), f(&r[3]));
        close(
            incomplete_beta(x, a, b),
            want,
            1e-12,
            &format!("I_{x}({a}, {b})"),
        );
    }
}

#[test]
fn paired_t_matches_scipy_ttest_rel() {
    for (i, c) in fixture()["paired_t"].as_array().unwrap().iter().enumerate() {
        let v = |k: &str| -> Vec<f64> { c[k].as_array().unwrap().iter().map(f).collect() };
        let got = paired_t(&v("a"), &v("b")).unwrap();
        close(got.t, f(&c["t"]), 1e-10, &format!("case {i}: t"));
        close(got.p, f(&c["p"]), 1e-9, &format!("case {i}: p"));
        close(got.low, f(&c["low"]), 1e-10, &format!("case {i}: low"));
        close(got.high, f(&c["high"]), 1e-10, &format!("case {i}: high"));
    }
}

#[test]
fn mcnemar_matches_statsmodels_exact() {
    for r in fixture()["mcnemar"].as_array().unwrap() {
        let (b, c, want) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap(), f(&r[2]));
        close(
            mcnemar_exact(b, c),
            want,
            1e-10,
            &format!("mcnemar({b}, {c})"),
        );
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Swapping the arms flips the difference, keeps every p-value, and
        /// mirrors the verdict.
        #[test]
        fn swapping_arms_mirrors_the_comparison(
            seeds in 1usize..5,
            n in 1usize..60,
            bits in proptest::collection::vec(any::<u8>(), 300),
        ) {
            let arm = |off: usize| -> Vec<Vec<bool>> {
                (0..seeds)
                    .map(|s| (0..n).map(|i| bits[(off + s * n + i) % bits.len()] & 1 == 1).collect())
                    .collect()
            };
            let (a, b) = (arm(0), arm(7));
            let ab = compare(&a, &b).unwrap();
            let ba = compare(&b, &a).unwrap();
            prop_assert_eq!(ab.discordant, (ba.discordant.1, ba.discordant.0));
            prop_assert_eq!(ab.mcnemar_p, ba.mcnemar_p);
            prop_assert!((ab.seeds.mean + ba.seeds.mean).abs() < 1e-9);
            let mirrored = match ba.verdict {
                Verdict::Better => Verdict::Worse,
                Verdict::Worse => Verdict::Better,
                v => v,
            };
            prop_assert_eq!(ab.verdict, mirrored);
            prop_assert!((0.0..=1.0).contains(&ab.mcnemar_p));
            // An arm against itself is never a difference.
            prop_assert_eq!(compare(&a, &a).unwrap().verdict, Verdict::NoSignificantDifference);
        }

        /// The quantile inverts the distribution function.
        #[test]
        fn quantile_inverts_cdf(p in 0.001f64..0.999, df in 1.0f64..300.0) {
            let t = t_quantile(p, df);
            prop_assert!((t_cdf(t, df) - p).abs() < 1e-12);
        }
    }
}
