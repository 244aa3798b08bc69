//! The tests that docs/orthogonal-merge.md (Method, part 1) asks for on the
//! bases and the registry: disjoint bins are
//! orthogonal (1e-6 in f32, 1e-12 in f64), bases are reproducible from
//! (seed, layer), the Gaussian variant is near-orthogonal with mean |cos|
//! ≈ √(2/(πn)), `N·r > n` is an error, and the registry file round-trips.

mod common;

use orthogonal_merge::basis::{BasisSpec, basis_columns, full_basis, gaussian_values, layer_seed};
use orthogonal_merge::{BasisKind, Error, FrozenSide, Registry};
use tensor_core::tch::{Device, Kind, Tensor};
use tensor_core::testing::device;

fn spec(kind: BasisKind, rank: i64) -> BasisSpec {
    BasisSpec {
        kind,
        seed: 42,
        rank,
        frozen_side: FrozenSide::Output,
    }
}

fn max_off(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

#[test]
fn disjoint_bins_are_orthogonal_in_f32_and_f64() {
    // The spec's bounds, checked with products computed on the test device.
    let dev = device();
    for kind in [BasisKind::QrBins, BasisKind::SvdBins] {
        let (n, r) = (48, 8);
        let s = spec(kind, r);
        for (dtype, tol) in [(Kind::Float, 1e-6), (Kind::Double, 1e-12)] {
            let bins: Vec<Tensor> = (0..n / r)
                .map(|b| {
                    s.block("encoder.layer.0.attention.self.query", n, b, dtype, dev)
                        .unwrap()
                })
                .collect();
            for (i, bi) in bins.iter().enumerate() {
                let eye = Tensor::eye(r, (dtype, dev));
                let self_err = max_off(&(bi.transpose(0, 1).mm(bi) - eye));
                assert!(
                    self_err < tol * 10.0,
                    "{kind:?} {dtype:?}: B_iᵀB_i - I = {self_err:e}"
                );
                for bj in &bins[i + 1..] {
                    let cross = max_off(&bi.transpose(0, 1).mm(bj));
                    assert!(cross < tol, "{kind:?} {dtype:?}: B_iᵀB_j = {cross:e}");
                }
            }
        }
    }
}

#[test]
fn same_seed_and_layer_give_the_same_basis() {
    let a = full_basis(BasisKind::QrBins, 16, 7, "layer.0.query").unwrap();
    let b = full_basis(BasisKind::QrBins, 16, 7, "layer.0.query").unwrap();
    assert_eq!(max_off(&(&a - &b)), 0.0);
    let other_layer = full_basis(BasisKind::QrBins, 16, 7, "layer.1.query").unwrap();
    let other_seed = full_basis(BasisKind::QrBins, 16, 8, "layer.0.query").unwrap();
    assert!(max_off(&(&a - other_layer)) > 0.1);
    assert!(max_off(&(&a - other_seed)) > 0.1);
    // The generator is SplitMix64 + Box–Muller in Rust: these values are the
    // same in every process and on every platform (recorded once).
    let g = gaussian_values(3, layer_seed(7, "layer.0.query"));
    let again = gaussian_values(3, layer_seed(7, "layer.0.query"));
    assert_eq!(g, again);
    assert_eq!(layer_seed(7, "layer.0.query"), PINNED_SEED);
    let v = gaussian_values(2, 0);
    assert!(
        (v[0] - PINNED_G0[0]).abs() < 1e-12 && (v[1] - PINNED_G0[1]).abs() < 1e-12,
        "{v:?}"
    );
}

/// Recorded; `PINNED_G0` was also computed by an independent Python
/// implementation of SplitMix64 + Box–Muller.
const PINNED_SEED: u64 = 7540237702984142247;
const PINNED_G0: [f64; 2] = [-1.8839083333524405, 0.8645068595575148];

#[test]
fn a_bin_is_the_same_whatever_else_is_computed() {
    // Bin 2 from the prefix QR equals columns 16..24 of the full basis
    // (host-side: `basis_columns` computes on the CPU).
    let s = spec(BasisKind::QrBins, 8);
    let b2 = s.block("x", 40, 2, Kind::Double, Device::Cpu).unwrap();
    let q = basis_columns(BasisKind::QrBins, 40, 40, layer_seed(42, "x")).unwrap();
    assert!(max_off(&(b2 - q.narrow(1, 16, 8))) < 1e-12);
}

#[test]
fn gaussian_bins_are_near_orthogonal() {
    let (n, r) = (256, 8);
    let s = spec(BasisKind::Gaussian, r);
    let bins: Vec<Tensor> = (0..4)
        .map(|b| s.block("l", n, b, Kind::Double, device()).unwrap())
        .collect();
    let mut cos = Vec::new();
    for i in 0..4 {
        for j in i + 1..4 {
            let (bi, bj) = (&bins[i], &bins[j]);
            let ni = bi
                .square()
                .sum_dim_intlist([0i64].as_slice(), false, Kind::Double)
                .sqrt();
            let nj = bj
                .square()
                .sum_dim_intlist([0i64].as_slice(), false, Kind::Double)
                .sqrt();
            let c = bi.transpose(0, 1).mm(bj) / ni.unsqueeze(1) / nj.unsqueeze(0);
            cos.push(c.abs().mean(Kind::Double).double_value(&[]));
        }
    }
    let mean = cos.iter().sum::<f64>() / cos.len() as f64;
    let expect = (2.0 / (std::f64::consts::PI * n as f64)).sqrt();
    assert!(
        (mean / expect - 1.0).abs() < 0.15,
        "mean |cos| {mean} vs √(2/(πn)) = {expect}"
    );
    // Columns have norm ≈ 1 (entries N(0, 1/n)).
    let norms = bins[0].square().sum(Kind::Double).double_value(&[]) / r as f64;
    assert!((norms - 1.0).abs() < 0.2, "{norms}");
}

#[test]
fn too_many_concepts_is_an_error() {
    let model = common::tiny_bert(0);
    // hidden 16, intermediate 32: with rank 4 on the output side, query holds 4 bins.
    let mut reg = Registry::for_model(
        &model,
        &["query", "intermediate.dense"],
        BasisKind::QrBins,
        1,
        4,
        FrozenSide::Output,
    )
    .unwrap();
    let (cap, layer, n) = reg.capacity().unwrap();
    assert_eq!((cap, n), (4, 16));
    assert!(layer.ends_with("query"));
    for (i, c) in ["a", "b", "c", "d"].iter().enumerate() {
        assert_eq!(reg.claim(c).unwrap(), i as i64);
    }
    let e = reg.claim("e").unwrap_err();
    assert!(
        matches!(
            e,
            Error::RegistryFull {
                bin: 4,
                capacity: 4,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("N·r must be <= n"), "{e}");
    // A bin beyond the capacity cannot be assigned either; a freed bin is reused.
    assert!(matches!(
        reg.assign("e", 9),
        Err(Error::RegistryFull { .. })
    ));
    assert_eq!(reg.release("b").unwrap(), 1);
    assert_eq!(reg.claim("e").unwrap(), 1);
}

#[test]
fn registry_errors_name_the_culprit() {
    let mut reg = Registry::new(BasisKind::QrBins, 3, 2, FrozenSide::Input).unwrap();
    reg.claim("sst2").unwrap();
    let e = reg.claim("sst2").unwrap_err();
    assert!(matches!(e, Error::DuplicateConcept { bin: 0, .. }), "{e}");
    let e = reg.assign("agnews", 0).unwrap_err();
    assert!(
        matches!(&e, Error::BinTaken { holder, .. } if holder == "sst2"),
        "{e}"
    );
    let e = reg.bin("nope").unwrap_err();
    assert!(e.to_string().contains("sst2"), "{e}");
    assert!(reg.claim("has.dot").is_err());
    assert!(Registry::new(BasisKind::QrBins, 0, 0, FrozenSide::Input).is_err());
    assert_eq!(reg.bin_or_claim("agnews").unwrap(), 1);
    assert_eq!(reg.bin_or_claim("agnews").unwrap(), 1);
}

#[test]
fn registry_dims_must_match_the_model() {
    let small = common::tiny_bert(0);
    let mut reg = Registry::for_model(
        &small,
        &["query"],
        BasisKind::QrBins,
        1,
        4,
        FrozenSide::Input,
    )
    .unwrap();
    // A model with another width at the same path is another base model
    // (refused on shapes alone: nothing is computed).
    let mut cfg = common::tiny_config();
    cfg.hidden_size = 8;
    cfg.intermediate_size = 16;
    let other = tensor_core::testing::with_seed(0, || {
        model_zoo::bert::BertModel::new(cfg, false, Device::Cpu)
    })
    .unwrap();
    let e = reg.record_dims(&other, &["query"]).unwrap_err();
    assert!(matches!(e, Error::Mismatch(_)), "{e}");
    assert!(e.to_string().contains("another base model"), "{e}");
}

#[test]
fn registry_file_round_trips_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reg").join("registry.json");
    let model = common::tiny_bert(0);
    let mut reg = Registry::for_model(
        &model,
        &["query", "value"],
        BasisKind::SvdBins,
        99,
        4,
        FrozenSide::Input,
    )
    .unwrap();
    reg.claim("a").unwrap();
    reg.assign("b", 3).unwrap();
    reg.save(&path).unwrap();
    let back = Registry::load(&path).unwrap();
    assert_eq!(back, reg);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains("\"basis\": \"svd_bins\"") && text.contains("\"frozen_side\": \"input\""),
        "{text}"
    );
    // update() saves only when the closure succeeds.
    assert!(Registry::update(&path, |r| r.claim("a")).is_err());
    assert_eq!(Registry::load(&path).unwrap(), reg);
    assert_eq!(Registry::update(&path, |r| r.claim("c")).unwrap(), 1);
    assert_eq!(Registry::load(&path).unwrap().bin("c").unwrap(), 1);
    // No temporary files are left behind.
    let names: Vec<String> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["registry.json".to_owned()]);
    // A file with one bin held twice is rejected.
    let bad = text.replace("\"b\": 3", "\"b\": 0");
    std::fs::write(&path, bad).unwrap();
    let e = Registry::load(&path).unwrap_err();
    assert!(e.to_string().contains("both hold bin 0"), "{e}");
    std::fs::write(&path, "{\"format\": \"other\"}").unwrap();
    assert!(matches!(Registry::load(&path), Err(Error::File { .. })));
}
