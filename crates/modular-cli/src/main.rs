//! `modular`: the project's command-line entry point.
//!
//! `modular demo` is what `cargo xtask demo` runs. Until `model-zoo` lands it
//! exercises `tensor-core` alone, on MiniLM-sized shapes, and says so: device
//! choice, a feed-forward block, the grouped expert computation checked
//! against the dense block it was cut from, and a safetensors round trip.

use std::process::ExitCode;
use std::time::Instant;

use tensor_core::grouped::{Dispatch, grouped_linear};
use tensor_core::io;
use tensor_core::prelude::*;
use tensor_core::tch;
use tensor_core::testing::{closeness, randn_seeded, with_seed};

/// all-MiniLM-L6-v2's FFN: d_model 384, d_ff 1536.
const D_MODEL: i64 = 384;
const D_FF: i64 = 1536;
const EXPERTS: i64 = 8;

fn demo() -> Result<()> {
    let device = tensor_core::best();
    println!("modular demo");
    println!(
        "  device           {device:?} (CUDA available: {})",
        tensor_core::device::cuda_available()
    );
    println!(
        "  model            none yet: model-zoo (all-MiniLM-L6-v2) has not landed; this demo runs tensor-core only"
    );

    let mut ffn = with_seed(0, || {
        FeedForward::new(D_MODEL, D_FF, Activation::Gelu, FfnNames::bert(), device)
    })?;
    ffn.to_device(device)?;
    let x = randn_seeded(&[32 * 128, D_MODEL], 1, device)?;
    let t = Instant::now();
    let dense = tch::no_grad(|| ffn.forward(&x, &mut Context::eval()))?;
    let dense_ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        "  FeedForward      [{} tokens, {D_MODEL}] -> {D_FF} -> {D_MODEL} in {dense_ms:.1} ms",
        x.size()[0]
    );

    // Cut W1's rows and W2's columns into 8 contiguous experts and send every
    // token to all of them: the grouped computation must give back the dense block.
    let f = D_FF / EXPERTS;
    let grouped = tch::no_grad(|| -> Result<Tensor> {
        let w1 = ffn.w1()?.f_view([EXPERTS, f, D_MODEL])?;
        let b1 = ffn.b1()?.expect("bias").f_view([EXPERTS, f])?;
        let w2 = ffn
            .w2()?
            .f_view([D_MODEL, EXPERTS, f])?
            .f_permute([1, 0, 2])?;
        let n = x.size()[0];
        let idx =
            Tensor::f_arange(EXPERTS, (Kind::Int64, device))?.f_expand([n, EXPERTS], false)?;
        let d = Dispatch::new(&idx, EXPERTS)?;
        let counts = d.counts_host()?;
        let h = grouped_linear(&d.permute(&x)?, &counts, &w1, Some(&b1))?;
        let h = Activation::Gelu.apply(&h)?;
        let y = grouped_linear(&h, &counts, &w2, None)?;
        Ok(d.unpermute(&y, None)?.f_add(ffn.b2()?.expect("bias"))?)
    })?;
    let c = closeness(&grouped, &dense, 1e-4, 1e-4)?;
    println!(
        "  grouped experts  {EXPERTS} experts x {f} neurons, all selected: max |err| vs dense {:.2e} ({})",
        c.max_abs,
        if c.ok { "ok" } else { "MISMATCH" }
    );

    let dir = std::env::temp_dir().join(format!("modular-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        path: dir.clone(),
        source,
    })?;
    let path = dir.join("ffn.safetensors");
    let params = ffn.named_parameters();
    let refs: Vec<(&str, &Tensor)> = params.iter().map(|(n, t)| (n.as_str(), t)).collect();
    io::save(&path, &refs, None)?;
    let back = io::load(&path, Device::Cpu)?;
    let exact = back.len() == params.len()
        && params.iter().all(|(name, p)| {
            back.iter()
                .any(|(n, t)| n == name && t.equal(&p.to_device(Device::Cpu)))
        });
    println!(
        "  safetensors      {} tensors ({}) written and read back: {}",
        back.len(),
        back.iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        if exact { "bit-exact" } else { "DIFFERENT" }
    );
    let _ = std::fs::remove_dir_all(&dir);
    if !c.ok || !exact {
        return Err(Error::config("demo checks failed"));
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") | None => demo(),
        Some(other) => {
            eprintln!("unknown command '{other}'\nusage: modular demo");
            return ExitCode::FAILURE;
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("modular: {e}");
            ExitCode::FAILURE
        }
    }
}
