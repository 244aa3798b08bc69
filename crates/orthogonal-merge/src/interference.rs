//! The interference report at merge time (docs/orthogonal-merge.md, Method, part 1,
//! "Why it works"): per layer and per pair of tasks,
//!
//! ```text
//! cos_F(ΔW_i, ΔW_j) = ⟨ΔW_i, ΔW_j⟩_F / (‖ΔW_i‖_F ‖ΔW_j‖_F)
//! ⟨s_i B_i A_i, s_j B_j A_j⟩_F = s_i s_j Σ (B_iᵀ B_j) ⊙ (A_i A_jᵀ)      (no out×in product)
//! overlap(U_i, U_j) = ‖U_iᵀ U_j‖²_F / min(r_i, r_j) ∈ [0, 1]
//! ```
//!
//! where `U` is an orthonormal basis of a factor's column space: `col(B)`
//! (output side) and `col(Aᵀ)` (input side), found by an SVD that drops
//! directions below `1e-6·σ_max`. Overlap 0 means orthogonal subspaces
//! (`B_iᵀ B_j = 0` for orthogonal adapters' frozen side), 1 means one
//! contains the other. Full deltas get the cosine only (an overlap would
//! need a rank choice). Cosines are computed in f64. With each task's
//! recorded inputs, [`interference_with_features`] adds the crosstalk of
//! [`crate::crosstalk`]: what the cosines cannot see, since two deltas with
//! cosine 0 can still act on each other's inputs.

use std::fmt;

use tensor_core::tch::{Kind, Tensor};

use crate::crosstalk::{CrosstalkReport, crosstalk};
use crate::delta::{Delta, TaskDelta};
use crate::error::Result;
use crate::lsq::Features;

/// One pair of tasks on one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct PairStat {
    pub i: usize,
    pub j: usize,
    /// `cos_F(ΔW_i, ΔW_j)`; 0 when either delta is zero.
    pub cosine: f64,
    /// Overlap of the input subspaces (`col(A_iᵀ)`, `col(A_jᵀ)`).
    pub input_overlap: Option<f64>,
    /// Overlap of the output subspaces (`col(B_i)`, `col(B_j)`).
    pub output_overlap: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LayerInterference {
    pub layer: String,
    pub pairs: Vec<PairStat>,
}

/// Pairwise interference of a set of tasks, per layer.
#[derive(Debug, Clone, PartialEq)]
pub struct InterferenceReport {
    pub tasks: Vec<String>,
    pub layers: Vec<LayerInterference>,
    /// Crosstalk on each task's recorded inputs ([`interference_with_features`]).
    pub crosstalk: Option<CrosstalkReport>,
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

impl InterferenceReport {
    fn all(&self) -> impl Iterator<Item = &PairStat> {
        self.layers.iter().flat_map(|l| l.pairs.iter())
    }

    /// Mean `|cos_F|` over layers and pairs.
    pub fn mean_abs_cosine(&self) -> f64 {
        mean(self.all().map(|p| p.cosine.abs())).unwrap_or(0.0)
    }

    /// Largest `|cos_F|`, with its layer and pair.
    pub fn max_abs_cosine(&self) -> Option<(String, usize, usize, f64)> {
        self.layers
            .iter()
            .flat_map(|l| {
                l.pairs
                    .iter()
                    .map(move |p| (l.layer.clone(), p.i, p.j, p.cosine.abs()))
            })
            .max_by(|a, b| a.3.total_cmp(&b.3))
    }

    pub fn mean_input_overlap(&self) -> Option<f64> {
        mean(self.all().filter_map(|p| p.input_overlap))
    }

    pub fn mean_output_overlap(&self) -> Option<f64> {
        mean(self.all().filter_map(|p| p.output_overlap))
    }

    /// Mean `|cos_F|` per pair of tasks over layers: `(i, j, value)`.
    pub fn per_pair(&self) -> Vec<(usize, usize, f64)> {
        let n = self.tasks.len();
        let mut out = Vec::new();
        for i in 0..n {
            for j in i + 1..n {
                if let Some(m) = mean(
                    self.all()
                        .filter(|p| p.i == i && p.j == j)
                        .map(|p| p.cosine.abs()),
                ) {
                    out.push((i, j, m));
                }
            }
        }
        out
    }
}

impl fmt::Display for InterferenceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.4}"));
        writeln!(
            f,
            "interference of {} tasks over {} layers: mean |cos| {:.4}, mean input overlap {}, mean output overlap {}",
            self.tasks.len(),
            self.layers.len(),
            self.mean_abs_cosine(),
            opt(self.mean_input_overlap()),
            opt(self.mean_output_overlap())
        )?;
        if let Some((l, i, j, c)) = self.max_abs_cosine() {
            writeln!(
                f,
                "max |cos| {c:.4}: {} vs {} at {l}",
                self.tasks[i], self.tasks[j]
            )?;
        }
        for (i, j, m) in self.per_pair() {
            writeln!(
                f,
                "  {:>12} vs {:<12} mean |cos| {m:.4}",
                self.tasks[i], self.tasks[j]
            )?;
        }
        if let Some(c) = &self.crosstalk {
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

/// `⟨ΔW_x, ΔW_y⟩_F` in f64, using the factors where there are some.
pub fn frobenius_inner(x: &Delta, y: &Delta) -> Result<f64> {
    let d = |t: &Tensor| t.f_to_kind(Kind::Double);
    let v = match (x, y) {
        (Delta::Lora(p), Delta::Lora(q)) => {
            let bb = d(&p.b)?
                .f_transpose(0, 1)?
                .f_mm(&d(&q.b)?.f_to_device(p.b.device())?)?;
            let aa = d(&p.a)?.f_mm(&d(&q.a)?.f_to_device(p.a.device())?.f_transpose(0, 1)?)?;
            bb.f_mul(&aa)?.f_sum(Kind::Double)?.double_value(&[]) * p.scale * q.scale
        }
        (Delta::Lora(p), Delta::Full(w)) | (Delta::Full(w), Delta::Lora(p)) => {
            // s · Σ B ⊙ (W Aᵀ)
            let wa = d(w)?
                .f_to_device(p.a.device())?
                .f_mm(&d(&p.a)?.f_transpose(0, 1)?)?;
            d(&p.b)?.f_mul(&wa)?.f_sum(Kind::Double)?.double_value(&[]) * p.scale
        }
        (Delta::Full(v), Delta::Full(w)) => d(v)?
            .f_mul(&d(w)?.f_to_device(v.device())?)?
            .f_sum(Kind::Double)?
            .double_value(&[]),
    };
    Ok(v)
}

/// `cos_F(ΔW_x, ΔW_y)`; 0 when either is zero.
pub fn frobenius_cosine(x: &Delta, y: &Delta) -> Result<f64> {
    let nx = frobenius_inner(x, x)?.max(0.0).sqrt();
    let ny = frobenius_inner(y, y)?.max(0.0).sqrt();
    if nx == 0.0 || ny == 0.0 {
        return Ok(0.0);
    }
    Ok(frobenius_inner(x, y)? / (nx * ny))
}

/// An orthonormal basis of `col(m)` (`[n, k]`), numerical rank at `1e-6·σ_max`.
pub fn column_basis(m: &Tensor) -> Result<Tensor> {
    let m = m.f_to_kind(Kind::Double)?;
    let (u, s, _) = m.f_svd(true, true)?;
    let smax = s.f_max()?.double_value(&[]);
    if smax == 0.0 {
        return Ok(u.f_narrow(1, 0, 0)?);
    }
    let rank = s.f_gt(1e-6 * smax)?.f_sum(Kind::Int64)?.int64_value(&[]);
    Ok(u.f_narrow(1, 0, rank)?)
}

/// `‖U_xᵀ U_y‖²_F / min(r_x, r_y)` for orthonormal `U_x`, `U_y`; `None` when either is empty.
pub fn subspace_overlap(ux: &Tensor, uy: &Tensor) -> Result<Option<f64>> {
    let (rx, ry) = (ux.size()[1], uy.size()[1]);
    if rx == 0 || ry == 0 {
        return Ok(None);
    }
    let p = ux
        .f_to_kind(Kind::Double)?
        .f_transpose(0, 1)?
        .f_mm(&uy.f_to_kind(Kind::Double)?.f_to_device(ux.device())?)?;
    let v = p.f_square()?.f_sum(Kind::Double)?.double_value(&[]) / rx.min(ry) as f64;
    Ok(Some(v))
}

/// The interference of `tasks` on every layer that two or more of them change.
pub fn interference(tasks: &[TaskDelta]) -> Result<InterferenceReport> {
    let mut layers: Vec<String> = Vec::new();
    for t in tasks {
        for l in t.layers.keys() {
            if !layers.contains(l) {
                layers.push(l.clone());
            }
        }
    }
    layers.sort();
    let mut out = Vec::new();
    for layer in layers {
        let present: Vec<(usize, &Delta)> = tasks
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.layers.get(&layer).map(|d| (i, d)))
            .collect();
        if present.len() < 2 {
            continue;
        }
        // Bases of each factor's column space, once per task.
        let bases: Vec<Option<(Tensor, Tensor)>> = present
            .iter()
            .map(|(_, d)| match d {
                Delta::Lora(l) => Ok(Some((
                    column_basis(&l.a.f_transpose(0, 1)?)?,
                    column_basis(&l.b)?,
                ))),
                Delta::Full(_) => Ok(None),
            })
            .collect::<Result<_>>()?;
        let mut pairs = Vec::new();
        for x in 0..present.len() {
            for y in x + 1..present.len() {
                let cosine = frobenius_cosine(present[x].1, present[y].1)?;
                let (input_overlap, output_overlap) = match (&bases[x], &bases[y]) {
                    (Some((ax, bx)), Some((ay, by))) => {
                        (subspace_overlap(ax, ay)?, subspace_overlap(bx, by)?)
                    }
                    _ => (None, None),
                };
                pairs.push(PairStat {
                    i: present[x].0,
                    j: present[y].0,
                    cosine,
                    input_overlap,
                    output_overlap,
                });
            }
        }
        out.push(LayerInterference { layer, pairs });
    }
    Ok(InterferenceReport {
        tasks: tasks.iter().map(|t| t.name.clone()).collect(),
        layers: out,
        crosstalk: None,
    })
}

/// [`interference`] plus the crosstalk `‖ΔW_j X_i‖ / ‖ΔW_i X_i‖` on each
/// task's recorded inputs (`features[i]` from [`crate::lsq::record_features`]).
pub fn interference_with_features(
    tasks: &[TaskDelta],
    features: &[Features],
) -> Result<InterferenceReport> {
    let mut r = interference(tasks)?;
    r.crosstalk = Some(crosstalk(tasks, features)?);
    Ok(r)
}
