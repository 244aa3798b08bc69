//! The pre-norm residual block of decoder and vision transformers (GPT-2,
//! ViT, ModuleFormer; Llama-family decoders have the same shape):
//!
//! ```text
//! h = x + drop(attn(norm_1(x)))
//! y = h + mlp(norm_2(h))
//! ```
//!
//! Each family names the four parts as its checkpoints do ([`BlockNames`]:
//! GPT-2's `ln_1 / attn / ln_2 / mlp`, ViT's `layernorm_before / attention /
//! layernorm_after / (ffn)`), so one block serves them all and a method
//! crate reaches a part by its usual path (`h.3.attn`, `encoder.layer.3.(ffn)`).
//! `drop` is inverted dropout on the attention branch while training (ViT's
//! `hidden_dropout_prob`; GPT-2 and ModuleFormer drop inside their parts and
//! leave it at 0).

use tch::Tensor;

use crate::error::{Result, TchResultExt};
use crate::module::{Context, Module, Slot};

/// The names of a pre-norm block's parts, and the block's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockNames {
    /// What `Module::kind` reports (`"Gpt2Block"`, `"VitLayer"`).
    pub kind: &'static str,
    pub norm_1: &'static str,
    pub attn: &'static str,
    pub norm_2: &'static str,
    pub mlp: &'static str,
}

impl BlockNames {
    /// GPT-2's `h.N`: `ln_1`, `attn`, `ln_2`, `mlp`.
    pub const fn gpt2() -> Self {
        Self {
            kind: "Gpt2Block",
            norm_1: "ln_1",
            attn: "attn",
            norm_2: "ln_2",
            mlp: "mlp",
        }
    }

    /// ViT's `encoder.layer.N`: `layernorm_before`, `attention`,
    /// `layernorm_after`, and the FFN under the label `(ffn)`.
    pub const fn vit() -> Self {
        Self {
            kind: "VitLayer",
            norm_1: "layernorm_before",
            attn: "attention",
            norm_2: "layernorm_after",
            mlp: "(ffn)",
        }
    }

    /// GPT-2's names under another kind (ModuleFormer's block keeps them so
    /// that the same paths address both).
    pub const fn gpt2_named(kind: &'static str) -> Self {
        let mut n = Self::gpt2();
        n.kind = kind;
        n
    }
}

/// `x + drop(attn(norm_1(x)))`, then `+ mlp(norm_2(·))` (see the module docs).
#[derive(Debug, Module)]
#[module(kind_expr = "self.names.kind", forward = forward_impl)]
pub struct PreNormBlock {
    pub names: BlockNames,
    #[child(name_expr = "self.names.norm_1")]
    pub norm_1: Slot,
    #[child(name_expr = "self.names.attn")]
    pub attn: Slot,
    #[child(name_expr = "self.names.norm_2")]
    pub norm_2: Slot,
    #[child(name_expr = "self.names.mlp")]
    pub mlp: Slot,
    /// Dropout on the attention branch while training.
    pub dropout: f64,
}

impl PreNormBlock {
    pub fn new(names: BlockNames, norm_1: Slot, attn: Slot, norm_2: Slot, mlp: Slot) -> Self {
        Self {
            names,
            norm_1,
            attn,
            norm_2,
            mlp,
            dropout: 0.0,
        }
    }

    pub fn with_dropout(mut self, p: f64) -> Self {
        self.dropout = p;
        self
    }
}

impl PreNormBlock {
    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        let n = &self.names;
        let a = ctx.call(n.norm_1, self.norm_1.as_ref(), xs)?;
        let mut a = ctx.call(n.attn, self.attn.as_ref(), &a)?;
        if ctx.train && self.dropout > 0.0 {
            a = a.f_dropout(self.dropout, true).op(n.kind)?;
        }
        let h = xs.f_add(&a).op(n.kind)?;
        let m = ctx.call(n.norm_2, self.norm_2.as_ref(), &h)?;
        let m = ctx.call(n.mlp, self.mlp.as_ref(), &m)?;
        h.f_add(&m).op(n.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::{LayerNorm, Linear};
    use crate::module::ModuleExt;
    use crate::tch::{Device, Kind};
    use crate::testing::{assert_close, randn_seeded, with_seed};

    fn block(names: BlockNames) -> PreNormBlock {
        let d = Device::Cpu;
        let lin = |seed| {
            Linear::from_weights(
                randn_seeded(&[4, 4], seed, d).unwrap(),
                Some(Tensor::zeros([4], (Kind::Float, d))),
            )
            .unwrap()
        };
        PreNormBlock::new(
            names,
            Box::new(LayerNorm::new(4, 1e-5, true, d).unwrap()),
            Box::new(lin(1)),
            Box::new(LayerNorm::new(4, 1e-5, true, d).unwrap()),
            Box::new(lin(2)),
        )
    }

    /// The block computes the two residual steps with its parts, whatever
    /// they are called, and names its parameters as the family does.
    #[test]
    fn residual_steps_and_names() {
        let b = block(BlockNames::gpt2());
        let x = randn_seeded(&[2, 3, 4], 7, Device::Cpu).unwrap();
        let y = b.forward(&x, &mut Context::eval()).unwrap();
        let mut ctx = Context::eval();
        let h = &x
            + b.attn
                .forward(&b.norm_1.forward(&x, &mut ctx).unwrap(), &mut ctx)
                .unwrap();
        let want = &h
            + b.mlp
                .forward(&b.norm_2.forward(&h, &mut ctx).unwrap(), &mut ctx)
                .unwrap();
        assert_close(&y, &want, 0.0, 0.0);
        assert_eq!(b.kind(), "Gpt2Block");
        let names: Vec<String> = b.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "ln_1.weight",
                "ln_1.bias",
                "attn.weight",
                "attn.bias",
                "ln_2.weight",
                "ln_2.bias",
                "mlp.weight",
                "mlp.bias",
            ]
        );
        let v = block(BlockNames::vit());
        assert_eq!(v.kind(), "VitLayer");
        assert_eq!(v.find(&mut |p, _| p == "layernorm_after").len(), 1);
        assert_eq!(v.find(&mut |p, _| p == "(ffn)").len(), 1);
        assert_eq!(block(BlockNames::gpt2_named("MoBlock")).kind(), "MoBlock");
    }

    /// Dropout acts on the attention branch in training only.
    #[test]
    fn dropout_only_in_training() {
        let b = block(BlockNames::gpt2()).with_dropout(0.5);
        let x = randn_seeded(&[2, 3, 4], 3, Device::Cpu).unwrap();
        let eval = b.forward(&x, &mut Context::eval()).unwrap();
        let plain = block(BlockNames::gpt2())
            .forward(&x, &mut Context::eval())
            .unwrap();
        assert_close(&eval, &plain, 0.0, 0.0);
        let train = with_seed(5, || b.forward(&x, &mut Context::train())).unwrap();
        assert!((train - plain).abs().max().double_value(&[]) > 0.0);
    }
}
