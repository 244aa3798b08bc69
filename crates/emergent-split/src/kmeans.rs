//! Balanced k-means on the FFN's key vectors: step 1 of EMoE (Qiu et al.
//! 2023, "Emergent Modularity in Pre-trained Transformers", §3.1 of
//! METHODS.md) and MoEfication's `param_cluster` (Zhang et al. 2022).
//!
//! Points are the L2-normalised rows of `W1` (the gate rows `W_G` for
//! SwiGLU). With `N` clusters of exactly `m = n / N` points each, Lloyd's
//! iterations minimise the k-means objective
//!
//! `J(a, C) = Σ_i ‖x_i − c_{a(i)}‖²`  subject to  `|{i : a(i) = e}| = m` for every `e`.
//!
//! - **Seeding**: k-means++ (D² sampling) driven by [`SplitMix64`], so a seed
//!   fixes the result.
//! - **Assignment step**: [`balanced_assignment`] solves the transportation
//!   problem `min Σ_i cost[i][a(i)]` with cluster capacities `m` *exactly*, by
//!   successive shortest paths with potentials (the Hungarian method with
//!   capacities). Points join one at a time; the shortest augmenting path
//!   runs through clusters, where the edge `a → b` moves the point of `a` that
//!   is cheapest to move, at cost `min_{j ∈ a} (cost[j][b] − cost[j][a])`
//!   (kept in one lazy min-heap per cluster pair). Reduced costs
//!   `w(a,b) + π_a − π_b` stay non-negative, so each search is a dense
//!   Dijkstra over the `N` clusters: `O(n N² + moves · N log n)` in all, on
//!   `O(n N)` residual edges. Each partial assignment is optimal for the
//!   points placed so far (the SSP invariant), hence the final one is optimal.
//! - **Update step**: `c_e = mean of its points`.
//!
//! Both steps never increase `J` (the previous assignment is feasible for the
//! new centroids, and the mean minimises the squared distances), so the
//! reported objective history is non-increasing.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use tensor_core::TchResultExt;
use tensor_core::tch::{Device, Kind, Tensor};

use crate::error::{Error, Result, check_finite, check_split};

pub use tensor_core::rng::SplitMix64;

/// Heap entry: `(key, point)`, ordered so that `BinaryHeap` pops the smallest
/// key first (ties: the smallest point index, for determinism).
#[derive(Debug, Clone, Copy)]
struct Entry(f64, u32);

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        other.0.total_cmp(&self.0).then(other.1.cmp(&self.1))
    }
}

/// Exact minimum-cost balanced assignment: `cost` is row-major `[n, k]`
/// (point `i`, cluster `e`); every cluster takes at most `capacity` points and
/// every point exactly one cluster (`n <= k * capacity`; with equality every
/// cluster gets exactly `capacity`). Returns the cluster of each point,
/// minimising `Σ_i cost[i][a(i)]` (up to floating-point rounding in the
/// reduced costs, ~1e-12 relative).
pub fn balanced_assignment(
    cost: &[f64],
    n: usize,
    k: usize,
    capacity: usize,
) -> Result<Vec<usize>> {
    if k == 0 {
        return Err(Error::config("balanced_assignment: no clusters"));
    }
    if cost.len() != n * k {
        return Err(Error::config(format!(
            "balanced_assignment: cost has {} entries, expected n * k = {n} * {k}",
            cost.len()
        )));
    }
    if n > k * capacity {
        return Err(Error::config(format!(
            "balanced_assignment: {n} points do not fit {k} clusters of capacity {capacity}"
        )));
    }
    if n > u32::MAX as usize {
        return Err(Error::config("balanced_assignment: too many points"));
    }
    if cost.iter().any(|c| !c.is_finite()) {
        return Err(Error::NonFinite {
            what: "balanced_assignment cost".into(),
        });
    }
    const NONE: usize = usize::MAX;
    // heaps[a * k + b]: points of cluster a keyed by cost[j][b] - cost[j][a] (lazy deletion).
    let mut heaps: Vec<BinaryHeap<Entry>> = (0..k * k).map(|_| BinaryHeap::new()).collect();
    let mut assign = vec![NONE; n];
    let mut load = vec![0usize; k];
    let mut pi = vec![0f64; k];
    let mut dist = vec![0f64; k];
    let mut done = vec![false; k];
    // pred[b] = (a, j): reach b from a by moving point j; (NONE, _) = from the new point.
    let mut pred = vec![(NONE, 0u32); k];

    let push = |heaps: &mut Vec<BinaryHeap<Entry>>, j: usize, b: usize| {
        let row = &cost[j * k..(j + 1) * k];
        for x in 0..k {
            if x != b {
                heaps[b * k + x].push(Entry(row[x] - row[b], j as u32));
            }
        }
    };

    for i in 0..n {
        let row = &cost[i * k..(i + 1) * k];
        for a in 0..k {
            dist[a] = row[a] - pi[a];
            pred[a] = (NONE, 0);
            done[a] = false;
        }
        for _ in 0..k {
            let mut a = NONE;
            for e in 0..k {
                if !done[e] && (a == NONE || dist[e] < dist[a]) {
                    a = e;
                }
            }
            done[a] = true;
            if load[a] == 0 {
                continue;
            }
            for b in 0..k {
                if done[b] || b == a {
                    continue;
                }
                let h = &mut heaps[a * k + b];
                while let Some(top) = h.peek() {
                    if assign[top.1 as usize] == a {
                        break;
                    }
                    h.pop();
                }
                if let Some(&Entry(w, j)) = h.peek() {
                    let nd = dist[a] + w + pi[a] - pi[b];
                    if nd < dist[b] {
                        dist[b] = nd;
                        pred[b] = (a, j);
                    }
                }
            }
        }
        // Cheapest free cluster by true distance; then potentials := true distances.
        let mut f = NONE;
        for e in 0..k {
            if load[e] < capacity && (f == NONE || dist[e] + pi[e] < dist[f] + pi[f]) {
                f = e;
            }
        }
        for e in 0..k {
            pi[e] += dist[e];
        }
        let mut b = f;
        loop {
            let (a, j) = pred[b];
            if a == NONE {
                assign[i] = b;
                push(&mut heaps, i, b);
                break;
            }
            assign[j as usize] = b;
            push(&mut heaps, j as usize, b);
            b = a;
        }
        load[f] += 1;
    }
    Ok(assign)
}

/// Rows scaled to unit L2 norm (zero rows stay zero), as `f64` on the CPU.
pub fn normalize_rows(t: &Tensor) -> Result<Tensor> {
    let s = t.size();
    if s.len() != 2 {
        return Err(tensor_core::Error::shape("normalize_rows", "[n, d]", s).into());
    }
    let x = t
        .f_detach()?
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Double)
        .op("normalize_rows")?;
    let norm = x
        .f_norm_scalaropt_dim(2, [1i64].as_slice(), true)?
        .f_clamp_min(1e-30)?;
    Ok(x.f_div(&norm)?)
}

/// Configuration of [`balanced_kmeans`]. Defaults follow METHODS.md §3.1:
/// seed 0, at most 1000 iterations.
#[derive(Debug, Clone, PartialEq)]
pub struct KMeansConfig {
    pub num_clusters: usize,
    pub seed: u64,
    pub max_iters: usize,
    /// Stop early when the relative decrease of the objective is at most
    /// this (0 = run until the assignment no longer changes).
    pub tol: f64,
}

impl KMeansConfig {
    pub fn new(num_clusters: usize) -> Self {
        Self {
            num_clusters,
            seed: 0,
            max_iters: 1000,
            tol: 0.0,
        }
    }
}

/// Outcome of [`balanced_kmeans`].
#[derive(Debug)]
pub struct KMeansResult {
    /// Cluster of each point; every cluster holds exactly `n / N` points.
    pub labels: Vec<usize>,
    /// `[N, d]` (f64, CPU): the mean of each cluster's points.
    pub centroids: Tensor,
    /// Final `J = Σ_i ‖x_i − c_{a(i)}‖²`.
    pub objective: f64,
    /// `J` after each iteration (assignment, then update); non-increasing.
    pub history: Vec<f64>,
    pub iterations: usize,
    /// The assignment stopped changing (or the `tol` criterion held).
    pub converged: bool,
}

/// Squared distances `[n, N]` row-major on the host.
fn sq_dists(x: &Tensor, x2: &Tensor, c: &Tensor) -> Result<Vec<f64>> {
    let c2 = c
        .f_square()?
        .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Double)?;
    let d = x
        .f_matmul(&c.f_transpose(0, 1)?)?
        .f_mul_scalar(-2.0)?
        .f_add(x2)?
        .f_add(&c2.f_unsqueeze(0)?)?
        .f_clamp_min(0.0)?
        .f_contiguous()?
        .f_view([-1])?;
    Ok(Vec::<f64>::try_from(&d)?)
}

fn labels_tensor(labels: &[usize]) -> Tensor {
    let v: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    Tensor::from_slice(&v)
}

/// Means of each cluster's points: `[N, d]`.
fn centroids_of(x: &Tensor, labels: &[usize], k: usize) -> Result<Tensor> {
    let lab = labels_tensor(labels);
    let d = x.size()[1];
    let sums =
        Tensor::f_zeros([k as i64, d], (Kind::Double, Device::Cpu))?.f_index_add(0, &lab, x)?;
    let counts = Tensor::f_zeros([k as i64], (Kind::Double, Device::Cpu))?.f_index_add(
        0,
        &lab,
        &Tensor::f_ones([labels.len() as i64], (Kind::Double, Device::Cpu))?,
    )?;
    Ok(sums.f_div(&counts.f_clamp_min(1.0)?.f_unsqueeze(1)?)?)
}

fn objective_with(x: &Tensor, c: &Tensor, labels: &[usize]) -> Result<f64> {
    let lab = labels_tensor(labels);
    Ok(x.f_sub(&c.f_index_select(0, &lab)?)?
        .f_square()?
        .f_sum(Kind::Double)?
        .f_double_value(&[])?)
}

/// The k-means objective `J` of any labelling (centroids = cluster means):
/// how the random, contiguous and co-activation splits compare with k-means.
pub fn objective(points: &Tensor, labels: &[usize], num_clusters: usize) -> Result<f64> {
    let x = points
        .f_detach()?
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Double)?;
    if x.size().len() != 2 || x.size()[0] as usize != labels.len() {
        return Err(tensor_core::Error::shape(
            "kmeans::objective",
            format!("[{}, d]", labels.len()),
            x.size(),
        )
        .into());
    }
    if labels.iter().any(|&l| l >= num_clusters) {
        return Err(Error::config(format!(
            "kmeans::objective: a label is >= N = {num_clusters}"
        )));
    }
    let c = centroids_of(&x, labels, num_clusters)?;
    objective_with(&x, &c, labels)
}

/// k-means++ seeding: the first centre uniformly, each next one with
/// probability proportional to the squared distance to the nearest centre.
fn seed_plus_plus(x: &Tensor, k: usize, rng: &mut SplitMix64) -> Result<Tensor> {
    let n = x.size()[0] as usize;
    let mut chosen = vec![rng.below(n as u64) as i64];
    let dist_to = |idx: i64| -> Result<Vec<f64>> {
        let c = x.f_select(0, idx)?;
        let d =
            x.f_sub(&c)?
                .f_square()?
                .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Double)?;
        Ok(Vec::<f64>::try_from(&d)?)
    };
    let mut d2 = dist_to(chosen[0])?;
    while chosen.len() < k {
        let total: f64 = d2.iter().sum();
        let next = if total > 0.0 {
            let r = rng.next_f64() * total;
            let mut acc = 0.0;
            let mut pick = n - 1;
            for (i, &d) in d2.iter().enumerate() {
                acc += d;
                if acc > r && d > 0.0 {
                    pick = i;
                    break;
                }
            }
            pick
        } else {
            rng.below(n as u64) as usize
        };
        chosen.push(next as i64);
        let nd = dist_to(next as i64)?;
        for (a, b) in d2.iter_mut().zip(nd) {
            *a = a.min(b);
        }
    }
    Ok(x.f_index_select(0, &Tensor::from_slice(&chosen))?)
}

/// Balanced k-means of the rows of `points` (`[n, d]`, used as given:
/// normalise first with [`normalize_rows`] for EMoE) into `N` clusters of
/// exactly `n / N` points. Deterministic for a seed.
pub fn balanced_kmeans(points: &Tensor, cfg: &KMeansConfig) -> Result<KMeansResult> {
    let s = points.size();
    if s.len() != 2 || s[0] == 0 || s[1] == 0 {
        return Err(
            tensor_core::Error::shape("balanced_kmeans points", "[n, d], n, d > 0", s).into(),
        );
    }
    let k = cfg.num_clusters;
    let m = check_split(s[0], k)? as usize;
    if cfg.max_iters == 0 {
        return Err(Error::config(
            "balanced_kmeans: max_iters must be at least 1",
        ));
    }
    check_finite("balanced_kmeans points", points)?;
    let n = s[0] as usize;
    let x = points
        .f_detach()?
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Double)?
        .f_contiguous()?;
    let x2 = x
        .f_square()?
        .f_sum_dim_intlist([1i64].as_slice(), true, Kind::Double)?;
    let mut rng = SplitMix64::new(cfg.seed);
    let mut c = seed_plus_plus(&x, k, &mut rng)?;
    let mut labels: Option<Vec<usize>> = None;
    let mut history = Vec::new();
    let mut converged = false;
    for _ in 0..cfg.max_iters {
        let cost = sq_dists(&x, &x2, &c)?;
        let new = balanced_assignment(&cost, n, k, m)?;
        let changed = labels.as_ref() != Some(&new);
        c = centroids_of(&x, &new, k)?;
        let obj = objective_with(&x, &c, &new)?;
        let prev = history.last().copied();
        history.push(obj);
        labels = Some(new);
        if !changed {
            converged = true;
            break;
        }
        if let Some(p) = prev
            && cfg.tol > 0.0
            && p - obj <= cfg.tol * p.abs()
        {
            converged = true;
            break;
        }
    }
    let labels = labels.expect("at least one iteration ran");
    Ok(KMeansResult {
        objective: *history.last().expect("at least one iteration ran"),
        iterations: history.len(),
        labels,
        centroids: c,
        history,
        converged,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The minimum over every balanced labelling of `n` points into `k`
    /// clusters of at most `cap`, by exhaustive recursion.
    fn brute_force(cost: &[f64], n: usize, k: usize, cap: usize) -> f64 {
        struct Search<'a> {
            cost: &'a [f64],
            n: usize,
            k: usize,
            cap: usize,
            load: Vec<usize>,
            best: f64,
        }
        impl Search<'_> {
            fn go(&mut self, i: usize, acc: f64) {
                if i == self.n {
                    self.best = self.best.min(acc);
                    return;
                }
                for e in 0..self.k {
                    if self.load[e] < self.cap {
                        self.load[e] += 1;
                        self.go(i + 1, acc + self.cost[i * self.k + e]);
                        self.load[e] -= 1;
                    }
                }
            }
        }
        let mut s = Search {
            cost,
            n,
            k,
            cap,
            load: vec![0; k],
            best: f64::INFINITY,
        };
        s.go(0, 0.0);
        s.best
    }

    fn total(cost: &[f64], k: usize, a: &[usize]) -> f64 {
        a.iter().enumerate().map(|(i, &e)| cost[i * k + e]).sum()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// The min-cost-flow assignment equals the brute-force optimum and is balanced.
        #[test]
        fn assignment_is_optimal(seed in any::<u64>(), k in 1usize..=4, cap in 1usize..=3, negative in any::<bool>()) {
            let n = k * cap;
            prop_assume!(n <= 9);
            let mut rng = SplitMix64::new(seed);
            let cost: Vec<f64> = (0..n * k)
                .map(|_| if negative { rng.next_f64() * 2.0 - 1.0 } else { rng.next_f64() })
                .collect();
            let a = balanced_assignment(&cost, n, k, cap).unwrap();
            let mut load = vec![0; k];
            for &e in &a { load[e] += 1; }
            prop_assert!(load.iter().all(|&l| l == cap));
            let best = brute_force(&cost, n, k, cap);
            prop_assert!((total(&cost, k, &a) - best).abs() <= 1e-9, "{} vs {}", total(&cost, k, &a), best);
        }

        /// With spare capacity (n < k * cap) it is still optimal.
        #[test]
        fn assignment_with_spare_capacity(seed in any::<u64>(), n in 1usize..=7) {
            let (k, cap) = (3, 3);
            let mut rng = SplitMix64::new(seed);
            let cost: Vec<f64> = (0..n * k).map(|_| rng.next_f64()).collect();
            let a = balanced_assignment(&cost, n, k, cap).unwrap();
            let best = brute_force(&cost, n, k, cap);
            prop_assert!((total(&cost, k, &a) - best).abs() <= 1e-9);
        }
    }

    /// Optimality certificate at a size brute force cannot reach: a full
    /// balanced assignment is optimal iff the cluster graph with edge
    /// weights `w(a, b) = min_{j ∈ a} (cost[j][b] − cost[j][a])` has no
    /// negative cycle (Floyd–Warshall).
    #[test]
    fn large_assignment_has_no_negative_cycle() {
        let (k, cap) = (16, 24);
        let n = k * cap;
        let mut rng = SplitMix64::new(42);
        let cost: Vec<f64> = (0..n * k).map(|_| rng.next_f64()).collect();
        let a = balanced_assignment(&cost, n, k, cap).unwrap();
        let mut w = vec![f64::INFINITY; k * k];
        for (j, &e) in a.iter().enumerate() {
            for b in 0..k {
                let c = if b == e {
                    0.0
                } else {
                    cost[j * k + b] - cost[j * k + e]
                };
                w[e * k + b] = w[e * k + b].min(c);
            }
        }
        for m in 0..k {
            for i in 0..k {
                for j in 0..k {
                    let via = w[i * k + m] + w[m * k + j];
                    if via < w[i * k + j] {
                        w[i * k + j] = via;
                    }
                }
            }
        }
        assert!((0..k).all(|i| w[i * k + i] >= -1e-9));
        // And it beats the greedy balanced assignment.
        let greedy: f64 = {
            let mut load = vec![0; k];
            (0..n)
                .map(|i| {
                    let e = (0..k)
                        .filter(|&e| load[e] < cap)
                        .min_by(|&x, &y| cost[i * k + x].total_cmp(&cost[i * k + y]))
                        .unwrap();
                    load[e] += 1;
                    cost[i * k + e]
                })
                .sum()
        };
        assert!(total(&cost, k, &a) < greedy);
    }

    #[test]
    fn assignment_rejects_bad_input() {
        assert!(balanced_assignment(&[0.0; 6], 3, 2, 1).is_err());
        assert!(balanced_assignment(&[0.0; 5], 3, 2, 2).is_err());
        assert!(balanced_assignment(&[f64::NAN, 0.0, 0.0, 0.0], 2, 2, 1).is_err());
        assert!(balanced_assignment(&[], 0, 0, 1).is_err());
    }

    #[test]
    fn splitmix_is_seeded_and_uniformish() {
        let (mut a, mut b) = (SplitMix64::new(7), SplitMix64::new(7));
        assert_eq!(a.next_u64(), b.next_u64());
        // Reference value of SplitMix64 from seed 0 (Vigna's splitmix64.c).
        assert_eq!(SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
        let mut r = SplitMix64::new(1);
        let mut hist = [0usize; 4];
        for _ in 0..4000 {
            hist[r.below(4) as usize] += 1;
        }
        assert!(hist.iter().all(|&h| (900..1100).contains(&h)), "{hist:?}");
    }

    fn random_keys(n: i64, d: i64, seed: u64) -> Tensor {
        let x = tensor_core::testing::randn_seeded(&[n, d], seed, Device::Cpu).unwrap();
        normalize_rows(&x).unwrap()
    }

    #[test]
    fn kmeans_is_balanced_deterministic_and_monotone() {
        let x = random_keys(96, 16, 3);
        let cfg = KMeansConfig::new(8);
        let r1 = balanced_kmeans(&x, &cfg).unwrap();
        let r2 = balanced_kmeans(&x, &cfg).unwrap();
        assert_eq!(r1.labels, r2.labels);
        assert_eq!(r1.history, r2.history);
        let mut load = [0usize; 8];
        for &l in &r1.labels {
            load[l] += 1;
        }
        assert!(load.iter().all(|&l| l == 12), "{load:?}");
        assert!(r1.converged);
        for w in r1.history.windows(2) {
            assert!(w[1] <= w[0] + 1e-9 * w[0].abs(), "{:?}", r1.history);
        }
        assert!((objective(&x, &r1.labels, 8).unwrap() - r1.objective).abs() < 1e-9);
        let other = balanced_kmeans(&x, &KMeansConfig { seed: 99, ..cfg }).unwrap();
        assert!(other.labels.iter().all(|&l| l < 8));
    }

    #[test]
    fn kmeans_recovers_planted_balanced_clusters() {
        // 4 well separated directions, 8 noisy copies each, shuffled.
        let centres = tensor_core::testing::randn_seeded(&[4, 32], 11, Device::Cpu).unwrap();
        let noise = tensor_core::testing::randn_seeded(&[32, 32], 12, Device::Cpu).unwrap();
        let mut order: Vec<i64> = (0..32).collect();
        SplitMix64::new(5).shuffle(&mut order);
        let truth: Vec<i64> = order.iter().map(|i| i % 4).collect();
        let x = centres
            .index_select(0, &Tensor::from_slice(&truth))
            .f_add(&noise.f_mul_scalar(0.05).unwrap())
            .unwrap();
        let r = balanced_kmeans(&normalize_rows(&x).unwrap(), &KMeansConfig::new(4)).unwrap();
        for a in 0..32 {
            for b in 0..32 {
                assert_eq!(truth[a] == truth[b], r.labels[a] == r.labels[b]);
            }
        }
    }

    #[test]
    fn kmeans_rejects_bad_input() {
        let x = random_keys(12, 4, 1);
        assert!(matches!(
            balanced_kmeans(&x, &KMeansConfig::new(5)),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            balanced_kmeans(&x, &KMeansConfig::new(0)),
            Err(Error::Config(_))
        ));
        let bad = x
            .f_index_fill(0, &Tensor::from_slice(&[2i64]), f64::NAN)
            .unwrap();
        assert!(matches!(
            balanced_kmeans(&bad, &KMeansConfig::new(3)),
            Err(Error::NonFinite { .. })
        ));
    }
}
