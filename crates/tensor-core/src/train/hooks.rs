//! Hooks: how a method crate takes part in a training recipe it does not
//! own. A recipe (model-zoo's fine-tuning, an experiment's loop) calls
//! [`TrainHooks::prepare`] once on the model before building the optimiser
//! (convert FFNs into experts, wrap projections with adapters, freeze
//! parameters), [`TrainHooks::after_step`] after every optimiser step
//! (refresh a gate) and [`TrainHooks::before_eval`] before scoring (fold
//! back, merge, save). Each may return a short note for the run's report.
//!
//! The trait is generic over the model type `M` (any `Module`, or a
//! concrete model when the hook needs its fields) and the recipe's error
//! type `E`, so a hook written once for every `Module` serves every recipe.

use crate::error::Error;

/// See the module docs. Every method has a do-nothing default.
pub trait TrainHooks<M: ?Sized, E = Error> {
    /// Change the model before training; returns a note for the report.
    fn prepare(&mut self, _model: &mut M) -> Result<String, E> {
        Ok(String::new())
    }
    /// Called after each optimiser step; `None` means the recipe need not
    /// call it again (the recipe may then run a faster loop).
    fn after_step(&mut self, _model: &mut M) -> Option<Result<(), E>> {
        None
    }
    /// Change the model before evaluation; returns a note for the report.
    fn before_eval(&mut self, _model: &mut M) -> Result<String, E> {
        Ok(String::new())
    }
}

/// The plain recipe: no hooks, for any model and error type.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl<M: ?Sized, E> TrainHooks<M, E> for NoHooks {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModuleExt;
    use crate::layers::Linear;
    use crate::module::Sequential;
    use crate::tch::Device;
    use crate::train::freeze_all_but;

    /// A hook written once for every `Module`: train only what matches.
    struct OnlyTrain(&'static str);

    impl<M: ModuleExt + ?Sized> TrainHooks<M> for OnlyTrain {
        fn prepare(&mut self, model: &mut M) -> Result<String, Error> {
            let n = freeze_all_but(model, &[self.0]);
            Ok(format!("{n} trainable"))
        }
    }

    #[test]
    fn one_hook_serves_any_module() {
        let mut seq = Sequential::new()
            .push(Linear::new(3, 3, true, Device::Cpu).unwrap())
            .push(Linear::new(3, 2, true, Device::Cpu).unwrap());
        let mut hooks = OnlyTrain("*.bias");
        assert_eq!(hooks.prepare(&mut seq).unwrap(), "2 trainable");
        let mut lin = Linear::new(4, 4, false, Device::Cpu).unwrap();
        assert_eq!(
            TrainHooks::<Linear>::prepare(&mut hooks, &mut lin).unwrap(),
            "0 trainable"
        );
        // Through a trait object, as recipes hold hooks.
        let dynamic: &mut dyn TrainHooks<Sequential> = &mut hooks;
        assert!(dynamic.after_step(&mut seq).is_none());
        assert_eq!(dynamic.before_eval(&mut seq).unwrap(), "");
        assert_eq!(seq.trainable_parameters().len(), 2);
        let mut none = NoHooks;
        let plain: &mut dyn TrainHooks<Linear, String> = &mut none;
        assert_eq!(plain.prepare(&mut lin).unwrap(), "");
    }
}
