//! The module tree: Hugging Face parameter paths, lookup by path and type,
//! wrapping and unwrapping, insertion and removal, trainability patterns,
//! gradients, `load_named`'s checks, errors naming the failing module.

use tch::{Device, Kind, Tensor};
use tensor_core::layers::*;
use tensor_core::module::*;
use tensor_core::testing::{assert_close, device, randn_seeded, with_seed};
use tensor_core::{Error, Result};

/// A two-layer toy encoder with BERT's naming: `layer.N.attention.*`, the FFN
/// labelled `(ffn)` inside the layer (its slots are `intermediate.dense`, `output.dense`).
#[derive(Debug)]
struct Layer {
    attention: Slot,
    ffn: Slot,
}

impl Module for Layer {
    fn kind(&self) -> &'static str {
        "Layer"
    }
    fn forward(&self, xs: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        let h = xs + ctx.call("attention", self.attention.as_ref(), xs)?;
        Ok(&h + ctx.call("(ffn)", self.ffn.as_ref(), &h)?)
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        vec![
            ("attention", self.attention.as_ref()),
            ("(ffn)", self.ffn.as_ref()),
        ]
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut Slot)> {
        vec![("attention", &mut self.attention), ("(ffn)", &mut self.ffn)]
    }
}

fn toy() -> Sequential {
    toy_seeded(1)
}

/// Built on the test device.
fn toy_seeded(seed: u64) -> Sequential {
    let dev = device();
    with_seed(seed, || {
        let layer = || -> Slot {
            Box::new(Layer {
                attention: Box::new(
                    Attention::new(AttentionConfig::new(8, 2), AttentionNames::bert(), dev)
                        .unwrap(),
                ),
                ffn: Box::new(
                    FeedForward::new(8, 16, Activation::Gelu, FfnNames::bert(), dev).unwrap(),
                ),
            })
        };
        Sequential::new()
            .push_named("layer.0", layer())
            .push_named("layer.1", layer())
    })
}

/// A wrapper that adds a scaled copy of its own linear map: the shape of LoRA.
#[derive(Debug)]
struct AddScaled {
    base: Slot,
    extra: Slot,
}

impl Module for AddScaled {
    fn kind(&self) -> &'static str {
        "AddScaled"
    }
    fn forward(&self, xs: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        Ok(ctx.call("", self.base.as_ref(), xs)?
            + ctx.call("extra", self.extra.as_ref(), xs)? * 0.0)
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        vec![("", self.base.as_ref()), ("extra", self.extra.as_ref())]
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut Slot)> {
        vec![("", &mut self.base), ("extra", &mut self.extra)]
    }
}

#[test]
fn parameter_names_are_hugging_face_paths() {
    let m = toy();
    let names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"layer.0.attention.self.query.weight".to_owned()));
    assert!(names.contains(&"layer.1.intermediate.dense.bias".to_owned()));
    assert!(names.contains(&"layer.1.output.dense.weight".to_owned()));
    assert_eq!(names.len(), 2 * (8 + 4));
    let c = m.param_count();
    assert_eq!(c.total, 2 * (4 * (8 * 8 + 8) + 8 * 16 + 16 + 16 * 8 + 8));
    assert_eq!(c.trainable, c.total);
}

#[test]
fn get_by_path_and_by_type() {
    let m = toy();
    assert_eq!(
        m.get("layer.1.attention.self.value").unwrap().kind(),
        "Linear"
    );
    assert_eq!(
        m.get("layer.0.intermediate.dense").unwrap().kind(),
        "Linear"
    );
    assert_eq!(
        m.get_as::<Linear>("layer.0.output.dense")
            .unwrap()
            .in_features(),
        16
    );
    let ffns = m.find(&mut |_, m| is::<FeedForward>(m));
    assert_eq!(ffns, ["layer.0.(ffn)", "layer.1.(ffn)"]);
    assert_eq!(m.get("layer.1.(ffn)").unwrap().kind(), "FeedForward");
    assert_eq!(
        m.get("layer.1.(ffn).intermediate.dense").unwrap().kind(),
        "Linear"
    );
    assert_eq!(m.get("layer.1").unwrap().kind(), "Layer");
    let linears = m.find(&mut |_, m| is::<Linear>(m));
    assert!(
        linears.contains(&"layer.1.intermediate.dense".to_owned()),
        "{linears:?}"
    );
    let e = m.get("layer.0.attention.self.qurey").unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, Error::UnknownName { .. }), "{text}");
    assert!(
        text.contains("qurey") && text.contains("layer.0.attention"),
        "{text}"
    );
    let e = m
        .get_as::<LayerNorm>("layer.0.output.dense")
        .unwrap_err()
        .to_string();
    assert!(e.contains("Linear") && e.contains("LayerNorm"), "{e}");
}

#[test]
fn wrap_keeps_names_and_outputs_and_unwraps() {
    let mut m = toy();
    let x = randn_seeded(&[2, 3, 8], 2, device()).unwrap();
    let before = m.forward(&x, &mut Context::eval()).unwrap();
    let n_before = m.named_parameters().len();
    m.wrap("layer.0.attention.self.query", |base| {
        Box::new(AddScaled {
            base,
            extra: Box::new(with_seed(3, || Linear::new(8, 8, false, device()).unwrap())),
        })
    })
    .unwrap();
    let names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), n_before + 1);
    assert!(names.contains(&"layer.0.attention.self.query.weight".to_owned()));
    assert!(names.contains(&"layer.0.attention.self.query.extra.weight".to_owned()));
    assert_eq!(
        m.get("layer.0.attention.self.query").unwrap().kind(),
        "AddScaled"
    );
    assert_close(
        &m.forward(&x, &mut Context::eval()).unwrap(),
        &before,
        0.0,
        0.0,
    );
    // Unwrap: take the wrapper out and put its base back.
    let w = m
        .replace("layer.0.attention.self.query", Box::new(Identity))
        .unwrap();
    let w = downcast_box::<AddScaled>(w).unwrap();
    m.replace("layer.0.attention.self.query", w.base).unwrap();
    assert_eq!(m.named_parameters().len(), n_before);
    assert_close(
        &m.forward(&x, &mut Context::eval()).unwrap(),
        &before,
        0.0,
        0.0,
    );
}

#[test]
fn wrapping_every_linear_wraps_each_once() {
    let mut m = toy();
    let linears = m.find(&mut |_, m| is::<Linear>(m)).len();
    let mut wrapped = 0;
    m.for_each_slot_mut(&mut |_, slot| {
        if is::<Linear>(slot.as_ref()) {
            let base = std::mem::replace(slot, Box::new(Identity));
            *slot = Box::new(AddScaled {
                base,
                extra: Box::new(Identity),
            });
            wrapped += 1;
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(wrapped, linears);
    assert_eq!(m.find(&mut |_, m| is::<AddScaled>(m)).len(), linears);
}

#[test]
fn try_wrap_restores_on_failure() {
    let mut m = toy();
    let e = m
        .try_wrap("layer.1.output.dense", |old| {
            Err((old, Error::config("nope")))
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope"), "{e}");
    assert_eq!(m.get("layer.1.output.dense").unwrap().kind(), "Linear");
}

#[test]
fn insert_after_and_remove() {
    let mut m = toy();
    let x = randn_seeded(&[2, 3, 8], 3, device()).unwrap();
    let before = m.forward(&x, &mut Context::eval()).unwrap();
    let scale = Linear::from_weights(Tensor::eye(8, (Kind::Float, device())) * 2.0, None).unwrap();
    m.insert_after("layer.1.output.dense", "adapter", Box::new(scale))
        .unwrap();
    assert!(
        m.named_parameters()
            .iter()
            .any(|(n, _)| n == "layer.1.output.dense.adapter.weight")
    );
    assert!(
        m.named_parameters()
            .iter()
            .any(|(n, _)| n == "layer.1.output.dense.weight")
    );
    let after = m.forward(&x, &mut Context::eval()).unwrap();
    assert!(!after.allclose(&before, 1e-4, 1e-4, false));
    assert!(
        m.insert_after("layer.1.output.dense", "a.b", Box::new(Identity))
            .is_err()
    );
    assert!(m.remove_after("layer.1.output.dense", "other").is_err());
    let removed = m.remove_after("layer.1.output.dense", "adapter").unwrap();
    assert_eq!(removed.kind(), "Linear");
    assert_close(
        &m.forward(&x, &mut Context::eval()).unwrap(),
        &before,
        0.0,
        0.0,
    );
    assert!(m.remove_after("layer.1.output.dense", "adapter").is_err());
}

#[test]
fn trainability_by_pattern() {
    let mut m = toy();
    assert_eq!(m.set_trainable("*", false), 24);
    assert_eq!(m.param_count().trainable, 0);
    assert_eq!(m.set_trainable("layer.*.attention.self.query.*", true), 4);
    let t = m.trainable_parameters();
    assert!(t.iter().all(|(n, _)| n.contains(".query.")));
    assert_eq!(m.param_count().trainable, 2 * (64 + 8));
    assert!(glob_match("*.lora_*", "a.b.lora_A.weight"));
    assert!(!glob_match("*.lora_*", "a.b.weight"));
    assert!(glob_match("layer.?.x", "layer.3.x"));
    assert!(!glob_match("layer.?.x", "layer.10.x"));
}

#[test]
fn gradients_reach_parameters() {
    let m = toy();
    let x = randn_seeded(&[2, 3, 8], 4, device()).unwrap();
    m.forward(&x, &mut Context::train())
        .unwrap()
        .sum(Kind::Float)
        .backward();
    for (n, p) in m.named_parameters() {
        assert!(p.grad().defined(), "no gradient for {n}");
    }
}

#[test]
fn load_named_checks_names_and_shapes() {
    let mut a = toy();
    let b = toy_seeded(99);
    let values = b.named_parameters();
    assert!(a.load_named(&values, true).unwrap().is_empty());
    for ((_, pa), (_, pb)) in a.named_parameters().iter().zip(values.iter()) {
        assert!(pa.equal(pb));
    }
    // Host tensors: load_named moves values to each parameter's device.
    let mut wrong = b.named_parameters();
    wrong[0].1 = Tensor::zeros([3, 3], (Kind::Float, Device::Cpu));
    let e = a.load_named(&wrong, true).unwrap_err().to_string();
    assert!(e.contains(&wrong[0].0) && e.contains("[3, 3]"), "{e}");
    let mut extra = b.named_parameters();
    extra.push((
        "layer.0.nonsense".into(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    ));
    let e = a.load_named(&extra, true).unwrap_err().to_string();
    assert!(e.contains("layer.0.nonsense"), "{e}");
    let partial = &values[..3];
    assert!(a.load_named(partial, true).is_err());
    // Values from the host land on the parameters' device.
    let host: Vec<(String, Tensor)> = values
        .iter()
        .map(|(n, t)| (n.clone(), t.to_device(Device::Cpu)))
        .collect();
    assert!(a.load_named(&host, true).unwrap().is_empty());
    assert!(
        a.named_parameters()
            .iter()
            .all(|(_, p)| p.device() == device())
    );
    assert_eq!(
        a.load_named(partial, false).unwrap().len(),
        values.len() - 3
    );
}

#[test]
fn errors_name_the_failing_module() {
    #[derive(Debug)]
    struct Narrow(Slot);
    impl Module for Narrow {
        fn kind(&self) -> &'static str {
            "Narrow"
        }
        fn forward(&self, xs: &Tensor, ctx: &mut Context) -> Result<Tensor> {
            ctx.call("proj", self.0.as_ref(), &xs.narrow(-1, 0, 5))
        }
        fn children(&self) -> Vec<(&str, &dyn Module)> {
            vec![("proj", self.0.as_ref())]
        }
        fn children_mut(&mut self) -> Vec<(&str, &mut Slot)> {
            vec![("proj", &mut self.0)]
        }
    }
    let m = Sequential::new().push_named(
        "encoder.layer.2",
        Box::new(Narrow(Box::new(with_seed(4, || {
            Linear::new(8, 8, true, device()).unwrap()
        })))),
    );
    let mut ctx = Context::eval();
    let e = m
        .forward(&Tensor::zeros([2, 8], (Kind::Float, device())), &mut ctx)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("encoder.layer.2.proj: Linear"), "{e}");
    assert!(e.contains("[*, 8]") && e.contains("[2, 5]"), "{e}");
    // The context is reusable after an error.
    assert_eq!(ctx.path(), "");
}

#[test]
fn context_carries_extensions_losses_and_activations() {
    #[derive(Debug, PartialEq)]
    struct AdapterChoice(Vec<usize>);
    let mut ctx = Context::train().with_sink(Box::new(KeepActivations::new(&["*:act"])));
    assert!(ctx.insert(AdapterChoice(vec![0, 2])).is_none());
    assert_eq!(ctx.get::<AdapterChoice>(), Some(&AdapterChoice(vec![0, 2])));
    ctx.get_mut::<AdapterChoice>().unwrap().0.push(1);
    let m = toy();
    let dev = device();
    let x = randn_seeded(&[2, 3, 8], 5, dev).unwrap();
    let _ = m.forward(&x, &mut ctx).unwrap();
    ctx.add_aux_loss("balance", Tensor::from(2.0f32).to_device(dev));
    ctx.add_aux_loss("z", Tensor::from(0.5f32).to_device(dev));
    let total = ctx.aux_loss_total(dev).unwrap();
    assert_eq!(total.device(), dev);
    assert_eq!(total.double_value(&[]), 2.5);
    let mut sink = ctx.take_sink().unwrap();
    // Downcast the sink back to read what it kept.
    let kept = (sink.as_mut() as &mut dyn std::any::Any).downcast_mut::<KeepActivations>();
    let kept = kept.expect("KeepActivations");
    let keys: Vec<&str> = kept.values.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["layer.0.(ffn):act", "layer.1.(ffn):act"]);
    assert_eq!(kept.values[0].1.size(), [2, 3, 16]);
    assert_eq!(
        ctx.remove::<AdapterChoice>(),
        Some(AdapterChoice(vec![0, 2, 1]))
    );
}

#[test]
fn to_kind_casts_float_parameters() {
    let mut m = toy();
    m.to_kind(Kind::Half).unwrap();
    assert!(
        m.named_parameters()
            .iter()
            .all(|(_, p)| p.kind() == Kind::Half && p.requires_grad())
    );
    // From the test device back to the host (a no-op on the CPU).
    m.to_device(Device::Cpu).unwrap();
    assert!(m.named_parameters().iter().all(|(_, p)| {
        p.device() == Device::Cpu && p.kind() == Kind::Half && p.requires_grad()
    }));
}

#[test]
fn replacing_a_labelled_ffn_keeps_parameter_names() {
    let mut m = toy();
    let before: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    let old = m.replace("layer.0.(ffn)", Box::new(Identity)).unwrap();
    assert_eq!(old.kind(), "FeedForward");
    m.replace("layer.0.(ffn)", old).unwrap();
    let after: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(before, after);
    let mut seen = Vec::new();
    m.for_each_slot_mut(&mut |p, _| {
        seen.push(p.to_owned());
        Ok(())
    })
    .unwrap();
    assert!(seen.contains(&"layer.0.(ffn)".to_owned()));
    assert!(seen.contains(&"layer.0.output.dense".to_owned()));
}
