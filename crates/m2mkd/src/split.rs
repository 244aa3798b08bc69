//! Splitting a monolithic teacher into M modules (m2mKD §3.1; Deep
//! Incubation's `divided_depths`; `split_teacher.py` of `kamanphoebe/m2mKD`).
//!
//! `divided_depths = [d_0, ..., d_{M-1}]` groups the L blocks into M
//! consecutive modules with `Σ d_i = L` and every `d_i >= 1`: module i owns
//! blocks `[Σ_{j<i} d_j, Σ_{j<=i} d_j)`, module 0 also the embeddings and
//! module M-1 also the head. Both rules are checked (the paper's repository
//! ships a 9-entry split summing to 29 for a 32-block teacher).

use serde::{Deserialize, Serialize};
use tensor_core::Slot;

use crate::error::{Error, Result};
use crate::stage::{LayerStack, ModularModel, Stage};

/// How many consecutive blocks each module owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Boundaries {
    pub divided_depths: Vec<usize>,
}

impl Boundaries {
    pub fn new(divided_depths: Vec<usize>) -> Self {
        Self { divided_depths }
    }

    /// `M` modules of (nearly) equal depth; the first modules take the remainder.
    pub fn even(blocks: usize, modules: usize) -> Result<Self> {
        if modules == 0 || modules > blocks {
            return Err(Error::Boundaries {
                depths: Vec::new(),
                blocks,
                reason: format!("cannot make {modules} non-empty modules from {blocks} blocks"),
            });
        }
        let (q, r) = (blocks / modules, blocks % modules);
        Ok(Self::new(
            (0..modules).map(|i| q + usize::from(i < r)).collect(),
        ))
    }

    pub fn num_modules(&self) -> usize {
        self.divided_depths.len()
    }

    /// Check the split against a teacher of `blocks` blocks.
    pub fn validate(&self, blocks: usize) -> Result<()> {
        let err = |reason: String| Error::Boundaries {
            depths: self.divided_depths.clone(),
            blocks,
            reason,
        };
        if self.divided_depths.is_empty() {
            return Err(err("at least one module is needed".into()));
        }
        if let Some(i) = self.divided_depths.iter().position(|&d| d == 0) {
            return Err(err(format!("module {i} would own no block")));
        }
        let sum: usize = self.divided_depths.iter().sum();
        if sum != blocks {
            return Err(err(format!(
                "the depths sum to {sum}, the teacher has {blocks} blocks"
            )));
        }
        Ok(())
    }

    /// Block ranges `[start, end)` of the modules.
    pub fn ranges(&self) -> Vec<(usize, usize)> {
        let mut start = 0;
        self.divided_depths
            .iter()
            .map(|&d| {
                let r = (start, start + d);
                start += d;
                r
            })
            .collect()
    }
}

/// Group the teacher's blocks into modules: the [`Stage`]s in order, the
/// first with the embeddings, the last with the head.
pub fn split_teacher(teacher: LayerStack, boundaries: &Boundaries) -> Result<Vec<Stage>> {
    boundaries.validate(teacher.depth())?;
    let width = teacher.width;
    let (embed, blocks, head) = teacher.into_parts();
    let m = boundaries.num_modules();
    let mut blocks = blocks.into_iter();
    let (mut embed, mut head): (Option<Slot>, Option<Slot>) = (Some(embed), Some(head));
    let mut stages = Vec::with_capacity(m);
    for (i, (start, end)) in boundaries.ranges().into_iter().enumerate() {
        let own: Vec<Slot> = blocks.by_ref().take(end - start).collect();
        let e = if i == 0 { embed.take() } else { None };
        let h = if i == m - 1 { head.take() } else { None };
        stages.push(Stage::new(e, own, h, width, start)?);
    }
    Ok(stages)
}

/// [`split_teacher`], as a [`ModularModel`] (what the pipeline takes).
pub fn split_into_modular(teacher: LayerStack, boundaries: &Boundaries) -> Result<ModularModel> {
    ModularModel::from_stages(split_teacher(teacher, boundaries)?)
}
