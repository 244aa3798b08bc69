//! Balanced k-means on the FFN's key vectors: step 1 of EMoE (Qiu et al.
//! 2023, "Unlocking Emergent Modularity in LLMs";
//! docs/emergent-split.md, Method, part 1) and MoEfication's `param_cluster` (Zhang et al. 2022).
//!
//! Points are the L2-normalised rows of `W1` (the gate rows `W_G` for
//! SwiGLU). With `N` clusters of exactly `m = n / N` points each, Lloyd's
//! iterations minimise the k-means objective
//!
//! `J(a, C) = Σ_i ‖x_i − c_{a(i)}‖²`  subject to  `|{i : a(i) = e}| = m` for every `e`.
//!
//! - **Gram form**: everything runs on `G = X Xᵀ` (one `O(n² d)` product,
//!   shared by all starts): `x_i · c_e = S[e][i] / m` with
//!   `S[e][i] = Σ_{j ∈ e} G[j][i]`, `‖c_e‖² = Σ_{j ∈ e} S[e][j] / m²`,
//!   `J = Σ_i ‖x_i‖² − m Σ_e ‖c_e‖²`; moving a point updates two rows of `S`.
//! - **Seeding**: k-means++ (D² sampling) driven by [`SplitMix64`], greedy
//!   with `2 + ⌊ln N⌋` candidates per centre by default (as scikit-learn and
//!   `k-means-constrained`), so a seed fixes the result.
//! - **Assignment step** ([`KMeansSolver`]): [`balanced_assignment`] solves
//!   the transportation problem `min Σ_i cost[i][a(i)]` with cluster
//!   capacities `m` *exactly*, by successive shortest paths with potentials
//!   (the Hungarian method with capacities). Points join one at a time; the
//!   shortest augmenting path runs through clusters, where the edge `a → b`
//!   moves the point of `a` that is cheapest to move, at cost
//!   `min_{j ∈ a} (cost[j][b] − cost[j][a])`, and ends at a sink reached from
//!   every non-full cluster. Reduced costs `w(a,b) + π_a − π_b` stay
//!   non-negative, so each search is a Dijkstra over the `N` clusters that
//!   stops when the sink is settled: `O(N)` per point whose cheapest priced
//!   cluster has room, `O(N²)` at worst. Each partial assignment is optimal
//!   for the points placed so far (the SSP invariant), hence the final one is
//!   optimal. Lloyd's iterations warm-start it with the previous step's dual
//!   prices ([`balanced_assignment_warm`]), which changes the speed, never
//!   the result. The alternative, [`greedy_balanced_assignment`], has no
//!   optimality guarantee.
//! - **Update step**: `c_e = mean of its points`.
//! - **Restarts**: `n_init` seeded starts (default 10, as
//!   `k-means-constrained`) run in parallel with rayon; the lowest `J` wins.
//! - **Polish** (`swap_refine`, default on): the kept start then exchanges
//!   pairs of points between clusters whenever that lowers `J` with the
//!   centroids following the points (Hartigan-style; the balance is kept),
//!   alternating with Lloyd until neither changes anything.
//!
//! The assignment step (exact or a greedy step that is kept only if it is
//! no worse than the previous labels), the update step and every applied
//! swap never increase `J`, so the reported objective history is
//! non-increasing.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tensor_core::TchResultExt;
use tensor_core::tch::{Device, Kind, Tensor};

use crate::error::{Error, Result, check_split};

pub use tensor_core::rng::SplitMix64;

fn check_assignment_input(cost: &[f64], n: usize, k: usize, capacity: usize) -> Result<()> {
    if k == 0 {
        return Err(Error::config("balanced assignment: no clusters"));
    }
    if cost.len() != n * k {
        return Err(Error::config(format!(
            "balanced assignment: cost has {} entries, expected n * k = {n} * {k}",
            cost.len()
        )));
    }
    if n > k * capacity {
        return Err(Error::config(format!(
            "balanced assignment: {n} points do not fit {k} clusters of capacity {capacity}"
        )));
    }
    if n > u32::MAX as usize {
        return Err(Error::config("balanced assignment: too many points"));
    }
    if cost.iter().any(|c| !c.is_finite()) {
        return Err(Error::NonFinite {
            what: "balanced assignment cost".into(),
        });
    }
    Ok(())
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
    check_assignment_input(cost, n, k, capacity)?;
    Ok(ssp(cost, n, k, capacity, None))
}

/// [`balanced_assignment`] warm-started from cluster prices: `prices[e]`
/// (length `k`) on entry is any guess of the dual prices (e.g. the previous
/// Lloyd iteration's), on exit the optimal ones, such that every point's
/// cluster minimises `cost[i][e] − prices[e]`. The result is optimal for
/// *any* entry prices; good ones only make it faster (with exact prices
/// nearly every point joins its cheapest priced cluster in `O(k)`).
/// Warm prices are used only when `n = k * capacity` (they enter as
/// per-cluster sink costs, a constant for complete balanced assignments);
/// otherwise they are ignored on entry.
pub fn balanced_assignment_warm(
    cost: &[f64],
    n: usize,
    k: usize,
    capacity: usize,
    prices: &mut Vec<f64>,
) -> Result<Vec<usize>> {
    check_assignment_input(cost, n, k, capacity)?;
    if prices.len() != k {
        return Err(Error::config(format!(
            "balanced_assignment_warm: {} prices for {k} clusters",
            prices.len()
        )));
    }
    if prices.iter().any(|p| !p.is_finite()) {
        return Err(Error::NonFinite {
            what: "balanced assignment prices".into(),
        });
    }
    Ok(ssp(cost, n, k, capacity, Some(prices)))
}

/// Successive shortest paths over the cluster graph with a sink node `t`.
///
/// Nodes: the `k` clusters and `t`. Edges: `a → b` (move the cheapest point
/// of `a` to `b`, cost `w(a, b) = min_{j ∈ a} cost[j][b] − cost[j][a]`, kept
/// per cluster in [`MoveTable`]) and `a → t` for non-full `a`, cost `σ_a`
/// (0, or `−prices_a` when warm: `Σ_a m σ_a` is a constant once every
/// cluster is full). Potentials `π` keep reduced costs `w + π_a − π_b`
/// non-negative; they start at `π_a = prices_a`, `π_t = 0`, so every reduced
/// sink cost starts at 0. Each new point runs Dijkstra from the source
/// (`dist_a = cost[i][a] − π_a`) and stops as soon as `t` is settled;
/// potentials then move by `min(dist_v, dist_t)`, which keeps every reduced
/// cost non-negative. Each partial assignment is optimal for the points
/// placed so far (the SSP invariant), hence the final one is optimal.
fn ssp(
    cost: &[f64],
    n: usize,
    k: usize,
    capacity: usize,
    prices: Option<&mut Vec<f64>>,
) -> Vec<usize> {
    const NONE: usize = usize::MAX;
    let warm = n == k * capacity;
    let mut pi = match &prices {
        Some(p) if warm => p.to_vec(),
        _ => vec![0f64; k],
    };
    let sink: Vec<f64> = pi.iter().map(|p| -p).collect();
    let mut pt = 0f64;
    let mut moves = MoveTable::new(cost, n, k);
    let mut assign = vec![NONE; n];
    let mut dist = vec![0f64; k];
    let mut done = vec![false; k];
    // pred[b] = (a, j): reach b from a by moving point j; (NONE, _) = from the new point.
    let mut pred = vec![(NONE, 0usize); k];

    for i in 0..n {
        let row = &cost[i * k..(i + 1) * k];
        for a in 0..k {
            dist[a] = row[a] - pi[a];
            pred[a] = (NONE, 0);
            done[a] = false;
        }
        let (mut dt, mut last) = (f64::INFINITY, NONE);
        loop {
            let mut a = NONE;
            for e in 0..k {
                if !done[e] && (a == NONE || dist[e] < dist[a]) {
                    a = e;
                }
            }
            // The sink is settled before any node at least as far.
            if a == NONE || dist[a] >= dt {
                break;
            }
            done[a] = true;
            let load = moves.members[a].len();
            if load < capacity {
                let via = dist[a] + sink[a] + pi[a] - pt;
                if via < dt {
                    dt = via;
                    last = a;
                }
            }
            // Reduced costs are non-negative: nothing reached from `a` beats `dt`.
            if load == 0 || dist[a] >= dt {
                continue;
            }
            let best = moves.row(a);
            for b in 0..k {
                if done[b] {
                    continue;
                }
                let (w, j) = best[b];
                let nd = dist[a] + w + pi[a] - pi[b];
                if nd < dist[b] {
                    dist[b] = nd;
                    pred[b] = (a, j as usize);
                }
            }
        }
        for e in 0..k {
            pi[e] += dist[e].min(dt);
        }
        pt += dt;
        let mut b = last;
        loop {
            let (a, j) = pred[b];
            if a == NONE {
                assign[i] = b;
                moves.add(i, b);
                break;
            }
            moves.remove(j, a);
            assign[j] = b;
            moves.add(j, b);
            b = a;
        }
    }
    if let Some(p) = prices {
        // Prices are relative: anchor the mean at 0.
        let mean = pi.iter().sum::<f64>() / k as f64;
        for (p, q) in p.iter_mut().zip(&pi) {
            *p = q - mean;
        }
    }
    assign
}

/// For each cluster `a` and target `b`, the cheapest move
/// `w(a, b) = min_{j ∈ a} cost[j][b] − cost[j][a]` and its point, kept
/// incrementally: adding a point updates the row in `O(k)`; removing one
/// recomputes only the entries it realised, `O(|a|)` each.
struct MoveTable<'a> {
    cost: &'a [f64],
    k: usize,
    members: Vec<Vec<usize>>,
    /// Position of each point in its cluster's `members`.
    pos: Vec<usize>,
    best: Vec<(f64, u32)>,
}

impl<'a> MoveTable<'a> {
    fn new(cost: &'a [f64], n: usize, k: usize) -> Self {
        Self {
            cost,
            k,
            members: vec![Vec::new(); k],
            pos: vec![0; n],
            best: vec![(f64::INFINITY, u32::MAX); k * k],
        }
    }

    fn add(&mut self, j: usize, a: usize) {
        self.pos[j] = self.members[a].len();
        self.members[a].push(j);
        let k = self.k;
        let row = &self.cost[j * k..(j + 1) * k];
        let best = &mut self.best[a * k..(a + 1) * k];
        for b in 0..k {
            let w = row[b] - row[a];
            if w < best[b].0 {
                best[b] = (w, j as u32);
            }
        }
    }

    fn remove(&mut self, j: usize, a: usize) {
        let p = self.pos[j];
        self.members[a].swap_remove(p);
        if let Some(&moved) = self.members[a].get(p) {
            self.pos[moved] = p;
        }
        let k = self.k;
        for b in 0..k {
            if self.best[a * k + b].1 as usize != j {
                continue;
            }
            let mut e = (f64::INFINITY, u32::MAX);
            for &q in &self.members[a] {
                let w = self.cost[q * k + b] - self.cost[q * k + a];
                if w < e.0 {
                    e = (w, q as u32);
                }
            }
            self.best[a * k + b] = e;
        }
    }

    /// `(w(a, b), point)` for every `b` (`w(a, a) = 0`; `∞` for an empty `a`).
    fn row(&self, a: usize) -> &[(f64, u32)] {
        &self.best[a * self.k..(a + 1) * self.k]
    }
}

/// The cheap balanced assignment of [`KMeansSolver::GreedyBalanced`]: points
/// are placed in decreasing order of their margin (second-smallest minus
/// smallest cost; ties by index), each into its cheapest cluster that still
/// has room. `O(n k + n log n)`, no optimality guarantee. Same contract as
/// [`balanced_assignment`].
pub fn greedy_balanced_assignment(
    cost: &[f64],
    n: usize,
    k: usize,
    capacity: usize,
) -> Result<Vec<usize>> {
    check_assignment_input(cost, n, k, capacity)?;
    let mut best = vec![0usize; n];
    let mut margin = vec![0f64; n];
    for i in 0..n {
        let row = &cost[i * k..(i + 1) * k];
        let (mut b, mut c1, mut c2) = (0usize, f64::INFINITY, f64::INFINITY);
        for (e, &c) in row.iter().enumerate() {
            if c < c1 {
                c2 = c1;
                c1 = c;
                b = e;
            } else if c < c2 {
                c2 = c;
            }
        }
        best[i] = b;
        margin[i] = if c2.is_finite() { c2 - c1 } else { 0.0 };
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| margin[b].total_cmp(&margin[a]).then(a.cmp(&b)));
    let mut load = vec![0usize; k];
    let mut assign = vec![0usize; n];
    for i in order {
        let e = if load[best[i]] < capacity {
            best[i]
        } else {
            let row = &cost[i * k..(i + 1) * k];
            (0..k)
                .filter(|&e| load[e] < capacity)
                .min_by(|&x, &y| row[x].total_cmp(&row[y]).then(x.cmp(&y)))
                .expect("n <= k * capacity leaves room")
        };
        load[e] += 1;
        assign[i] = e;
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

/// The balanced assignment step of [`balanced_kmeans`] (docs/emergent-split.md,
/// Method, part 1, open choice `kmeans_solver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KMeansSolver {
    /// Exact: [`balanced_assignment`] (successive shortest paths); every
    /// assignment step is optimal for the current centroids, so the
    /// objective never increases.
    #[default]
    MinCostFlow,
    /// Fast heuristic: [`greedy_balanced_assignment`]. A step whose greedy
    /// labels cost more than the previous labels (for the new centroids) is
    /// rejected and the run stops there, so the objective still never
    /// increases, but the fixed point is not certified optimal.
    GreedyBalanced,
}

fn default_max_iters() -> usize {
    1000
}

fn default_true() -> bool {
    true
}

fn default_n_init() -> usize {
    10
}

/// Configuration of [`balanced_kmeans`]. Defaults follow docs/emergent-split.md, Method, part 1
/// (seed 0, at most 1000 iterations, exact min-cost-flow assignment); the
/// rest follow `k-means-constrained`, the reference implementation
/// (`n_init = 10` restarts, greedy k-means++ with `2 + ⌊ln N⌋` candidates),
/// plus the swap polish of the kept start. JSON: every field but
/// `num_clusters` may be omitted and then takes its default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KMeansConfig {
    pub num_clusters: usize,
    #[serde(default)]
    pub seed: u64,
    /// Assignment steps per start (Lloyd's iterations, including those
    /// between swap rounds).
    #[serde(default = "default_max_iters")]
    pub max_iters: usize,
    /// Stop early when the relative decrease of the objective is at most
    /// this (0 = run until the assignment no longer changes).
    #[serde(default)]
    pub tol: f64,
    /// Independent k-means++ starts; the run with the lowest objective is
    /// kept (ties: the earliest start). Start 0 uses `seed` itself, start
    /// `r > 0` the `r`-th output of `SplitMix64(seed)`, so `n_init = 1`
    /// reproduces a single seeded run. Starts run in parallel (rayon); the
    /// result does not depend on the number of threads.
    #[serde(default = "default_n_init")]
    pub n_init: usize,
    /// The open choice `kmeans_solver` (docs/emergent-split.md, Method, part 1):
    /// `min_cost_flow` (default) or `greedy_balanced`.
    #[serde(default)]
    pub kmeans_solver: KMeansSolver,
    /// Candidates per k-means++ draw (greedy k-means++); `None` = scikit-learn's
    /// `2 + ⌊ln N⌋`, as in `k-means-constrained`; `Some(1)` = plain k-means++.
    #[serde(default)]
    pub local_trials: Option<usize>,
    /// Polish the kept start: once Lloyd's iterations reach a fixed point,
    /// exchange pairs of points between clusters whenever that lowers `J`
    /// with the centroids following the points (Hartigan-style local search,
    /// which keeps the balance); alternate with Lloyd until neither changes
    /// anything. `false` = plain Lloyd, as `k-means-constrained`.
    #[serde(default = "default_true")]
    pub swap_refine: bool,
}

impl KMeansConfig {
    pub fn new(num_clusters: usize) -> Self {
        Self {
            num_clusters,
            seed: 0,
            max_iters: default_max_iters(),
            tol: 0.0,
            n_init: default_n_init(),
            kmeans_solver: KMeansSolver::MinCostFlow,
            local_trials: None,
            swap_refine: true,
        }
    }

    /// Candidates per k-means++ draw (see [`KMeansConfig::local_trials`]).
    pub fn seeding_trials(&self) -> usize {
        self.local_trials
            .unwrap_or(2 + (self.num_clusters.max(1) as f64).ln() as usize)
            .max(1)
    }

    /// The seed of each start (see [`KMeansConfig::n_init`]).
    pub fn start_seeds(&self) -> Vec<u64> {
        let mut master = SplitMix64::new(self.seed);
        (0..self.n_init)
            .map(|r| if r == 0 { self.seed } else { master.next_u64() })
            .collect()
    }
}

/// Outcome of [`balanced_kmeans`].
#[derive(Debug)]
pub struct KMeansResult {
    /// Cluster of each point; every cluster holds exactly `n / N` points.
    pub labels: Vec<usize>,
    /// `[N, d]` (f64, CPU): the mean of each cluster's points.
    pub centroids: Tensor,
    /// Final `J = Σ_i ‖x_i − c_{a(i)}‖²` (recomputed from the points).
    pub objective: f64,
    /// `J` of the kept start after its first assignment, after each Lloyd
    /// iteration that changed the labels and after each round of swaps;
    /// non-increasing.
    pub history: Vec<f64>,
    /// Assignment steps of the kept start.
    pub iterations: usize,
    /// The kept start reached a fixed point (labels unchanged, or the `tol`
    /// criterion, or a rejected greedy step) rather than `max_iters`.
    pub converged: bool,
    /// Index of the kept start (`0..n_init`).
    pub best_start: usize,
    /// `J` of every start after Lloyd's iterations (before the polish), in
    /// start order.
    pub start_objectives: Vec<f64>,
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

/// The points as seen through their Gram matrix `G = X Xᵀ` (`[n, n]`, f64,
/// row-major): every quantity Lloyd's iterations need is a sum of entries of
/// `G`, because each cluster holds exactly `m` points:
///
/// - `x_i · c_e = (1/m) S[e][i]` with `S[e][i] = Σ_{j ∈ e} G[j][i]`;
/// - `‖c_e‖² = (1/m²) Σ_{j ∈ e} S[e][j]`;
/// - `cost[i][e] = ‖c_e‖² − 2 x_i · c_e` (= `‖x_i − c_e‖² − ‖x_i‖²`; the
///   dropped term is the same for every cluster of `i`, so the balanced
///   assignment is unchanged);
/// - `J = Σ_i ‖x_i‖² − m Σ_e ‖c_e‖²`.
///
/// Moving point `j` from `a` to `b` updates `S[a] −= G[j]`, `S[b] += G[j]`,
/// so an iteration costs `O(n · moved)` instead of `O(n N d)`, and `G` (one
/// matmul) is shared by all starts.
struct Gram {
    n: usize,
    g: Vec<f64>,
    /// `‖x_i‖² = G[i][i]`.
    x2: Vec<f64>,
    x2_sum: f64,
    x2_max: f64,
}

impl Gram {
    fn new(x: &[f64], n: usize, d: usize) -> Self {
        let g = crate::gram::gram(x, n, d);
        let x2: Vec<f64> = (0..n).map(|i| g[i * n + i]).collect();
        let x2_sum = x2.iter().sum();
        let x2_max = x2.iter().copied().fold(0.0, f64::max);
        Self {
            n,
            g,
            x2,
            x2_sum,
            x2_max,
        }
    }

    fn row(&self, i: usize) -> &[f64] {
        &self.g[i * self.n..(i + 1) * self.n]
    }

    /// `‖x_i − x_j‖²`, clamped at 0.
    fn dist2(&self, i: usize, j: usize) -> f64 {
        (self.x2[i] + self.x2[j] - 2.0 * self.g[i * self.n + j]).max(0.0)
    }
}

/// k-means++ seeding (Arthur & Vassilvitskii 2007): the first centre
/// uniformly, each next one drawn with probability proportional to the
/// squared distance to the nearest centre. With `trials > 1`, the greedy
/// variant of scikit-learn and `k-means-constrained`: draw `trials`
/// candidates that way and keep the one that lowers the potential
/// `Σ_i min_c ‖x_i − c‖²` most (ties: the first drawn). Returns the indices
/// of the chosen points.
fn seed_plus_plus(gram: &Gram, k: usize, trials: usize, rng: &mut SplitMix64) -> Vec<usize> {
    let n = gram.n;
    let mut chosen = vec![rng.below(n as u64) as usize];
    let mut d2: Vec<f64> = (0..n).map(|i| gram.dist2(i, chosen[0])).collect();
    let mut cand_d2 = vec![0f64; n];
    let mut best_d2 = vec![0f64; n];
    while chosen.len() < k {
        let total: f64 = d2.iter().sum();
        let mut best: Option<(f64, usize)> = None;
        for _ in 0..trials.max(1) {
            let cand = if total > 0.0 {
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
            let mut pot = 0.0;
            for (i, (c, &d)) in cand_d2.iter_mut().zip(&d2).enumerate() {
                *c = d.min(gram.dist2(i, cand));
                pot += *c;
            }
            if best.is_none_or(|(p, _)| pot < p) {
                best = Some((pot, cand));
                std::mem::swap(&mut best_d2, &mut cand_d2);
            }
        }
        let (_, next) = best.expect("at least one trial");
        chosen.push(next);
        std::mem::swap(&mut d2, &mut best_d2);
    }
    chosen
}

fn assign(
    cost: &[f64],
    n: usize,
    k: usize,
    m: usize,
    solver: KMeansSolver,
    prices: &mut Vec<f64>,
) -> Result<Vec<usize>> {
    match solver {
        KMeansSolver::MinCostFlow => balanced_assignment_warm(cost, n, k, m, prices),
        KMeansSolver::GreedyBalanced => greedy_balanced_assignment(cost, n, k, m),
    }
}

/// The state of one start: labels and the cluster sums `S[e][i] = Σ_{j ∈ e} G[j][i]`.
struct Lloyd<'g> {
    gram: &'g Gram,
    k: usize,
    m: usize,
    labels: Vec<usize>,
    /// Cluster-major `[k, n]`.
    sums: Vec<f64>,
    /// Bumped whenever a cluster's membership changes.
    version: Vec<u32>,
    /// `(version[a], version[b])` when the pair `a < b` last had no improving swap.
    clean: Vec<(u32, u32)>,
}

impl Lloyd<'_> {
    /// `J = Σ_i ‖x_i‖² − (1/m) Σ_e Σ_{j ∈ e} S[e][j]`.
    fn objective(&self) -> f64 {
        let n = self.gram.n;
        let t: f64 = self
            .labels
            .iter()
            .enumerate()
            .map(|(j, &e)| self.sums[e * n + j])
            .sum();
        self.gram.x2_sum - t / self.m as f64
    }

    /// `cost[i][e] = ‖c_e‖² − 2 x_i · c_e` for the current clusters.
    fn costs(&self, cost: &mut [f64]) {
        let (n, k) = (self.gram.n, self.k);
        let mf = self.m as f64;
        let mut c2 = vec![0f64; k];
        for (j, &e) in self.labels.iter().enumerate() {
            c2[e] += self.sums[e * n + j];
        }
        c2.iter_mut().for_each(|c| *c /= mf * mf);
        for (i, row) in cost.chunks_exact_mut(k).enumerate() {
            for (e, r) in row.iter_mut().enumerate() {
                *r = c2[e] - 2.0 * self.sums[e * n + i] / mf;
            }
        }
    }

    /// Move point `j` from its cluster to `b`.
    fn relabel(&mut self, j: usize, b: usize) {
        let n = self.gram.n;
        let a = self.labels[j];
        let g = self.gram.row(j);
        add_row(&mut self.sums[a * n..(a + 1) * n], g, -1.0);
        add_row(&mut self.sums[b * n..(b + 1) * n], g, 1.0);
        self.labels[j] = b;
        self.version[a] = self.version[a].wrapping_add(1);
        self.version[b] = self.version[b].wrapping_add(1);
    }

    /// Hartigan-style pair swaps: exchanging `i ∈ a` with `j ∈ b` keeps the
    /// balance and changes `J` by `−(2/m) gain`,
    /// `gain = (S[b][i] − S[a][i] + G_ii) + (S[a][j] − S[b][j] + G_jj) − 2 G_ij`
    /// (the centroids move with the points, which Lloyd's fixed-centroid
    /// assignment does not see). Applies every swap with `gain > 0` (above
    /// a rounding floor) in one sweep over cluster pairs; returns how many.
    fn swap_sweep(&mut self) -> usize {
        let (n, k) = (self.gram.n, self.k);
        let g = self.gram;
        let floor = 1e-12 * (1.0 + g.x2_sum / n as f64);
        let mut members: Vec<Vec<usize>> = vec![Vec::with_capacity(self.m); k];
        for (j, &e) in self.labels.iter().enumerate() {
            members[e].push(j);
        }
        let mut swaps = 0;
        let (mut p, mut q) = (vec![0f64; self.m], vec![0f64; self.m]);
        let mut order: Vec<usize> = Vec::with_capacity(self.m);
        for a in 0..k {
            for b in a + 1..k {
                // Gains of the pair depend only on the members and sums of a and b.
                if self.clean[a * k + b] == (self.version[a], self.version[b]) {
                    continue;
                }
                let mut start = 0;
                let mut swapped = false;
                loop {
                    let (sa, sb) = (
                        &self.sums[a * n..(a + 1) * n],
                        &self.sums[b * n..(b + 1) * n],
                    );
                    for (pi, &i) in p.iter_mut().zip(&members[a]) {
                        *pi = sb[i] - sa[i] + g.x2[i];
                    }
                    for (qj, &j) in q.iter_mut().zip(&members[b]) {
                        *qj = sa[j] - sb[j] + g.x2[j];
                    }
                    // b's members by decreasing q: each row stops at the first hopeless j.
                    order.clear();
                    order.extend(0..members[b].len());
                    order.sort_unstable_by(|&x, &y| q[y].total_cmp(&q[x]));
                    let qmax = q[order[0]];
                    let found = (start..members[a].len()).find_map(|ia| {
                        let i = members[a][ia];
                        // G_ij >= -‖x_i‖ ‖x_j‖ >= -reach: rows and columns below it cannot gain.
                        let reach = 2.0 * (g.x2[i] * g.x2_max).sqrt();
                        if p[ia] + qmax + reach <= floor {
                            return None;
                        }
                        let gi = g.row(i);
                        order
                            .iter()
                            .take_while(|&&jb| p[ia] + q[jb] + reach > floor)
                            .find(|&&jb| p[ia] + q[jb] - 2.0 * gi[members[b][jb]] > floor)
                            .map(|&jb| (ia, jb))
                    });
                    let Some((ia, jb)) = found else { break };
                    let (i, j) = (members[a][ia], members[b][jb]);
                    self.relabel(i, b);
                    self.relabel(j, a);
                    members[a][ia] = j;
                    members[b][jb] = i;
                    swaps += 1;
                    swapped = true;
                    // Earlier rows are looked at again in the next sweep.
                    start = ia;
                }
                if !swapped {
                    self.clean[a * k + b] = (self.version[a], self.version[b]);
                }
            }
        }
        swaps
    }
}

/// One start after Lloyd's phase, ready to be polished.
struct Run<'g> {
    st: Lloyd<'g>,
    cost: Vec<f64>,
    prices: Vec<f64>,
    history: Vec<f64>,
    iters: usize,
    /// Lloyd reached a fixed point (or the `tol` criterion, or a rejected greedy step).
    fixed: bool,
}

impl<'g> Run<'g> {
    /// k-means++ seeding, then the first assignment.
    fn seed(gram: &'g Gram, k: usize, m: usize, seed: u64, cfg: &KMeansConfig) -> Result<Self> {
        let n = gram.n;
        let mut rng = SplitMix64::new(seed);
        let centres = seed_plus_plus(gram, k, cfg.seeding_trials(), &mut rng);
        // Costs for single-point centroids c_e = x_{s_e}.
        let mut cost = vec![0f64; n * k];
        for (i, row) in cost.chunks_exact_mut(k).enumerate() {
            let g = gram.row(i);
            for (r, &s) in row.iter_mut().zip(&centres) {
                *r = gram.x2[s] - 2.0 * g[s];
            }
        }
        // Dual prices carried from one assignment step to the next (warm start).
        let mut prices = vec![0f64; k];
        let labels = assign(&cost, n, k, m, cfg.kmeans_solver, &mut prices)?;
        let mut st = Lloyd {
            gram,
            k,
            m,
            labels,
            sums: vec![0f64; k * n],
            version: vec![0; k],
            clean: vec![(u32::MAX, u32::MAX); k * k],
        };
        for (j, &e) in st.labels.iter().enumerate() {
            add_row(&mut st.sums[e * n..(e + 1) * n], gram.row(j), 1.0);
        }
        let history = vec![st.objective()];
        Ok(Self {
            st,
            cost,
            prices,
            history,
            iters: 1,
            fixed: false,
        })
    }

    /// Lloyd: assignment for the current means, then the means, until a
    /// fixed point or `max_iters` assignment steps in all.
    fn lloyd(&mut self, cfg: &KMeansConfig) -> Result<()> {
        let (n, k, m) = (self.st.gram.n, self.st.k, self.st.m);
        self.fixed = false;
        while self.iters < cfg.max_iters {
            self.st.costs(&mut self.cost);
            let new = assign(&self.cost, n, k, m, cfg.kmeans_solver, &mut self.prices)?;
            self.iters += 1;
            if cfg.kmeans_solver == KMeansSolver::GreedyBalanced {
                // Keep J monotone: a greedy step that is no better than staying put ends the run.
                let cost = &self.cost;
                let total = |l: &[usize]| -> f64 {
                    l.iter().enumerate().map(|(i, &e)| cost[i * k + e]).sum()
                };
                if total(&new) >= total(&self.st.labels) {
                    self.fixed = true;
                    return Ok(());
                }
            }
            let mut changed = false;
            for (j, &b) in new.iter().enumerate() {
                if self.st.labels[j] != b {
                    self.st.relabel(j, b);
                    changed = true;
                }
            }
            if !changed {
                self.fixed = true;
                return Ok(());
            }
            let obj = self.st.objective();
            let prev = *self.history.last().expect("non-empty");
            self.history.push(obj);
            if cfg.tol > 0.0 && prev - obj <= cfg.tol * prev.abs() {
                self.fixed = true;
                return Ok(());
            }
        }
        Ok(())
    }

    /// Alternate swap sweeps (until none improves) with Lloyd (until fixed),
    /// until neither changes anything or `max_iters` runs out.
    fn polish(&mut self, cfg: &KMeansConfig) -> Result<()> {
        while self.fixed {
            let mut swaps = 0;
            loop {
                let s = self.st.swap_sweep();
                if s == 0 {
                    break;
                }
                swaps += s;
            }
            if swaps == 0 {
                return Ok(());
            }
            self.history.push(self.st.objective());
            self.lloyd(cfg)?;
        }
        Ok(())
    }

    fn objective(&self) -> f64 {
        *self.history.last().expect("non-empty")
    }
}

/// Cluster means `[k, d]` (row-major) and `J = Σ_i ‖x_i − c_{a(i)}‖²`,
/// computed directly from the points.
fn centroids_and_objective(x: &[f64], d: usize, labels: &[usize], k: usize) -> (Vec<f64>, f64) {
    let mut c = vec![0f64; k * d];
    let mut count = vec![0usize; k];
    for (xi, &e) in x.chunks_exact(d).zip(labels) {
        add_row(&mut c[e * d..(e + 1) * d], xi, 1.0);
        count[e] += 1;
    }
    for (ce, &m) in c.chunks_exact_mut(d).zip(&count) {
        let m = m.max(1) as f64;
        ce.iter_mut().for_each(|v| *v /= m);
    }
    let j = x
        .chunks_exact(d)
        .zip(labels)
        .map(|(xi, &e)| {
            xi.iter()
                .zip(&c[e * d..(e + 1) * d])
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
        })
        .sum();
    (c, j)
}

/// `dst += sign * src`.
fn add_row(dst: &mut [f64], src: &[f64], sign: f64) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += sign * s;
    }
}

/// Balanced k-means of the rows of `points` (`[n, d]`, used as given:
/// normalise first with [`normalize_rows`] for EMoE) into `N` clusters of
/// exactly `n / N` points. Deterministic for a seed (and independent of the
/// number of threads).
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
    if cfg.n_init == 0 {
        return Err(Error::config("balanced_kmeans: n_init must be at least 1"));
    }
    if !(cfg.tol.is_finite() && cfg.tol >= 0.0) {
        return Err(Error::config(format!(
            "balanced_kmeans: tol must be finite and >= 0, got {}",
            cfg.tol
        )));
    }
    let d = s[1] as usize;
    let x = points
        .f_detach()?
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Double)?
        .f_contiguous()?
        .f_view([-1])?;
    let x = Vec::<f64>::try_from(&x)?;
    if x.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: "balanced_kmeans points".into(),
        });
    }
    let n = s[0] as usize;
    let gram = Gram::new(&x, n, d);
    let seeds = cfg.start_seeds();
    let runs: Vec<Result<Run>> = seeds
        .par_iter()
        .map(|&seed| {
            let mut run = Run::seed(&gram, k, m, seed, cfg)?;
            run.lloyd(cfg)?;
            Ok(run)
        })
        .collect();
    let mut runs = runs.into_iter().collect::<Result<Vec<_>>>()?;
    let start_objectives: Vec<f64> = runs.iter().map(Run::objective).collect();
    let best_start = (0..runs.len())
        .min_by(|&a, &b| {
            start_objectives[a]
                .total_cmp(&start_objectives[b])
                .then(a.cmp(&b))
        })
        .expect("n_init >= 1");
    let mut best = runs.swap_remove(best_start);
    drop(runs);
    if cfg.swap_refine {
        best.polish(cfg)?;
    }
    let (iterations, converged) = (best.iters, best.fixed);
    let (labels, history) = (best.st.labels, best.history);
    let (centroids, objective) = centroids_and_objective(&x, d, &labels, k);
    let centroids = Tensor::from_slice(&centroids).f_view([k as i64, d as i64])?;
    Ok(KMeansResult {
        objective,
        iterations,
        labels,
        centroids,
        history,
        converged,
        best_start,
        start_objectives,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tensor_core::testing::{device, randn_seeded};

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

        /// Warm prices (any values) change the speed, never the optimum; the
        /// returned prices certify it: every point sits in a cluster that
        /// minimises `cost − price`.
        #[test]
        fn warm_assignment_is_optimal_for_any_prices(seed in any::<u64>(), k in 1usize..=4, cap in 1usize..=2, scale in 0.0f64..3.0) {
            let n = k * cap;
            let mut rng = SplitMix64::new(seed);
            let cost: Vec<f64> = (0..n * k).map(|_| rng.next_f64()).collect();
            let mut prices: Vec<f64> = (0..k).map(|_| (rng.next_f64() - 0.5) * scale).collect();
            let a = balanced_assignment_warm(&cost, n, k, cap, &mut prices).unwrap();
            let best = brute_force(&cost, n, k, cap);
            prop_assert!((total(&cost, k, &a) - best).abs() <= 1e-9);
            for (i, &e) in a.iter().enumerate() {
                let mine = cost[i * k + e] - prices[e];
                prop_assert!((0..k).all(|f| cost[i * k + f] - prices[f] >= mine - 1e-9));
            }
            // Re-solving from the returned prices gives the same optimum.
            let again = balanced_assignment_warm(&cost, n, k, cap, &mut prices).unwrap();
            prop_assert!((total(&cost, k, &again) - best).abs() <= 1e-9);
        }

        /// The greedy assignment is balanced and never beats the exact one.
        #[test]
        fn greedy_assignment_is_balanced(seed in any::<u64>(), k in 1usize..=4, cap in 1usize..=3) {
            let n = k * cap;
            let mut rng = SplitMix64::new(seed);
            let cost: Vec<f64> = (0..n * k).map(|_| rng.next_f64()).collect();
            let a = greedy_balanced_assignment(&cost, n, k, cap).unwrap();
            let mut load = vec![0; k];
            for &e in &a { load[e] += 1; }
            prop_assert!(load.iter().all(|&l| l == cap));
            let exact = balanced_assignment(&cost, n, k, cap).unwrap();
            prop_assert!(total(&cost, k, &a) >= total(&cost, k, &exact) - 1e-9);
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

    /// Unit rows drawn on the test device; `normalize_rows` hands them to the
    /// host (k-means runs there by design), the same values on any device.
    fn random_keys(n: i64, d: i64, seed: u64) -> Tensor {
        let x = randn_seeded(&[n, d], seed, device()).unwrap();
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
        let dev = device();
        let centres = randn_seeded(&[4, 32], 11, dev).unwrap();
        let noise = randn_seeded(&[32, 32], 12, dev).unwrap();
        let mut order: Vec<i64> = (0..32).collect();
        SplitMix64::new(5).shuffle(&mut order);
        let truth: Vec<i64> = order.iter().map(|i| i % 4).collect();
        let x = centres
            .index_select(0, &Tensor::from_slice(&truth).to_device(dev))
            .f_add(&noise.f_mul_scalar(0.05).unwrap())
            .unwrap();
        let r = balanced_kmeans(&normalize_rows(&x).unwrap(), &KMeansConfig::new(4)).unwrap();
        for a in 0..32 {
            for b in 0..32 {
                assert_eq!(truth[a] == truth[b], r.labels[a] == r.labels[b]);
            }
        }
    }

    fn balanced_labels(labels: &[usize], k: usize) -> bool {
        let mut load = vec![0usize; k];
        for &l in labels {
            load[l] += 1;
        }
        load.iter().all(|&c| c == labels.len() / k)
    }

    #[test]
    fn restarts_keep_the_best_start_and_do_not_depend_on_threads() {
        let x = random_keys(192, 24, 21);
        let plain = KMeansConfig {
            n_init: 1,
            swap_refine: false,
            ..KMeansConfig::new(8)
        };
        let one = balanced_kmeans(&x, &plain).unwrap();
        let many = balanced_kmeans(
            &x,
            &KMeansConfig {
                n_init: 6,
                ..plain.clone()
            },
        )
        .unwrap();
        assert_eq!(many.start_objectives.len(), 6);
        // Start 0 of a multi-start run is the single seeded run.
        assert!((many.start_objectives[0] - one.objective).abs() <= 1e-9 * one.objective);
        let best = many
            .start_objectives
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        assert!((many.objective - best).abs() <= 1e-9 * best);
        assert_eq!(many.start_objectives[many.best_start], best);
        assert!(many.objective <= one.objective + 1e-9);
        // The same result on one thread as on the default pool.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let (labels, starts) = pool.install(|| {
            let x = random_keys(192, 24, 21);
            let r = balanced_kmeans(
                &x,
                &KMeansConfig {
                    n_init: 6,
                    ..plain.clone()
                },
            )
            .unwrap();
            (r.labels, r.start_objectives)
        });
        assert_eq!(labels, many.labels);
        assert_eq!(starts, many.start_objectives);
        assert_eq!(
            KMeansConfig::new(8).start_seeds()[0],
            0,
            "start 0 uses the seed itself"
        );
    }

    #[test]
    fn swap_polish_only_lowers_the_objective() {
        let x = random_keys(256, 16, 22);
        for k in [4usize, 16] {
            let plain = KMeansConfig {
                swap_refine: false,
                ..KMeansConfig::new(k)
            };
            let lloyd = balanced_kmeans(&x, &plain).unwrap();
            let polished = balanced_kmeans(&x, &KMeansConfig::new(k)).unwrap();
            assert!(balanced_labels(&polished.labels, k));
            assert!(polished.objective <= lloyd.objective + 1e-9, "k {k}");
            assert!(
                (objective(&x, &polished.labels, k).unwrap() - polished.objective).abs()
                    <= 1e-9 * polished.objective
            );
            for w in polished.history.windows(2) {
                assert!(w[1] <= w[0] + 1e-9 * w[0].abs(), "{:?}", polished.history);
            }
            // No single swap improves the polished labels.
            let j0 = polished.objective;
            let mut labels = polished.labels.clone();
            for a in (0..labels.len()).step_by(13) {
                for b in (1..labels.len()).step_by(17) {
                    if labels[a] != labels[b] {
                        labels.swap(a, b);
                        let j = objective(&x, &labels, k).unwrap();
                        assert!(j >= j0 - 1e-9 * j0, "swap {a} {b} lowers J: {j} < {j0}");
                        labels.swap(a, b);
                    }
                }
            }
        }
    }

    #[test]
    fn greedy_solver_is_balanced_monotone_and_close() {
        let x = random_keys(192, 24, 23);
        let exact = balanced_kmeans(
            &x,
            &KMeansConfig {
                swap_refine: false,
                ..KMeansConfig::new(8)
            },
        )
        .unwrap();
        let greedy = balanced_kmeans(
            &x,
            &KMeansConfig {
                kmeans_solver: KMeansSolver::GreedyBalanced,
                swap_refine: false,
                ..KMeansConfig::new(8)
            },
        )
        .unwrap();
        assert!(balanced_labels(&greedy.labels, 8));
        assert!(greedy.converged);
        for w in greedy.history.windows(2) {
            assert!(w[1] <= w[0] + 1e-9 * w[0].abs(), "{:?}", greedy.history);
        }
        assert!(
            (objective(&x, &greedy.labels, 8).unwrap() - greedy.objective).abs()
                <= 1e-9 * greedy.objective
        );
        assert!(
            greedy.objective <= 1.05 * exact.objective,
            "{} vs {}",
            greedy.objective,
            exact.objective
        );
    }

    #[test]
    fn config_json_defaults_and_names() {
        let c: KMeansConfig = serde_json::from_str(r#"{"num_clusters": 16}"#).unwrap();
        assert_eq!(c, KMeansConfig::new(16));
        assert_eq!(
            (c.seed, c.max_iters, c.n_init, c.kmeans_solver),
            (0, 1000, 10, KMeansSolver::MinCostFlow)
        );
        assert_eq!(c.seeding_trials(), 2 + (16f64).ln() as usize);
        let g: KMeansConfig =
            serde_json::from_str(r#"{"num_clusters": 4, "kmeans_solver": "greedy_balanced", "n_init": 3, "local_trials": 1}"#).unwrap();
        assert_eq!(g.kmeans_solver, KMeansSolver::GreedyBalanced);
        assert_eq!((g.n_init, g.seeding_trials()), (3, 1));
        let back: KMeansConfig = serde_json::from_str(&serde_json::to_string(&g).unwrap()).unwrap();
        assert_eq!(back, g);
        assert_eq!(
            serde_json::to_string(&KMeansSolver::MinCostFlow).unwrap(),
            r#""min_cost_flow""#
        );
        assert!(
            serde_json::from_str::<KMeansConfig>(
                r#"{"num_clusters": 4, "kmeans_solver": "auction"}"#
            )
            .is_err()
        );
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
        for cfg in [
            KMeansConfig {
                n_init: 0,
                ..KMeansConfig::new(3)
            },
            KMeansConfig {
                max_iters: 0,
                ..KMeansConfig::new(3)
            },
            KMeansConfig {
                tol: -1.0,
                ..KMeansConfig::new(3)
            },
        ] {
            assert!(
                matches!(balanced_kmeans(&x, &cfg), Err(Error::Config(_))),
                "{cfg:?}"
            );
        }
        let mut p = vec![0.0; 3];
        assert!(balanced_assignment_warm(&[0.0; 6], 2, 3, 1, &mut p).is_ok());
        assert!(balanced_assignment_warm(&[0.0; 6], 2, 3, 1, &mut vec![0.0; 2]).is_err());
        assert!(balanced_assignment_warm(&[0.0; 6], 2, 3, 1, &mut vec![f64::NAN; 3]).is_err());
    }
}
