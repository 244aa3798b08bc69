//! `#[derive(Module)]`: the lists it generates from field attributes keep
//! the module contract, in declaration order, with optional entries only
//! when present, names from literals, expressions and parallel fields.

use tensor_core::contract::check_contract;
use tensor_core::layers::Linear;
use tensor_core::module::{Context, Identity, Module, ModuleExt, Slot};
use tensor_core::tch::{Device, Kind, Tensor};

fn t(n: i64) -> Tensor {
    Tensor::ones([n], (Kind::Float, Device::Cpu))
}

fn lin() -> Slot {
    Box::new(Linear::new(2, 2, true, Device::Cpu).unwrap())
}

#[derive(Debug)]
struct Names {
    kind: &'static str,
    head: String,
}

#[derive(Debug, Module)]
#[module(kind_expr = "self.names.kind", forward = run)]
struct Everything {
    names: Names,
    #[param]
    scale: Tensor,
    #[param(name = "shift.bias")]
    shift: Option<Tensor>,
    #[params]
    extra: Vec<(&'static str, Tensor)>,
    #[child(name = "")]
    inner: Slot,
    #[child(name_expr = "self.names.head.as_str()")]
    head: Option<Slot>,
    #[children(names = "layer_names")]
    layers: Vec<Slot>,
    layer_names: Vec<String>,
    #[children]
    named: Vec<(String, Slot)>,
}

impl Everything {
    fn run(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        ctx.call("", self.inner.as_ref(), xs)
    }
}

#[derive(Debug, Default, Module)]
#[module(forward = run)]
struct Unit;

impl Unit {
    fn run(&self, xs: &Tensor, _ctx: &mut Context) -> tensor_core::Result<Tensor> {
        Ok(xs.shallow_clone())
    }
}

fn everything(shift: bool, head: bool) -> Everything {
    Everything {
        names: Names {
            kind: "Everything",
            head: "out.proj".into(),
        },
        scale: t(2),
        shift: shift.then(|| t(2)),
        extra: vec![("e0", t(1)), ("e1", t(1))],
        inner: Box::new(Identity),
        head: head.then(lin),
        layers: vec![lin(), lin()],
        layer_names: vec!["layer.0".into(), "layer.1".into()],
        named: vec![("tail".into(), lin())],
    }
}

#[test]
fn derived_lists_follow_the_attributes() {
    let mut m = everything(true, true);
    assert_eq!(m.kind(), "Everything");
    let params: Vec<&str> = m.params().into_iter().map(|(n, _)| n).collect();
    assert_eq!(params, ["scale", "shift.bias", "e0", "e1"]);
    let children: Vec<String> = m
        .children()
        .into_iter()
        .map(|(n, _)| n.to_owned())
        .collect();
    assert_eq!(children, ["", "out.proj", "layer.0", "layer.1", "tail"]);
    let mut_children: Vec<String> = m
        .children_mut()
        .into_iter()
        .map(|(n, _)| n.to_owned())
        .collect();
    assert_eq!(mut_children, children);
    let names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "scale",
            "shift.bias",
            "e0",
            "e1",
            "out.proj.weight",
            "out.proj.bias",
            "layer.0.weight",
            "layer.0.bias",
            "layer.1.weight",
            "layer.1.bias",
            "tail.weight",
            "tail.bias"
        ]
    );
    check_contract(&mut m).unwrap();
    // The derived forward is the named method.
    let x = Tensor::ones([3, 2], (Kind::Float, Device::Cpu));
    assert!(m.forward(&x, &mut Context::eval()).unwrap().equal(&x));
}

#[test]
fn absent_options_are_left_out_and_units_have_empty_lists() {
    let mut m = everything(false, false);
    let params: Vec<&str> = m.params().into_iter().map(|(n, _)| n).collect();
    assert_eq!(params, ["scale", "e0", "e1"]);
    assert_eq!(m.children().len(), 4);
    check_contract(&mut m).unwrap();
    let mut u = Unit;
    assert_eq!(u.kind(), "Unit");
    assert!(u.params().is_empty() && u.children().is_empty());
    check_contract(&mut u).unwrap();
}
