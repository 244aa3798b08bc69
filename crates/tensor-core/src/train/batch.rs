//! Batches of token sequences and the order in which examples are visited.
//!
//! - [`pad_batch`]: right padding to the longest sequence of the batch (after
//!   truncation to `max_len`), `attention_mask` 1 on tokens and 0 on padding,
//!   as Hugging Face tokenizers' `padding=True, truncation=True` does for
//!   right-padded models; built on the host, moved to the device once.
//! - [`BatchPlan`]: index batches over `n` examples, in order or shuffled by
//!   Fisher–Yates with a [`SplitMix64`] generator (Steele, Lea & Flood 2014)
//!   seeded from `(seed, epoch)`: the same seed and epoch give the same order
//!   on every machine, each epoch a different one; `drop_last` drops a final
//!   short batch, as `torch.utils.data.DataLoader(drop_last=True)`.

use crate::TchResultExt;
use crate::tch::{Device, Tensor};

use crate::error::{Error, Result};

/// A padded batch: `input_ids` and `attention_mask` are `[B, T]` int64,
/// `labels` (if any) `[B]` int64, all on one device.
#[derive(Debug)]
pub struct Batch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub labels: Option<Tensor>,
}

impl Batch {
    pub fn batch_size(&self) -> usize {
        self.input_ids.size()[0] as usize
    }

    pub fn seq_len(&self) -> usize {
        self.input_ids.size()[1] as usize
    }

    pub fn device(&self) -> Device {
        self.input_ids.device()
    }

    /// Attach one label per sequence.
    pub fn with_labels(mut self, labels: &[i64]) -> Result<Self> {
        if labels.len() != self.batch_size() {
            return Err(Error::invalid(format!(
                "Batch::with_labels: {} labels for {} sequences",
                labels.len(),
                self.batch_size()
            )));
        }
        let t = Tensor::f_from_slice(labels)
            .and_then(|t| t.f_to_device(self.device()))
            .op("Batch::with_labels")?;
        self.labels = Some(t);
        Ok(self)
    }

    pub fn to_device(&self, device: Device) -> Result<Self> {
        let mv = |t: &Tensor| t.f_to_device(device).op("Batch::to_device");
        Ok(Self {
            input_ids: mv(&self.input_ids)?,
            attention_mask: mv(&self.attention_mask)?,
            labels: self.labels.as_ref().map(mv).transpose()?,
        })
    }
}

/// Right-pad `seqs` with `pad_id` to the longest one (each first truncated to
/// `max_len` tokens when given). An empty sequence is allowed (its mask row is
/// all 0) unless every sequence is empty.
pub fn pad_batch<S: AsRef<[i64]>>(
    seqs: &[S],
    pad_id: i64,
    max_len: Option<usize>,
    device: Device,
) -> Result<Batch> {
    if seqs.is_empty() {
        return Err(Error::invalid("pad_batch: no sequences"));
    }
    if max_len == Some(0) {
        return Err(Error::invalid("pad_batch: max_len must be at least 1"));
    }
    let cap = max_len.unwrap_or(usize::MAX);
    let t = seqs
        .iter()
        .map(|s| s.as_ref().len().min(cap))
        .max()
        .unwrap_or(0);
    if t == 0 {
        return Err(Error::invalid("pad_batch: every sequence is empty"));
    }
    let b = seqs.len();
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0i64; b * t];
    for (i, s) in seqs.iter().enumerate() {
        let s = s.as_ref();
        let len = s.len().min(t);
        ids[i * t..i * t + len].copy_from_slice(&s[..len]);
        mask[i * t..i * t + len].fill(1);
    }
    let dims = [b as i64, t as i64];
    let make = |v: &[i64]| {
        Tensor::f_from_slice(v)
            .and_then(|x| x.f_reshape(dims))
            .and_then(|x| x.f_to_device(device))
            .op("pad_batch")
    };
    Ok(Batch {
        input_ids: make(&ids)?,
        attention_mask: make(&mask)?,
        labels: None,
    })
}

/// [`pad_batch`] plus one label per sequence.
pub fn pad_batch_with_labels<S: AsRef<[i64]>>(
    seqs: &[S],
    labels: &[i64],
    pad_id: i64,
    max_len: Option<usize>,
    device: Device,
) -> Result<Batch> {
    pad_batch(seqs, pad_id, max_len, device)?.with_labels(labels)
}

pub use crate::rng::SplitMix64;

/// How the examples `0..n` are grouped into batches, epoch after epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPlan {
    n: usize,
    batch_size: usize,
    seed: Option<u64>,
    drop_last: bool,
}

impl BatchPlan {
    /// Batches of `batch_size` over `n` examples, in order, keeping a short last batch.
    pub fn new(n: usize, batch_size: usize) -> Result<Self> {
        if n == 0 {
            return Err(Error::invalid("BatchPlan: no examples (n = 0)"));
        }
        if batch_size == 0 {
            return Err(Error::invalid("BatchPlan: batch_size must be at least 1"));
        }
        Ok(Self {
            n,
            batch_size,
            seed: None,
            drop_last: false,
        })
    }

    /// Shuffle every epoch, from `seed`.
    pub fn shuffled(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Drop the final batch when it is shorter than `batch_size`.
    pub fn drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Batches per epoch.
    pub fn num_batches(&self) -> usize {
        if self.drop_last {
            self.n / self.batch_size
        } else {
            self.n.div_ceil(self.batch_size)
        }
    }

    /// Examples visited per epoch.
    pub fn examples_per_epoch(&self) -> usize {
        if self.drop_last {
            self.num_batches() * self.batch_size
        } else {
            self.n
        }
    }

    /// The order of the examples in `epoch` (all `n`, before `drop_last`).
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.n).collect();
        if let Some(seed) = self.seed {
            let epoch_seed =
                SplitMix64::new(seed).next_u64() ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03);
            SplitMix64::new(epoch_seed).shuffle(&mut order);
        }
        order
    }

    /// The index batches of `epoch`.
    pub fn epoch(&self, epoch: u64) -> BatchIter {
        let mut order = self.order(epoch);
        order.truncate(self.examples_per_epoch());
        BatchIter {
            order,
            pos: 0,
            batch_size: self.batch_size,
        }
    }
}

/// Index batches of one epoch.
#[derive(Debug, Clone)]
pub struct BatchIter {
    order: Vec<usize>,
    pos: usize,
    batch_size: usize,
}

impl Iterator for BatchIter {
    type Item = Vec<usize>;

    fn next(&mut self) -> Option<Vec<usize>> {
        if self.pos >= self.order.len() {
            return None;
        }
        let end = (self.pos + self.batch_size).min(self.order.len());
        let batch = self.order[self.pos..end].to_vec();
        self.pos = end;
        Some(batch)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.order.len() - self.pos).div_ceil(self.batch_size);
        (left, Some(left))
    }
}

impl ExactSizeIterator for BatchIter {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tch::Kind;
    use crate::testing::device;
    use proptest::prelude::*;

    fn rows(t: &Tensor) -> Vec<Vec<i64>> {
        let (b, n) = (t.size()[0], t.size()[1]);
        let flat = Vec::<i64>::try_from(&t.to_device(Device::Cpu).reshape([-1])).unwrap();
        (0..b as usize)
            .map(|i| flat[i * n as usize..(i + 1) * n as usize].to_vec())
            .collect()
    }

    #[test]
    fn pads_right_and_masks() {
        let seqs = vec![vec![101, 7, 8, 102], vec![101, 9, 102], vec![]];
        let b = pad_batch(&seqs, 0, None, device()).unwrap();
        assert_eq!(b.input_ids.device(), device());
        assert_eq!(b.attention_mask.device(), device());
        assert_eq!(b.input_ids.kind(), Kind::Int64);
        assert_eq!((b.batch_size(), b.seq_len()), (3, 4));
        assert_eq!(
            rows(&b.input_ids),
            vec![vec![101, 7, 8, 102], vec![101, 9, 102, 0], vec![0, 0, 0, 0]]
        );
        assert_eq!(
            rows(&b.attention_mask),
            vec![vec![1, 1, 1, 1], vec![1, 1, 1, 0], vec![0, 0, 0, 0]]
        );
        assert!(b.labels.is_none());
    }

    #[test]
    fn truncates_to_max_len_and_pads_to_longest() {
        let seqs: Vec<&[i64]> = vec![&[1, 2, 3, 4, 5, 6], &[7, 8]];
        let b = pad_batch(&seqs, -1, Some(4), device()).unwrap();
        assert_eq!(
            rows(&b.input_ids),
            vec![vec![1, 2, 3, 4], vec![7, 8, -1, -1]]
        );
        // max_len larger than every sequence: padded to the longest only.
        let b = pad_batch(&seqs, 0, Some(100), device()).unwrap();
        assert_eq!(b.seq_len(), 6);
        let b = pad_batch_with_labels(&seqs, &[1, 0], 0, None, device()).unwrap();
        assert_eq!(b.labels.as_ref().unwrap().device(), device());
        assert_eq!(
            Vec::<i64>::try_from(b.labels.as_ref().unwrap()).unwrap(),
            vec![1, 0]
        );
        // Back from the test device to the host.
        let moved = b.to_device(Device::Cpu).unwrap();
        assert_eq!(moved.batch_size(), 2);
        assert_eq!(moved.input_ids.device(), Device::Cpu);
    }

    #[test]
    fn bad_batches_are_errors() {
        // Refused before any tensor is made: the host suffices.
        let none: Vec<Vec<i64>> = vec![];
        assert!(
            pad_batch(&none, 0, None, Device::Cpu)
                .unwrap_err()
                .to_string()
                .contains("no sequences")
        );
        let empty = vec![vec![], vec![]];
        assert!(
            pad_batch(&empty, 0, None, Device::Cpu)
                .unwrap_err()
                .to_string()
                .contains("every sequence is empty")
        );
        assert!(pad_batch(&[vec![1]], 0, Some(0), Device::Cpu).is_err());
        let e = pad_batch_with_labels(&[vec![1], vec![2]], &[1], 0, None, Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("1 labels for 2 sequences"));
        assert!(BatchPlan::new(0, 4).is_err());
        assert!(BatchPlan::new(4, 0).is_err());
    }

    #[test]
    fn plan_in_order_and_drop_last() {
        let p = BatchPlan::new(7, 3).unwrap();
        assert_eq!(
            p.epoch(0).collect::<Vec<_>>(),
            vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]
        );
        assert_eq!(p.epoch(0).len(), 3);
        let d = p.drop_last(true);
        assert_eq!(
            d.epoch(5).collect::<Vec<_>>(),
            vec![vec![0, 1, 2], vec![3, 4, 5]]
        );
        assert_eq!((d.num_batches(), d.examples_per_epoch()), (2, 6));
        assert_eq!(
            BatchPlan::new(2, 3)
                .unwrap()
                .drop_last(true)
                .epoch(0)
                .count(),
            0
        );
    }

    #[test]
    fn shuffle_is_deterministic_per_seed_and_epoch() {
        let p = BatchPlan::new(50, 8).unwrap().shuffled(42);
        let a: Vec<_> = p.epoch(0).collect();
        assert_eq!(a, p.epoch(0).collect::<Vec<_>>());
        assert_eq!(
            a,
            BatchPlan::new(50, 8)
                .unwrap()
                .shuffled(42)
                .epoch(0)
                .collect::<Vec<_>>()
        );
        assert_ne!(a, p.epoch(1).collect::<Vec<_>>());
        assert_ne!(
            a,
            BatchPlan::new(50, 8)
                .unwrap()
                .shuffled(43)
                .epoch(0)
                .collect::<Vec<_>>()
        );
        assert_ne!(p.order(0), (0..50).collect::<Vec<_>>());
        // The generator's first outputs for seed 0 (reference SplitMix64).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn below_is_roughly_uniform() {
        let mut r = SplitMix64::new(7);
        let mut counts = [0u32; 6];
        for _ in 0..60_000 {
            counts[r.below(6) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_000..11_000).contains(&c)),
            "{counts:?}"
        );
    }

    proptest! {
        #[test]
        fn every_index_once_per_epoch(
            n in 1usize..300,
            bs in 1usize..40,
            seed in any::<u64>(),
            epoch in 0u64..5,
            shuffle in any::<bool>(),
            drop_last in any::<bool>(),
        ) {
            let mut p = BatchPlan::new(n, bs).unwrap().drop_last(drop_last);
            if shuffle {
                p = p.shuffled(seed);
            }
            let batches: Vec<Vec<usize>> = p.epoch(epoch).collect();
            prop_assert_eq!(batches.len(), p.num_batches());
            prop_assert_eq!(batches.clone(), p.epoch(epoch).collect::<Vec<_>>());
            for (i, b) in batches.iter().enumerate() {
                prop_assert!(!b.is_empty());
                if i + 1 < batches.len() || drop_last {
                    prop_assert_eq!(b.len(), bs);
                }
            }
            let mut seen: Vec<usize> = batches.into_iter().flatten().collect();
            prop_assert_eq!(seen.len(), p.examples_per_epoch());
            seen.sort_unstable();
            seen.dedup();
            prop_assert_eq!(seen.len(), p.examples_per_epoch());
            prop_assert!(seen.iter().all(|&i| i < n));
            // The full order is a permutation of 0..n.
            let mut order = p.order(epoch);
            order.sort_unstable();
            prop_assert_eq!(order, (0..n).collect::<Vec<_>>());
        }
    }
}
