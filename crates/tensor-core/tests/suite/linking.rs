//! The linking promise of `cargo xtask setup`: every test executable has an
//! rpath to torch's lib folder and keeps `libtorch_cuda` linked, so CUDA is
//! registered on a GPU machine without any extra step.

use std::path::PathBuf;
use std::process::Command;

/// torch's lib folder, as libtorch_cpu was resolved by the loader.
fn torch_lib_dir() -> PathBuf {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    let path = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .expect("libtorch_cpu.so is mapped");
    PathBuf::from(path).parent().unwrap().to_owned()
}

#[test]
fn test_executable_links_libtorch_cuda() {
    // Touch libtorch so it is certainly loaded (on the CPU: only the loaded
    // libraries matter here, not where a tensor lives).
    let _ = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
    let lib = torch_lib_dir();
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("ldd").arg(&exe).output().expect("run ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    if lib.join("libtorch_cuda.so").exists() {
        let line = text
            .lines()
            .find(|l| l.contains("libtorch_cuda.so"))
            .unwrap_or_else(|| panic!("ldd {} lists no libtorch_cuda.so:\n{text}", exe.display()));
        assert!(!line.contains("not found"), "{line}");
    }
    // Resolved through the rpath, without LD_LIBRARY_PATH.
    let cpu = text
        .lines()
        .find(|l| l.contains("libtorch_cpu.so"))
        .expect("libtorch_cpu in ldd");
    assert!(cpu.contains(lib.to_str().unwrap()), "{cpu}");
}

#[test]
fn cuda_query_does_not_fail() {
    // On a GPU machine this is true; here it must simply answer.
    let available = tch::Cuda::is_available();
    assert_eq!(available, tch::Cuda::device_count() > 0);
    if available {
        assert_eq!(tensor_core::best(), tch::Device::Cuda(0));
    }
}
