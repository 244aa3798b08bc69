//! Numbers for the report, not a benchmark: k-means objective against the
//! random and contiguous baselines at MiniLM's FFN size (1536 x 384), on
//! random keys and, when `EMOE_KEYS` names a BERT safetensors file (e.g.
//! all-MiniLM-L6-v2's `model.safetensors`), on its real `W1` rows.
//! Run with `cargo test -p emergent-split --release --test measure -- --ignored --nocapture`.

use std::time::Instant;

use emergent_split::kmeans::{KMeansConfig, balanced_kmeans, normalize_rows, objective};
use emergent_split::split::{contiguous_split, random_split};
use tensor_core::tch::Tensor;
use tensor_core::testing::{device, randn_seeded};

fn report(what: &str, keys: &Tensor, n: usize) {
    let x = normalize_rows(keys).unwrap();
    let d_ff = x.size()[0] as usize;
    let t = Instant::now();
    let r = balanced_kmeans(&x, &KMeansConfig::new(n)).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let rnd = objective(&x, &random_split(d_ff, n, 0).unwrap().labels, n).unwrap();
    let cont = objective(&x, &contiguous_split(d_ff, n).unwrap().labels, n).unwrap();
    println!(
        "{what:<28} N={n:<3} kmeans J={:>10.3} ({} iters, converged {}, {secs:.2}s)  random J={rnd:>10.3}  contiguous J={cont:>10.3}  kmeans/random={:.4}",
        r.objective,
        r.iterations,
        r.converged,
        r.objective / rnd
    );
}

#[test]
#[ignore = "measurement for the report; slow in debug builds"]
fn kmeans_vs_baselines() {
    // Keys on the test device; k-means takes them to the host (by design).
    let dev = device();
    let keys = randn_seeded(&[1536, 384], 0, dev).unwrap();
    for n in [16, 64] {
        report("random gaussian keys", &keys, n);
    }
    if let Ok(path) = std::env::var("EMOE_KEYS") {
        let f = tensor_core::io::SafetensorsFile::open(&path).unwrap();
        for layer in 0..6 {
            let name = format!("encoder.layer.{layer}.intermediate.dense.weight");
            let alt = format!("bert.{name}");
            let w = if f.contains(&name) {
                f.load(&name, dev)
            } else {
                f.load(&alt, dev)
            };
            let Ok(w) = w else { break };
            for n in [16, 64] {
                report(&format!("MiniLM layer {layer} W1"), &w, n);
            }
        }
    }
}
