//! Hybrid networks (m2mKD §3.2, Algorithm step 3; Deep Incubation §3):
//! module i of the teacher or of the student plugged into the frozen meta model,
//!
//! - teacher: `z_T = M_{>i}(T_i(h))`, `h = M_{<i}(x)`, all without a graph;
//! - student: `z_S = M_{>i}(post(S_i(pre(h))))`: the suffix is frozen but
//!   differentiable, so the gradient of a loss on `z_S` reaches `S_i` and
//!   the stitches only.
//!
//! Module 0 reads the raw input (no `pre`), the last module uses its own
//! head (no `post`). The meta model and the teacher run in evaluation mode
//! (no dropout), the student side in training mode when asked. Children:
//! `meta.{j}` (the meta modules other than i), `teacher`, `student`,
//! `stitch_pre`, `stitch_post`, `projection` (the learned map of the
//! optional hidden-state loss, student width -> meta width).

use tensor_core::layers::Linear;
use tensor_core::tch::{self, Device, Tensor};
use tensor_core::{Context, Module, ModuleExt, Slot};

use crate::error::{Error, Result};
use crate::stage::{ModularModel, check_width, into_tensor_error};
use crate::stitch::{Stitch, StitchKind, StitchPolicy};

/// How a hybrid network bridges widths.
#[derive(Debug, Clone, Copy, Default)]
pub struct HybridOptions {
    pub stitches: StitchPolicy,
    pub stitch_kind: StitchKind,
    /// Build the learned projection for hidden-state matching.
    pub hidden_projection: bool,
}

/// What the student side produced.
#[derive(Debug)]
pub struct StudentOutput {
    /// `S_i(pre(h))` before `post` (absent for the last module).
    pub hidden: Option<Tensor>,
    /// `P S_i(pre(h))`, the hidden state in the meta width, when a projection exists.
    pub projected: Option<Tensor>,
    pub logits: Tensor,
}

/// What the teacher side produced (no graph).
#[derive(Debug)]
pub struct TeacherOutput {
    /// `T_i(h)` (absent for the last module).
    pub hidden: Option<Tensor>,
    pub logits: Tensor,
}

#[derive(Debug, Module)]
#[module(kind = "Hybrid", forward = forward_impl)]
pub struct Hybrid {
    index: usize,
    num_modules: usize,
    meta_width: i64,
    student_width: i64,
    /// Meta modules `0..i` and `i+1..M`, with their names.
    #[children]
    prefix: Vec<(String, Slot)>,
    #[children]
    suffix: Vec<(String, Slot)>,
    #[child]
    pub teacher: Option<Slot>,
    #[child]
    pub student: Slot,
    #[child(name = "stitch_pre")]
    pub pre: Option<Slot>,
    #[child(name = "stitch_post")]
    pub post: Option<Slot>,
    #[child]
    pub projection: Option<Slot>,
}

impl Hybrid {
    /// Plug `student` (hidden width `student_width`) and optionally
    /// `teacher = (T_i, its width)` into module slot `index` of `meta` (a
    /// frozen meta model or a [`crate::MetaModel::replica`]). The teacher is
    /// frozen here; stitches follow `opts`.
    pub fn new(
        meta: ModularModel,
        index: usize,
        teacher: Option<(Slot, i64)>,
        student: Slot,
        student_width: i64,
        opts: HybridOptions,
        device: Device,
    ) -> Result<Self> {
        let m = meta.len();
        if index >= m {
            return Err(Error::config(format!(
                "module index {index} is out of range for a meta model of {m} modules"
            )));
        }
        if !meta.trainable_parameters().is_empty() {
            return Err(Error::config(
                "the meta model must be frozen before distillation (MetaModel::freeze)",
            ));
        }
        let meta_width = meta.width();
        let (needs_pre, needs_post) = (index > 0, index + 1 < m);
        let teacher = match teacher {
            Some((mut t, w)) => {
                if w != meta_width && (needs_pre || needs_post) {
                    return Err(Error::WidthMismatch {
                        module: index,
                        side: "teacher",
                        width: w,
                        meta: meta_width,
                        hint: "teacher modules must fit the meta model (train them inside it, Deep Incubation)",
                    });
                }
                t.set_trainable("*", false);
                Some(t)
            }
            None => None,
        };
        let differs = student_width != meta_width;
        let stitched = match opts.stitches {
            StitchPolicy::Never if differs && (needs_pre || needs_post) => {
                return Err(Error::WidthMismatch {
                    module: index,
                    side: "student",
                    width: student_width,
                    meta: meta_width,
                    hint: "enable stitches (StitchPolicy::Auto or Always) or give the student the meta width",
                });
            }
            StitchPolicy::Never => false,
            StitchPolicy::Auto => differs,
            StitchPolicy::Always => true,
        };
        let stitch = |input, output| -> Result<Slot> {
            Ok(Box::new(Stitch::new(
                opts.stitch_kind,
                input,
                output,
                device,
            )?))
        };
        let pre = if stitched && needs_pre {
            Some(stitch(meta_width, student_width)?)
        } else {
            None
        };
        let post = if stitched && needs_post {
            Some(stitch(student_width, meta_width)?)
        } else {
            None
        };
        let projection: Option<Slot> = if opts.hidden_projection && needs_post {
            let mut p = Linear::new(student_width, meta_width, true, device)?;
            if !differs {
                // Between equal widths, start from the identity.
                tch::no_grad(|| -> Result<()> {
                    p.weight
                        .f_copy_(&Tensor::f_eye(meta_width, (p.weight.kind(), device))?)?;
                    if let Some(b) = &mut p.bias {
                        let _ = b.f_zero_()?;
                    }
                    Ok(())
                })?;
            }
            Some(Box::new(p))
        } else {
            None
        };
        let (modules, _) = meta.into_modules();
        let (mut prefix, mut suffix) = (Vec::new(), Vec::new());
        for (j, md) in modules.into_iter().enumerate() {
            let named = (format!("meta.{j}"), md);
            match j.cmp(&index) {
                std::cmp::Ordering::Less => prefix.push(named),
                std::cmp::Ordering::Greater => suffix.push(named),
                std::cmp::Ordering::Equal => {} // the meta's own module i is not used
            }
        }
        Ok(Self {
            index,
            num_modules: m,
            meta_width,
            student_width,
            prefix,
            suffix,
            teacher,
            student,
            pre,
            post,
            projection,
        })
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn num_modules(&self) -> usize {
        self.num_modules
    }

    pub fn meta_width(&self) -> i64 {
        self.meta_width
    }

    pub fn student_width(&self) -> i64 {
        self.student_width
    }

    pub fn is_last(&self) -> bool {
        self.index + 1 == self.num_modules
    }

    /// `h = M_{<i}(x)`, without a graph, in evaluation mode (`x` itself for module 0).
    pub fn meta_prefix(&self, xs: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        let train = std::mem::replace(&mut ctx.train, false);
        let r = tch::no_grad(|| -> Result<Tensor> {
            let mut h = xs.shallow_clone();
            for (n, m) in &self.prefix {
                h = ctx.call(n, m.as_ref(), &h)?;
            }
            Ok(h)
        });
        ctx.train = train;
        r
    }

    /// `M_{>i}(h)` in evaluation mode, with a graph through `h` (the
    /// suffix's parameters are frozen, so only `h`'s producers get gradients).
    pub fn meta_suffix(&self, h: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        let train = std::mem::replace(&mut ctx.train, false);
        let r = (|| -> Result<Tensor> {
            let mut h = h.shallow_clone();
            if !self.suffix.is_empty() {
                check_width("input of the meta suffix", &h, self.meta_width)?;
            }
            for (n, m) in &self.suffix {
                h = ctx.call(n, m.as_ref(), &h)?;
            }
            Ok(h)
        })();
        ctx.train = train;
        r
    }

    /// `T_i(h)` and `z_T = M_{>i}(T_i(h))`, without a graph.
    pub fn teacher_forward(&self, h: &Tensor, ctx: &mut Context) -> Result<TeacherOutput> {
        let t = self
            .teacher
            .as_ref()
            .ok_or_else(|| Error::config(format!("hybrid {} has no teacher module", self.index)))?;
        let train = std::mem::replace(&mut ctx.train, false);
        let r = tch::no_grad(|| -> Result<TeacherOutput> {
            let out = ctx.call("teacher", t.as_ref(), h)?;
            if self.is_last() {
                return Ok(TeacherOutput {
                    hidden: None,
                    logits: out,
                });
            }
            let logits = self.meta_suffix(&out, ctx)?;
            Ok(TeacherOutput {
                hidden: Some(out),
                logits,
            })
        });
        ctx.train = train;
        r
    }

    /// `z_S = M_{>i}(post(S_i(pre(h))))`; the student side in training mode when `train`.
    pub fn student_forward(
        &self,
        h: &Tensor,
        ctx: &mut Context,
        train: bool,
    ) -> Result<StudentOutput> {
        let saved = std::mem::replace(&mut ctx.train, train);
        let r = (|| -> Result<StudentOutput> {
            let mut x = h.shallow_clone();
            if let Some(p) = &self.pre {
                x = ctx.call("stitch_pre", p.as_ref(), &x)?;
            }
            let out = ctx.call("student", self.student.as_ref(), &x)?;
            if self.is_last() {
                return Ok(StudentOutput {
                    hidden: None,
                    projected: None,
                    logits: out,
                });
            }
            let projected = match &self.projection {
                Some(p) => Some(ctx.call("projection", p.as_ref(), &out)?),
                None => None,
            };
            let bridged = match &self.post {
                Some(p) => ctx.call("stitch_post", p.as_ref(), &out)?,
                None => out.shallow_clone(),
            };
            let logits = self.meta_suffix(&bridged, ctx)?;
            Ok(StudentOutput {
                hidden: Some(out),
                projected,
                logits,
            })
        })();
        ctx.train = saved;
        r
    }

    /// Take the hybrid apart: `(student, pre, post, projection, teacher)`.
    #[allow(clippy::type_complexity)]
    pub fn into_parts(self) -> (Slot, Option<Slot>, Option<Slot>, Option<Slot>, Option<Slot>) {
        (
            self.student,
            self.pre,
            self.post,
            self.projection,
            self.teacher,
        )
    }
}

impl Hybrid {
    /// The student hybrid in evaluation mode: `z_S` for raw input `x`.
    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let h = self.meta_prefix(xs, ctx).map_err(into_tensor_error)?;
        Ok(self
            .student_forward(&h, ctx, false)
            .map_err(into_tensor_error)?
            .logits)
    }
}
