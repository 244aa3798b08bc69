//! Routing and retrieval of bricks (survey §3.2 "Routing and retrieval").
//!
//! **Activation-predicting router** (MoEfication, Zhang et al. 2022, §3.2):
//! with the FFN's neurons partitioned into bricks `B_1..B_K`, a brick's
//! activation for a token is `s_j(x) = Σ_{n ∈ B_j} |a_n(x)|`. A small MLP
//! `g(x) = W_2 ReLU(W_1 x + b_1) + b_2 ∈ R^K` learns, from the FFN input
//! `x`, which bricks will be among the token's top-k by `s_j`: multi-label
//! binary cross-entropy against `1[j ∈ top-k(s(x))]`, trained with Adam.
//! At inference the top-k logits choose the bricks to compute.
//!
//! **Retrieval of customised bricks**: each brick has a signature, the
//! L2-normalised mean embedding of the examples it was built for; a query
//! embedding retrieves the bricks with the highest cosine similarity
//! (maximum inner product search over normalised vectors).

use serde::{Deserialize, Serialize};
use tensor_core::rng::SplitMix64;
use tensor_core::tch::{self, Device, Kind, Reduction, Tensor};
use tensor_core::train::{AdamW, AdamWConfig};

use crate::error::{Error, Result, check_finite};

/// Per-token brick activations `s_j = Σ_{n ∈ B_j} |a_n|`: `hidden [.., d_ff]`,
/// `brick_of [d_ff]` int64 ids in `0..bricks` -> `[.., bricks]`.
pub fn brick_activation(hidden: &Tensor, brick_of: &Tensor, bricks: i64) -> Result<Tensor> {
    let d = *hidden.size().last().unwrap_or(&0);
    if brick_of.size() != [d] {
        return Err(Error::mismatch(
            "brick_activation brick_of",
            format!("shape [{d}] (the hidden width)"),
            format!("{:?}", brick_of.size()),
        ));
    }
    let mut shape = hidden.size();
    *shape.last_mut().expect("checked above") = bricks;
    let a = hidden.f_abs()?.f_to_kind(Kind::Float)?;
    let idx = brick_of
        .f_to_device(a.device())?
        .f_expand(a.size(), false)?
        .f_contiguous()?;
    Ok(Tensor::f_zeros(&shape, (Kind::Float, a.device()))?.f_scatter_add(-1, &idx, &a)?)
}

/// Training options of the router (JSON-serialisable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterConfig {
    pub hidden: i64,
    /// Bricks per token the router is trained to find.
    pub top_k: i64,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            hidden: 128,
            top_k: 4,
            steps: 300,
            batch_size: 256,
            lr: 1e-3,
            seed: 0,
        }
    }
}

/// The MLP router `g(x) = W_2 ReLU(W_1 x + b_1) + b_2`.
#[derive(Debug)]
pub struct ActivationRouter {
    pub w1: Tensor,
    pub b1: Tensor,
    pub w2: Tensor,
    pub b2: Tensor,
}

impl ActivationRouter {
    pub fn bricks(&self) -> i64 {
        self.w2.size()[0]
    }

    pub fn d_model(&self) -> i64 {
        self.w1.size()[1]
    }

    /// Logits `[.., bricks]` for inputs `[.., d_model]`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let d = *x.size().last().unwrap_or(&0);
        if d != self.d_model() {
            return Err(Error::mismatch(
                "router input",
                format!("last dimension {} (d_model)", self.d_model()),
                format!("{:?}", x.size()),
            ));
        }
        let x = x.f_to_kind(Kind::Float)?.f_to_device(self.w1.device())?;
        Ok(x.f_linear(&self.w1, Some(&self.b1))?
            .f_relu()?
            .f_linear(&self.w2, Some(&self.b2))?)
    }

    /// The `top_k` predicted bricks per input, `[.., top_k]` int64.
    pub fn route(&self, x: &Tensor, top_k: i64) -> Result<Tensor> {
        if top_k < 1 || top_k > self.bricks() {
            return Err(Error::config(format!(
                "route top_k {top_k} must be in 1..={}",
                self.bricks()
            )));
        }
        let l = tch::no_grad(|| self.logits(x))?;
        Ok(l.f_topk(top_k, -1, true, true)?.1)
    }

    /// Fit on FFN inputs `x [n, d]` and brick activations `scores [n, bricks]`.
    pub fn fit(x: &Tensor, scores: &Tensor, config: &RouterConfig) -> Result<Self> {
        let (xs, ss) = (x.size(), scores.size());
        if xs.len() != 2 || ss.len() != 2 || xs[0] != ss[0] || xs[0] == 0 {
            return Err(Error::mismatch(
                "ActivationRouter::fit",
                "x [n, d] and scores [n, bricks] with the same n > 0",
                format!("x {xs:?}, scores {ss:?}"),
            ));
        }
        let (n, d, k) = (xs[0], xs[1], ss[1]);
        if config.top_k < 1 || config.top_k > k || config.hidden < 1 || config.batch_size == 0 {
            return Err(Error::config(format!(
                "router config: top_k {} must be in 1..={k}, hidden and batch_size positive",
                config.top_k
            )));
        }
        check_finite("router inputs", x)?;
        check_finite("router brick activations", scores)?;
        let dev = x.device();
        let x = x.f_to_kind(Kind::Float)?;
        let top = scores
            .f_to_device(dev)?
            .f_topk(config.top_k, -1, true, false)?
            .1;
        let target = Tensor::f_zeros([n, k], (Kind::Float, dev))?.f_scatter_value(1, &top, 1.0)?;
        // Seeded uniform init (PyTorch Linear's bounds), via the host generator.
        let mut rng = SplitMix64::new(config.seed);
        let mut uniform = |shape: [i64; 2], fan_in: i64| -> Result<Tensor> {
            let bound = 1.0 / (fan_in as f64).sqrt();
            let v: Vec<f32> = (0..shape[0] * shape[1])
                .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                .collect();
            Ok(Tensor::from_slice(&v).f_view(shape)?.f_to_device(dev)?)
        };
        let params = [
            uniform([config.hidden, d], d)?,
            uniform([1, config.hidden], d)?.f_view([config.hidden])?,
            uniform([k, config.hidden], config.hidden)?,
            uniform([1, k], config.hidden)?.f_view([k])?,
        ]
        .map(|t| t.set_requires_grad(true));
        // Adam: the kit's AdamW without weight decay.
        let named = ["w1", "b1", "w2", "b2"]
            .iter()
            .zip(&params)
            .map(|(n, p)| ((*n).to_owned(), p.shallow_clone()))
            .collect();
        let mut adam = AdamW::new(named, AdamWConfig::new(config.lr).with_weight_decay(0.0))?;
        let mut order: Vec<i64> = (0..n).collect();
        let mut cursor = n as usize;
        for _ in 0..config.steps {
            let b = config.batch_size.min(n as usize);
            if cursor + b > n as usize {
                rng.shuffle(&mut order);
                cursor = 0;
            }
            let idx = Tensor::from_slice(&order[cursor..cursor + b]).f_to_device(dev)?;
            cursor += b;
            let xb = x.f_index_select(0, &idx)?;
            let yb = target.f_index_select(0, &idx)?;
            let logits = xb
                .f_linear(&params[0], Some(&params[1]))?
                .f_relu()?
                .f_linear(&params[2], Some(&params[3]))?;
            let loss = logits.f_binary_cross_entropy_with_logits::<Tensor>(
                &yb,
                None,
                None,
                Reduction::Mean,
            )?;
            loss.f_backward()?;
            adam.step()?;
            adam.zero_grad()?;
        }
        let [w1, b1, w2, b2] = params.map(|p| p.detach());
        Ok(Self { w1, b1, w2, b2 })
    }
}

/// Share of the oracle's brick activation that `chosen [n, k]` captures:
/// `Σ s[chosen] / Σ s[top-k(s)]`, averaged over rows (1 = perfect routing).
pub fn routing_recall(chosen: &Tensor, scores: &Tensor) -> Result<f64> {
    let (cs, ss) = (chosen.size(), scores.size());
    if cs.len() != 2 || ss.len() != 2 || cs[0] != ss[0] || cs[1] > ss[1] {
        return Err(Error::mismatch(
            "routing_recall",
            "chosen [n, k] and scores [n, bricks] with the same n",
            format!("chosen {cs:?}, scores {ss:?}"),
        ));
    }
    let s = scores.f_to_kind(Kind::Double)?;
    let got = s
        .f_gather(1, &chosen.f_to_device(s.device())?, false)?
        .f_sum_dim_intlist(1, false, Kind::Double)?;
    let best = s
        .f_topk(cs[1], -1, true, false)?
        .0
        .f_sum_dim_intlist(1, false, Kind::Double)?
        .f_clamp_min(1e-30)?;
    Ok(got
        .f_div(&best)?
        .f_mean(Kind::Double)?
        .f_double_value(&[])?)
}

/// Customised bricks indexed by signature, for retrieval by similarity.
#[derive(Debug, Default)]
pub struct BrickLibrary {
    pub names: Vec<String>,
    /// `[bricks, d]`, rows L2-normalised.
    signatures: Vec<Tensor>,
}

impl BrickLibrary {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Add a brick whose signature is the normalised mean of `examples [n, d]`.
    pub fn add(&mut self, name: &str, examples: &Tensor) -> Result<()> {
        let s = examples.size();
        if s.len() != 2 || s[0] == 0 {
            return Err(Error::mismatch(
                "BrickLibrary::add examples",
                "[n > 0, d] embeddings",
                format!("{s:?}"),
            ));
        }
        if let Some(first) = self.signatures.first()
            && first.size()[0] != s[1]
        {
            return Err(Error::mismatch(
                "BrickLibrary::add examples",
                format!("embedding width {}", first.size()[0]),
                s[1],
            ));
        }
        if self.names.iter().any(|n| n == name) {
            return Err(Error::config(format!(
                "brick '{name}' is already in the library"
            )));
        }
        check_finite("brick examples", examples)?;
        let mean = examples
            .f_to_kind(Kind::Float)?
            .f_to_device(Device::Cpu)?
            .f_mean_dim([0i64].as_slice(), false, Kind::Float)?;
        let norm = mean.f_norm()?.f_double_value(&[])?;
        if norm == 0.0 {
            return Err(Error::config(format!(
                "brick '{name}': signature is the zero vector"
            )));
        }
        self.signatures.push(mean.f_div_scalar(norm)?);
        self.names.push(name.into());
        Ok(())
    }

    /// Cosine similarity of each query `[q, d]` to each brick, `[q, bricks]`.
    pub fn similarity(&self, queries: &Tensor) -> Result<Tensor> {
        if self.is_empty() {
            return Err(Error::config("retrieval from an empty brick library"));
        }
        let sig = Tensor::f_stack(&self.signatures, 0)?;
        let s = queries.size();
        if s.len() != 2 || s[1] != sig.size()[1] {
            return Err(Error::mismatch(
                "retrieval queries",
                format!("[q, {}]", sig.size()[1]),
                format!("{s:?}"),
            ));
        }
        check_finite("retrieval queries", queries)?;
        let q = queries.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?;
        let qn = q.f_norm_scalaropt_dim(2, [1], true)?.f_clamp_min(1e-12)?;
        Ok(q.f_div(&qn)?.f_matmul(&sig.f_transpose(0, 1)?)?)
    }

    /// The `top_k` most similar bricks per query: `(index, cosine)` best first.
    pub fn retrieve(&self, queries: &Tensor, top_k: usize) -> Result<Vec<Vec<(usize, f64)>>> {
        if top_k == 0 || top_k > self.len() {
            return Err(Error::config(format!(
                "retrieve top_k {top_k} must be in 1..={}",
                self.len()
            )));
        }
        let sim = self.similarity(queries)?;
        let (vals, idx) = sim.f_topk(top_k as i64, -1, true, true)?;
        let q = sim.size()[0] as usize;
        let mut v = vec![0f32; q * top_k];
        let mut i = vec![0i64; q * top_k];
        vals.f_contiguous()?.f_copy_data(&mut v, q * top_k)?;
        idx.f_contiguous()?.f_copy_data(&mut i, q * top_k)?;
        Ok((0..q)
            .map(|r| {
                (0..top_k)
                    .map(|c| (i[r * top_k + c] as usize, v[r * top_k + c] as f64))
                    .collect()
            })
            .collect())
    }
}
