//! The [`Module`] contract, checked: what every module's hand-written (or
//! generated) lists must satisfy for paths, parameter names, trainability
//! and checkpoint loading to mean what they say.
//!
//! For every module of a tree:
//! 1. `params()` and `params_mut()` list the same names, in the same order,
//!    for the same tensors (the same fields, not copies);
//! 2. `children()` and `children_mut()` likewise, for the same modules;
//! 3. local parameter names are non-empty and distinct, child names
//!    distinct, and no name has an empty dotted segment (`a..b`, `.a`); a
//!    name may hold dots where the checkpoint's naming needs them
//!    (`intermediate.dense`, `lora_A.task.weight`);
//!
//! and for the tree, every full parameter name is distinct. [`check_keys`]
//! then compares the full names with the keys a checkpoint holds.
//!
//! Each crate's tests run [`check_contract`] on the modules it defines.

use std::collections::{BTreeSet, HashSet};

use crate::error::{Error, Result};
use crate::module::{Module, ModuleExt};

/// How much of a tree [`check_contract`] checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContractReport {
    pub modules: usize,
    pub parameters: usize,
}

/// Check the contract (module docs) over the whole tree under `m`; the
/// error names the module path and what disagrees.
pub fn check_contract(m: &mut dyn Module) -> Result<ContractReport> {
    let mut report = ContractReport {
        modules: 0,
        parameters: 0,
    };
    walk("", m, &mut report)?;
    let names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    let mut seen = HashSet::new();
    for n in &names {
        if !seen.insert(n.as_str()) {
            return Err(broken(
                "",
                format!("the full parameter name '{n}' occurs twice"),
            ));
        }
    }
    Ok(report)
}

fn broken(path: &str, reason: String) -> Error {
    let at = if path.is_empty() { "(root)" } else { path };
    Error::module(at, format!("module contract: {reason}"))
}

fn check_local_names(path: &str, what: &str, names: &[&str], may_be_empty: bool) -> Result<()> {
    let mut seen = HashSet::new();
    for n in names {
        if n.is_empty() && !may_be_empty {
            return Err(broken(path, format!("a {what} has an empty name")));
        }
        if !n.is_empty() && n.split('.').any(str::is_empty) {
            return Err(broken(
                path,
                format!("{what} name '{n}' has an empty segment"),
            ));
        }
        if !seen.insert(*n) {
            return Err(broken(path, format!("{what} name '{n}' occurs twice")));
        }
    }
    Ok(())
}

fn walk(path: &str, m: &mut dyn Module, report: &mut ContractReport) -> Result<()> {
    report.modules += 1;
    let kind = m.kind();
    let here = |what: &str| format!("{kind}: {what}");

    let shared: Vec<(String, usize)> = m
        .params()
        .into_iter()
        .map(|(n, t)| (n.to_owned(), std::ptr::from_ref(t) as usize))
        .collect();
    let exclusive: Vec<(String, usize)> = m
        .params_mut()
        .into_iter()
        .map(|(n, t)| (n.to_owned(), std::ptr::from_mut(t) as usize))
        .collect();
    compare(
        path,
        &here("params() and params_mut()"),
        &shared,
        &exclusive,
    )?;
    let names: Vec<&str> = shared.iter().map(|(n, _)| n.as_str()).collect();
    check_local_names(path, "parameter", &names, false)?;
    report.parameters += shared.len();

    let shared: Vec<(String, usize)> = m
        .children()
        .into_iter()
        .map(|(n, c)| (n.to_owned(), std::ptr::from_ref(c).cast::<()>() as usize))
        .collect();
    let exclusive: Vec<(String, usize)> = m
        .children_mut()
        .into_iter()
        .map(|(n, c)| {
            (
                n.to_owned(),
                std::ptr::from_ref(c.as_ref()).cast::<()>() as usize,
            )
        })
        .collect();
    compare(
        path,
        &here("children() and children_mut()"),
        &shared,
        &exclusive,
    )?;
    let names: Vec<&str> = shared.iter().map(|(n, _)| n.as_str()).collect();
    check_local_names(path, "child", &names, true)?;

    for (name, slot) in m.children_mut() {
        // Paths as `ModuleExt::get` takes them: labels kept, empty names vanish.
        let child = match (path.is_empty(), name.is_empty()) {
            (_, true) => path.to_owned(),
            (true, false) => name.to_owned(),
            (false, false) => format!("{path}.{name}"),
        };
        walk(&child, slot.as_mut(), report)?;
    }
    Ok(())
}

fn compare(path: &str, what: &str, a: &[(String, usize)], b: &[(String, usize)]) -> Result<()> {
    let names = |v: &[(String, usize)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    if names(a) != names(b) {
        return Err(broken(
            path,
            format!("{what} disagree: {:?} against {:?}", names(a), names(b)),
        ));
    }
    for ((n, pa), (_, pb)) in a.iter().zip(b) {
        if pa != pb {
            return Err(broken(
                path,
                format!("{what} give different objects under '{n}'"),
            ));
        }
    }
    Ok(())
}

/// Compare the full parameter names of `m` with the keys of a checkpoint:
/// `Err` lists the parameters the checkpoint lacks and the keys no
/// parameter takes (after dropping those `ignore` matches, e.g. buffers).
pub fn check_keys(m: &dyn Module, keys: &[String], ignore: &[&str]) -> Result<()> {
    let params: BTreeSet<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    let keys: BTreeSet<String> = keys
        .iter()
        .filter(|k| !ignore.iter().any(|p| crate::module::glob_match(p, k)))
        .cloned()
        .collect();
    let missing: Vec<&String> = params.difference(&keys).collect();
    let unused: Vec<&String> = keys.difference(&params).collect();
    if missing.is_empty() && unused.is_empty() {
        return Ok(());
    }
    Err(broken(
        "",
        format!(
            "parameter names and checkpoint keys differ: not in the checkpoint {missing:?}; \
             in the checkpoint only {unused:?}"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::{LayerNorm, Linear};
    use crate::module::{Context, Sequential, Slot};
    use crate::tch::{Device, Tensor};

    /// A module whose mutable lists are out of step with its shared ones.
    #[derive(Debug)]
    struct Skewed {
        a: Tensor,
        b: Tensor,
        child: Slot,
        swap_params: bool,
        rename_child: bool,
    }

    impl Module for Skewed {
        fn kind(&self) -> &'static str {
            "Skewed"
        }
        fn forward(&self, xs: &Tensor, _ctx: &mut Context) -> Result<Tensor> {
            Ok(xs.shallow_clone())
        }
        fn params(&self) -> Vec<(&str, &Tensor)> {
            vec![("a", &self.a), ("b", &self.b)]
        }
        fn params_mut(&mut self) -> Vec<(&str, &mut Tensor)> {
            if self.swap_params {
                vec![("a", &mut self.b), ("b", &mut self.a)]
            } else {
                vec![("a", &mut self.a), ("b", &mut self.b)]
            }
        }
        fn children(&self) -> Vec<(&str, &dyn Module)> {
            vec![("inner", self.child.as_ref())]
        }
        fn children_mut(&mut self) -> Vec<(&str, &mut Slot)> {
            let name = if self.rename_child { "other" } else { "inner" };
            vec![(name, &mut self.child)]
        }
    }

    fn skewed(swap_params: bool, rename_child: bool) -> Skewed {
        Skewed {
            a: Tensor::zeros([2], (crate::tch::Kind::Float, Device::Cpu)),
            b: Tensor::zeros([2], (crate::tch::Kind::Float, Device::Cpu)),
            child: Box::new(Linear::new(2, 2, true, Device::Cpu).unwrap()),
            swap_params,
            rename_child,
        }
    }

    #[test]
    fn a_sound_tree_passes_and_is_counted() {
        let mut m = Sequential::new()
            .push(Linear::new(3, 3, true, Device::Cpu).unwrap())
            .push(LayerNorm::new(3, 1e-5, true, Device::Cpu).unwrap());
        let r = check_contract(&mut m).unwrap();
        assert_eq!(
            r,
            ContractReport {
                modules: 3,
                parameters: 4
            }
        );
        let mut ok = skewed(false, false);
        assert_eq!(check_contract(&mut ok).unwrap().parameters, 4);
        let keys: Vec<String> = ["a", "b", "inner.weight", "inner.bias", "buf"]
            .map(String::from)
            .to_vec();
        check_keys(&ok, &keys, &["buf"]).unwrap();
        let e = check_keys(&ok, &keys[..3], &[]).unwrap_err().to_string();
        assert!(e.contains("not in the checkpoint [\"inner.bias\"]"), "{e}");
    }

    /// Every layer of this crate keeps the contract.
    #[test]
    fn every_layer_keeps_the_contract() {
        use crate::layers::{
            Activation, Attention, AttentionConfig, AttentionNames, BlockNames, Embedding,
            FeedForward, FfnNames, PreNormBlock,
        };
        let d = Device::Cpu;
        let block = PreNormBlock::new(
            BlockNames::vit(),
            Box::new(LayerNorm::new(8, 1e-5, true, d).unwrap()),
            Box::new(
                Attention::new(AttentionConfig::new(8, 2), AttentionNames::bert(), d).unwrap(),
            ),
            Box::new(LayerNorm::new(8, 1e-5, false, d).unwrap()),
            Box::new(FeedForward::gated(8, 16, Activation::Silu, FfnNames::llama(), d).unwrap()),
        );
        let mut m = Sequential::new()
            .push(Embedding::new(10, 8, d).unwrap())
            .push(block)
            .push(FeedForward::new(8, 16, Activation::Gelu, FfnNames::bert(), d).unwrap());
        let r = check_contract(&mut m).unwrap();
        assert_eq!(r.parameters, m.named_parameters().len());
        assert!(r.modules >= 12, "{r:?}");
    }

    #[test]
    fn lists_out_of_step_are_named() {
        let e = check_contract(&mut skewed(true, false))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("params() and params_mut() give different objects under 'a'"),
            "{e}"
        );
        let e = check_contract(&mut skewed(false, true))
            .unwrap_err()
            .to_string();
        assert!(e.contains("children() and children_mut() disagree"), "{e}");
        assert!(e.contains("Skewed"), "{e}");
    }

    #[test]
    fn repeated_names_are_errors() {
        let mut m = Sequential::new().push(skewed(false, false));
        check_contract(&mut m).unwrap();
        #[derive(Debug)]
        struct Twice(Tensor, Tensor);
        impl Module for Twice {
            fn kind(&self) -> &'static str {
                "Twice"
            }
            fn forward(&self, xs: &Tensor, _ctx: &mut Context) -> Result<Tensor> {
                Ok(xs.shallow_clone())
            }
            fn params(&self) -> Vec<(&str, &Tensor)> {
                vec![("w", &self.0), ("w", &self.1)]
            }
            fn params_mut(&mut self) -> Vec<(&str, &mut Tensor)> {
                vec![("w", &mut self.0), ("w", &mut self.1)]
            }
        }
        let z = || Tensor::zeros([1], (crate::tch::Kind::Float, Device::Cpu));
        let e = check_contract(&mut Twice(z(), z()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("parameter name 'w' occurs twice"), "{e}");
    }
}
