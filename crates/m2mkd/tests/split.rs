//! Splitting the teacher: boundaries are validated, stages own the right
//! parts, and staged forwards compose.

mod common;

use common::*;
use m2mkd::{Boundaries, Error, ModularModel, split_into_modular, split_teacher};
use tensor_core::prelude::*;
use tensor_core::testing::assert_close;

#[test]
fn bad_boundaries_are_clear_errors() {
    for (depths, needle) in [
        (vec![], "at least one module"),
        (vec![2, 0, 2], "module 1 would own no block"),
        (vec![2, 2, 1], "sum to 5, the teacher has 4 blocks"),
        (vec![4, 3, 3, 3, 3, 3, 3, 3, 4], "sum to 29"),
    ] {
        let e = split_teacher(teacher(4, 8, 0), &Boundaries::new(depths.clone())).unwrap_err();
        assert!(matches!(e, Error::Boundaries { .. }), "{e}");
        assert!(e.to_string().contains(needle), "{depths:?}: {e}");
    }
    assert!(Boundaries::even(3, 4).is_err());
    assert_eq!(Boundaries::even(7, 3).unwrap().divided_depths, [3, 2, 2]);
}

#[test]
fn first_stage_owns_embeddings_last_owns_head() {
    let stages = split_teacher(teacher(5, 8, 0), &Boundaries::new(vec![2, 1, 2])).unwrap();
    assert_eq!(stages.len(), 3);
    assert!(stages[0].embed.is_some() && stages[0].head.is_none());
    assert!(stages[1].embed.is_none() && stages[1].head.is_none());
    assert!(stages[2].embed.is_none() && stages[2].head.is_some());
    let depths: Vec<usize> = stages.iter().map(|s| s.depth()).collect();
    assert_eq!(depths, [2, 1, 2]);
    let firsts: Vec<usize> = stages.iter().map(|s| s.first_block).collect();
    assert_eq!(firsts, [0, 2, 3]);
    // A single module owns everything.
    let one = split_teacher(teacher(3, 8, 0), &Boundaries::new(vec![3])).unwrap();
    assert!(one[0].embed.is_some() && one[0].head.is_some());
}

#[test]
fn staged_forwards_compose_and_split_preserves_the_function() {
    let t = teacher(4, 8, 3);
    let b = device_batch(0);
    let mut ctx = b.context(false);
    let full = t.forward_range(&b.input, 0, 4, &mut ctx).unwrap();
    // (a = 0 and a = L would embed or apply the head twice, by definition.)
    for a in 1..4 {
        let h = t.forward_range(&b.input, 0, a, &mut ctx).unwrap();
        let z = t.forward_range(&h, a, 4, &mut ctx).unwrap();
        assert_close(&z, &full, 1e-6, 1e-5);
    }
    assert!(t.forward_range(&b.input, 3, 2, &mut ctx).is_err());
    let split = split_into_modular(teacher(4, 8, 3), &Boundaries::new(vec![1, 3])).unwrap();
    let z = split.forward(&b.input, &mut ctx).unwrap();
    assert_eq!(z.size(), [BATCH, CLASSES]);
    assert!(
        z.equal(&full),
        "splitting must not change the teacher's function"
    );
    let h = split.forward_range(&b.input, 0, 1, &mut ctx).unwrap();
    assert!(
        split
            .forward_range(&h, 1, 2, &mut ctx)
            .unwrap()
            .equal(&full)
    );
}

#[test]
fn modular_models_check_widths() {
    let s8 = student(2, 8, 1, false, 0);
    let (mut mods, _) = s8.into_modules();
    let s4 = student(2, 4, 1, false, 0);
    let (mods4, _) = s4.into_modules();
    mods.truncate(1);
    mods.extend(mods4.into_iter().skip(1));
    let e = ModularModel::new(mods, vec![8, 4]).unwrap_err();
    assert!(matches!(e, Error::WidthMismatch { module: 1, .. }), "{e}");
    // A hidden state of the wrong width is named at the module boundary.
    let m = student(2, 8, 1, false, 0);
    let mut ctx = Context::eval();
    let e = m
        .forward_range(
            &Tensor::zeros([2, 3, 5], (Kind::Float, dev())),
            1,
            2,
            &mut ctx,
        )
        .unwrap_err();
    assert!(e.to_string().contains("stage.1"), "{e}");
}
