//! Which neurons form which expert, and the permutation that makes experts
//! contiguous: steps 1–2 of EMoE (Qiu et al. 2023, "Unlocking Emergent
//! Modularity in LLMs"; docs/emergent-split.md, Method, part 1) and
//! MoEfication's splits (Zhang et al. 2022; part 2 there).
//!
//! A split is a balanced labelling `a: [d_ff] → [N]` with `m = d_ff / N`
//! neurons per expert. Sources of labels:
//! - [`kmeans_split`]: balanced k-means on the L2-normalised keys (rows of
//!   `W1`; rows of `W_G` for gated FFNs), EMoE step 1 / MoEfication
//!   `param_cluster`;
//! - [`coactivation_split`]: MoEfication's co-activation graph
//!   `adj_ij = Σ_batches min(1, Σ_{t ∈ batch} relu(a_ti) relu(a_tj))` over
//!   8-token batches, clustered into balanced parts (balanced k-means on the
//!   L2-normalised rows of `adj` stands in for METIS + random rebalancing);
//! - baselines: [`random_split`] (seeded shuffle) and [`contiguous_split`]
//!   (EMoE's `random_cluster`: neuron blocks in their original order).
//!
//! **Permutation (step 2).** `π` sorts neurons by label (stably), so expert
//! `e` owns `π[e m .. (e+1) m]`. [`permute_ffn`] applies it:
//! `W1' = W1[π]`, `b1' = b1[π]`, `W_G' = W_G[π]`, `W2' = W2[:, π]`, `b2' = b2`.
//! Since `act` is element-wise, `W2' act(W1' x + b1') = W2 act(W1 x + b1)`:
//! the output is unchanged (up to summation order in the second matmul).

use tensor_core::TchResultExt;
use tensor_core::layers::{FeedForward, FfnPart};
use tensor_core::tch::{Device, Kind, Tensor};

use crate::error::{Error, Result, check_finite, check_split};
use crate::kmeans::{KMeansConfig, SplitMix64, balanced_kmeans, normalize_rows};

/// How a split's labels were obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitMethod {
    KMeans,
    CoActivation,
    Random,
    Contiguous,
    /// Labels supplied by the caller.
    Given,
    /// Labels read from a file (`labels_from_file`, [`crate::labels`]).
    FromFile,
}

/// A balanced assignment of `d_ff` neurons to `N` experts.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertSplit {
    pub num_experts: usize,
    /// Expert of each neuron (original neuron order).
    pub labels: Vec<usize>,
    pub method: SplitMethod,
    /// Final k-means objective on the clustered vectors, when k-means ran.
    pub objective: Option<f64>,
    /// Objective after each k-means iteration (non-increasing).
    pub history: Vec<f64>,
}

impl ExpertSplit {
    /// Check that `labels` give every expert exactly `d_ff / N` neurons.
    pub fn from_labels(labels: Vec<usize>, num_experts: usize) -> Result<Self> {
        let m = check_split(labels.len() as i64, num_experts)? as usize;
        let mut load = vec![0usize; num_experts];
        for &l in &labels {
            if l >= num_experts {
                return Err(Error::config(format!(
                    "label {l} is not an expert of N = {num_experts}"
                )));
            }
            load[l] += 1;
        }
        if let Some(e) = load.iter().position(|&c| c != m) {
            return Err(Error::config(format!(
                "expert {e} has {} neurons, every expert needs exactly d_ff / N = {m}",
                load[e]
            )));
        }
        Ok(Self {
            num_experts,
            labels,
            method: SplitMethod::Given,
            objective: None,
            history: Vec::new(),
        })
    }

    pub fn d_ff(&self) -> usize {
        self.labels.len()
    }

    /// Neurons per expert, `m = d_ff / N`.
    pub fn expert_size(&self) -> usize {
        self.labels.len() / self.num_experts
    }

    /// `π`: neuron indices sorted (stably) by expert; expert `e` owns `π[e m .. (e+1) m]`.
    pub fn permutation(&self) -> Vec<i64> {
        let mut idx: Vec<i64> = (0..self.labels.len() as i64).collect();
        idx.sort_by_key(|&i| self.labels[i as usize]);
        idx
    }

    /// The neurons of expert `e`, in original indices.
    pub fn expert(&self, e: usize) -> Vec<i64> {
        let m = self.expert_size();
        self.permutation()[e * m..(e + 1) * m].to_vec()
    }
}

/// `π⁻¹`, so that `x[π][π⁻¹] = x`.
pub fn inverse_permutation(perm: &[i64]) -> Vec<i64> {
    let mut inv = vec![0i64; perm.len()];
    for (pos, &p) in perm.iter().enumerate() {
        inv[p as usize] = pos as i64;
    }
    inv
}

/// Check that `perm` is a permutation of `0..n`.
pub fn check_permutation(perm: &[i64], n: usize) -> Result<()> {
    let mut seen = vec![false; n];
    if perm.len() != n {
        return Err(Error::config(format!(
            "permutation has {} entries, expected d_ff = {n}",
            perm.len()
        )));
    }
    for &p in perm {
        if p < 0 || p as usize >= n || seen[p as usize] {
            return Err(Error::config(format!(
                "not a permutation of 0..{n}: {p} out of range or repeated"
            )));
        }
        seen[p as usize] = true;
    }
    Ok(())
}

/// Baseline: neuron blocks in their original order (EMoE's `random_cluster`).
pub fn contiguous_split(d_ff: usize, num_experts: usize) -> Result<ExpertSplit> {
    let m = check_split(d_ff as i64, num_experts)? as usize;
    let mut s = ExpertSplit::from_labels((0..d_ff).map(|i| i / m).collect(), num_experts)?;
    s.method = SplitMethod::Contiguous;
    Ok(s)
}

/// Baseline: a seeded uniformly random balanced split.
pub fn random_split(d_ff: usize, num_experts: usize, seed: u64) -> Result<ExpertSplit> {
    let m = check_split(d_ff as i64, num_experts)? as usize;
    let mut labels: Vec<usize> = (0..d_ff).map(|i| i / m).collect();
    SplitMix64::new(seed).shuffle(&mut labels);
    let mut s = ExpertSplit::from_labels(labels, num_experts)?;
    s.method = SplitMethod::Random;
    Ok(s)
}

/// The raw key vectors `[d_ff, d_model]`: rows of `W1`, or of `W_G` for a gated FFN.
pub fn key_vectors(ffn: &FeedForward) -> Result<Tensor> {
    let w = if ffn.gate.is_some() {
        ffn.gate_weight()?
    } else {
        ffn.w1()?
    };
    Ok(w.f_detach()?)
}

/// EMoE step 1: balanced k-means on the L2-normalised keys.
pub fn kmeans_split(ffn: &FeedForward, cfg: &KMeansConfig) -> Result<ExpertSplit> {
    let keys = key_vectors(ffn)?;
    check_finite("FFN key vectors", &keys)?;
    let points = normalize_rows(&keys)?;
    let r = balanced_kmeans(&points, cfg)?;
    let mut s = ExpertSplit::from_labels(r.labels, cfg.num_clusters)?;
    s.method = SplitMethod::KMeans;
    s.objective = Some(r.objective);
    s.history = r.history;
    Ok(s)
}

/// MoEfication's co-activation matrix from hidden activations `[tokens, d_ff]`:
/// `adj_ij = Σ_batches min(1, Σ_{t ∈ batch} relu(a_ti) relu(a_tj))`, batches
/// of `batch` consecutive tokens (8 in MoEfication). Symmetric, `[d_ff, d_ff]`, f32 on the CPU.
pub fn coactivation_matrix(acts: &Tensor, batch: usize) -> Result<Tensor> {
    let s = acts.size();
    if s.len() != 2 || s[0] == 0 || s[1] == 0 {
        return Err(tensor_core::Error::shape("coactivation_matrix", "[tokens, d_ff]", s).into());
    }
    if batch == 0 {
        return Err(Error::config(
            "coactivation_matrix: batch must be at least 1",
        ));
    }
    check_finite("activations", acts)?;
    let (t, d) = (s[0], s[1]);
    let b = batch as i64;
    let a = acts
        .f_detach()?
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_relu()?;
    let mut adj = Tensor::f_zeros([d, d], (Kind::Float, Device::Cpu))?;
    let full = t / b;
    // Batches per chunk: keep [g, d, d] around 16M floats.
    let g = (16_000_000 / (d * d)).max(1);
    let mut start = 0;
    while start < full {
        let n = g.min(full - start);
        let p = a.f_narrow(0, start * b, n * b)?.f_view([n, b, d])?;
        let prod = p.f_transpose(1, 2)?.f_bmm(&p)?.f_clamp_max(1.0)?;
        adj = adj.f_add(&prod.f_sum_dim_intlist([0i64].as_slice(), false, Kind::Float)?)?;
        start += n;
    }
    let rest = t - full * b;
    if rest > 0 {
        let p = a.f_narrow(0, full * b, rest)?;
        adj = adj.f_add(&p.f_transpose(0, 1)?.f_matmul(&p)?.f_clamp_max(1.0)?)?;
    }
    Ok(adj)
}

/// MoEfication's co-activation split: balanced k-means (seeded) on the
/// L2-normalised rows of [`coactivation_matrix`] (8-token batches), so that
/// neurons that fire together share an expert. `acts: [tokens, d_ff]`.
pub fn coactivation_split(acts: &Tensor, num_experts: usize, seed: u64) -> Result<ExpertSplit> {
    let s = acts.size();
    if s.len() == 2 {
        check_split(s[1], num_experts)?;
    }
    let adj = coactivation_matrix(acts, 8)?;
    let r = balanced_kmeans(
        &normalize_rows(&adj)?,
        &KMeansConfig {
            seed,
            ..KMeansConfig::new(num_experts)
        },
    )?;
    let mut split = ExpertSplit::from_labels(r.labels, num_experts)?;
    split.method = SplitMethod::CoActivation;
    split.objective = Some(r.objective);
    split.history = r.history;
    Ok(split)
}

/// The dense weights of an FFN, neuron order made explicit.
#[derive(Debug)]
pub struct FfnWeights {
    /// `[d_ff, d_model]`
    pub w1: Tensor,
    pub b1: Option<Tensor>,
    /// `[d_ff, d_model]`, gated FFNs only.
    pub gate: Option<Tensor>,
    /// `[d_model, d_ff]`
    pub w2: Tensor,
    pub b2: Option<Tensor>,
}

impl FfnWeights {
    /// Detached copies of `ffn`'s weights (the projections must be plain `Linear`s).
    pub fn of(ffn: &FeedForward) -> Result<Self> {
        let d = |t: &Tensor| t.f_detach().op("FfnWeights");
        if ffn.gate.is_some() && ffn.gate_bias()?.is_some() {
            return Err(Error::config(
                "a gated FFN with a bias on its gate projection (Llama's mlp_bias) cannot be split: \
                 the expert computation has no gate bias",
            ));
        }
        Ok(Self {
            w1: d(ffn.w1()?)?,
            b1: ffn.b1()?.map(d).transpose()?,
            gate: if ffn.gate.is_some() {
                Some(d(ffn.gate_weight()?)?)
            } else {
                None
            },
            w2: d(ffn.w2()?)?,
            b2: ffn.b2()?.map(d).transpose()?,
        })
    }

    pub fn d_ff(&self) -> i64 {
        self.w1.size()[0]
    }

    /// Neurons reordered by `perm`: rows of `W1`, `b1`, `W_G`; columns of `W2`.
    pub fn permuted(&self, perm: &[i64]) -> Result<Self> {
        check_permutation(perm, self.d_ff() as usize)?;
        let p = Tensor::from_slice(perm).f_to_device(self.w1.device())?;
        let rows = |t: &Tensor| -> Result<Tensor> { Ok(t.f_index_select(0, &p)?.f_contiguous()?) };
        Ok(Self {
            w1: rows(&self.w1)?,
            b1: self.b1.as_ref().map(rows).transpose()?,
            gate: self.gate.as_ref().map(rows).transpose()?,
            w2: self.w2.f_index_select(1, &p)?.f_contiguous()?,
            b2: self.b2.as_ref().map(deep_copy).transpose()?,
        })
    }

    /// Check the weights are finite.
    pub fn check_finite(&self) -> Result<()> {
        check_finite("W1", &self.w1)?;
        check_finite("W2", &self.w2)?;
        for (what, t) in [("b1", &self.b1), ("gate", &self.gate), ("b2", &self.b2)] {
            if let Some(t) = t {
                check_finite(what, t)?;
            }
        }
        Ok(())
    }
}

/// A copy with its own storage.
pub(crate) fn deep_copy(t: &Tensor) -> Result<Tensor> {
    let mut c = t.f_empty_like()?;
    tensor_core::tch::no_grad(|| c.f_copy_(t))?;
    Ok(c)
}

/// Set the trainability of `ffn`'s projections from `flags` (see [`trainability`]).
pub(crate) fn copy_trainability(
    ffn: &mut FeedForward,
    flags: &[(FfnPart, bool, bool)],
) -> Result<()> {
    for &(part, w, b) in flags {
        let lin = ffn.linear_mut(part)?;
        lin.weight = lin.weight.set_requires_grad(w);
        if let Some(bias) = &mut lin.bias {
            *bias = bias.set_requires_grad(b);
        }
    }
    Ok(())
}

/// `(part, weight trainable, bias trainable)` for each projection of `ffn`.
pub(crate) fn trainability(ffn: &FeedForward) -> Result<Vec<(FfnPart, bool, bool)>> {
    let mut parts = vec![FfnPart::Up, FfnPart::Down];
    if ffn.gate.is_some() {
        parts.push(FfnPart::Gate);
    }
    parts
        .into_iter()
        .map(|p| {
            let l = ffn.linear(p)?;
            Ok((
                p,
                l.weight.requires_grad(),
                l.bias.as_ref().is_some_and(|b| b.requires_grad()),
            ))
        })
        .collect()
}

/// Build a `FeedForward` like `like` (activation, names, dropout, trainability) from `w`.
pub(crate) fn ffn_from(
    w: FfnWeights,
    activation: tensor_core::layers::Activation,
    names: tensor_core::layers::FfnNames,
    dropout: f64,
    flags: &[(FfnPart, bool, bool)],
) -> Result<FeedForward> {
    let mut f = FeedForward::from_weights(w.w1, w.b1, w.gate, w.w2, w.b2, activation, names)?;
    f.dropout = dropout;
    copy_trainability(&mut f, flags)?;
    Ok(f)
}

/// EMoE step 2: the same FFN with its neurons reordered by `perm` (from
/// [`ExpertSplit::permutation`]). Outputs are unchanged.
pub fn permute_ffn(ffn: &FeedForward, perm: &[i64]) -> Result<FeedForward> {
    let w = FfnWeights::of(ffn)?.permuted(perm)?;
    ffn_from(
        w,
        ffn.activation,
        ffn.names.clone(),
        ffn.dropout,
        &trainability(ffn)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kmeans::objective;
    use proptest::prelude::*;
    use tensor_core::layers::{Activation, FfnNames};
    use tensor_core::testing::{closeness, device, randn_seeded, tolerances, with_seed};
    use tensor_core::{Context, DType, Module};

    /// A CPU bound for a result compared with one computed another way,
    /// loosened on the test device as [`tolerances`] loosens f32 there.
    fn scaled(bound: f64) -> f64 {
        bound * tolerances(DType::F32, device()).0 / DType::F32.tolerances().0
    }

    fn ffn(d: i64, dff: i64, act: Activation, gated: bool, seed: u64) -> FeedForward {
        let dev = device();
        with_seed(seed, || {
            if gated {
                FeedForward::gated(d, dff, act, FfnNames::llama(), dev).unwrap()
            } else {
                FeedForward::new(d, dff, act, FfnNames::bert(), dev).unwrap()
            }
        })
    }

    fn balanced(s: &ExpertSplit) -> bool {
        let mut load = vec![0; s.num_experts];
        for &l in &s.labels {
            load[l] += 1;
        }
        load.iter().all(|&c| c == s.expert_size())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Permuting neurons by any split leaves the output unchanged.
        #[test]
        fn permutation_preserves_outputs(seed in 0u64..1000, n in prop::sample::select(vec![1usize, 2, 4, 8]), act in 0usize..4, gated in any::<bool>()) {
            let act = [Activation::Gelu, Activation::GeluTanh, Activation::Relu, Activation::Silu][act];
            let f = ffn(12, 32, act, gated, seed);
            let split = random_split(32, n, seed).unwrap();
            prop_assert!(balanced(&split));
            let p = permute_ffn(&f, &split.permutation()).unwrap();
            let x = randn_seeded(&[3, 5, 12], seed + 1, device()).unwrap();
            let mut ctx = Context::eval();
            let (a, b) = (f.forward(&x, &mut ctx).unwrap(), p.forward(&x, &mut ctx).unwrap());
            let c = closeness(&b, &a, scaled(1e-6), 0.0).unwrap();
            prop_assert!(c.ok, "max abs err {}", c.max_abs);
        }
    }

    #[test]
    fn kmeans_split_is_balanced_and_beats_baselines() {
        let f = ffn(16, 64, Activation::Gelu, false, 4);
        let s = kmeans_split(&f, &KMeansConfig::new(8)).unwrap();
        assert!(balanced(&s));
        assert_eq!(s.method, SplitMethod::KMeans);
        let keys = normalize_rows(&key_vectors(&f).unwrap()).unwrap();
        let km = s.objective.unwrap();
        assert!((objective(&keys, &s.labels, 8).unwrap() - km).abs() < 1e-9);
        let rnd = objective(&keys, &random_split(64, 8, 0).unwrap().labels, 8).unwrap();
        let cont = objective(&keys, &contiguous_split(64, 8).unwrap().labels, 8).unwrap();
        assert!(
            km < rnd && km < cont,
            "kmeans {km} random {rnd} contiguous {cont}"
        );
        // Gated FFNs cluster the gate rows.
        let g = ffn(16, 64, Activation::Silu, true, 5);
        let sg = kmeans_split(&g, &KMeansConfig::new(4)).unwrap();
        let gate_keys = normalize_rows(g.gate_weight().unwrap()).unwrap();
        assert!(
            (objective(&gate_keys, &sg.labels, 4).unwrap() - sg.objective.unwrap()).abs() < 1e-9
        );
    }

    #[test]
    fn baselines_and_labels() {
        let c = contiguous_split(12, 3).unwrap();
        assert_eq!(c.labels, vec![0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
        assert_eq!(c.permutation(), (0..12).collect::<Vec<_>>());
        let r = random_split(12, 3, 9).unwrap();
        assert!(balanced(&r));
        assert_eq!(r, random_split(12, 3, 9).unwrap());
        assert_ne!(r.labels, random_split(12, 3, 10).unwrap().labels);
        let p = r.permutation();
        for e in 0..3 {
            assert!(r.expert(e).iter().all(|&i| r.labels[i as usize] == e));
        }
        let inv = inverse_permutation(&p);
        for i in 0..12 {
            assert_eq!(p[inv[i] as usize], i as i64);
        }
        assert!(contiguous_split(10, 3).is_err());
        assert!(random_split(10, 0, 1).is_err());
        assert!(ExpertSplit::from_labels(vec![0, 0, 1, 2], 2).is_err());
        assert!(ExpertSplit::from_labels(vec![0, 0, 0, 1], 2).is_err());
        assert!(check_permutation(&[0, 0, 1], 3).is_err());
    }

    #[test]
    fn coactivation_groups_neurons_that_fire_together() {
        // 4 planted groups of 6 neurons; each token activates one group.
        let (t, d, n) = (256i64, 24i64, 4usize);
        let dev = device();
        let mut truth: Vec<i64> = (0..d).map(|i| i % n as i64).collect();
        SplitMix64::new(3).shuffle(&mut truth);
        let tok_group = tensor_core::testing::randint_seeded(n as i64, &[t, 1], 7, dev).unwrap();
        let on = tok_group
            .f_eq_tensor(
                &Tensor::from_slice(&truth)
                    .to_device(dev)
                    .f_unsqueeze(0)
                    .unwrap(),
            )
            .unwrap()
            .f_to_kind(Kind::Float)
            .unwrap();
        let noise = randn_seeded(&[t, d], 8, dev).unwrap().f_abs().unwrap();
        let acts = on
            .f_mul(&noise)
            .unwrap()
            .f_sub(&on.f_logical_not().unwrap().f_to_kind(Kind::Float).unwrap())
            .unwrap();
        let adj = coactivation_matrix(&acts, 8).unwrap();
        assert_eq!(adj.size(), [d, d]);
        assert!(
            closeness(&adj, &adj.f_transpose(0, 1).unwrap(), 0.0, 0.0)
                .unwrap()
                .ok
        );
        assert!(adj.f_max().unwrap().double_value(&[]) <= (t / 8) as f64);
        let s = coactivation_split(&acts, n, 0).unwrap();
        assert!(balanced(&s));
        assert_eq!(s.method, SplitMethod::CoActivation);
        for a in 0..d as usize {
            for b in 0..d as usize {
                assert_eq!(truth[a] == truth[b], s.labels[a] == s.labels[b]);
            }
        }
        assert!(coactivation_split(&acts, 5, 0).is_err());
        assert!(coactivation_matrix(&acts.f_mul_scalar(f64::NAN).unwrap(), 8).is_err());
    }

    #[test]
    fn nan_weights_are_an_error() {
        let f = ffn(8, 16, Activation::Gelu, false, 1);
        let w = f.w1().unwrap().f_mul_scalar(f64::NAN).unwrap();
        let bad = FeedForward::from_weights(
            w,
            None,
            None,
            f.w2().unwrap().detach(),
            None,
            Activation::Gelu,
            FfnNames::bert(),
        )
        .unwrap();
        assert!(matches!(
            kmeans_split(&bad, &KMeansConfig::new(4)),
            Err(Error::NonFinite { .. })
        ));
    }
}
