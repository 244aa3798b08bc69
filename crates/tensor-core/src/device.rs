//! Where tensors live and what they are made of.
//!
//! `best()` picks CUDA when libtorch sees a GPU and CPU otherwise. Two
//! environment variables override it, for tests and for sharing a machine:
//! `MODULAR_FORCE_CPU=1` forces the CPU, and `MODULAR_DEVICE=cpu|cuda|cuda:N`
//! names a device outright.

use std::fmt;
use std::str::FromStr;

use tch::{Cuda, Device, Kind};

use crate::error::{Error, Result};

pub const FORCE_CPU_VAR: &str = "MODULAR_FORCE_CPU";
pub const DEVICE_VAR: &str = "MODULAR_DEVICE";

/// CUDA device 0 when available, else the CPU, unless the environment says otherwise.
///
/// A malformed `MODULAR_DEVICE` is ignored here (use [`from_env`] to see the error).
pub fn best() -> Device {
    from_env().ok().flatten().unwrap_or_else(|| {
        if cuda_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }
    })
}

/// The device the environment asks for, if any.
pub fn from_env() -> Result<Option<Device>> {
    if std::env::var(FORCE_CPU_VAR).is_ok_and(|v| !v.is_empty() && v != "0") {
        return Ok(Some(Device::Cpu));
    }
    match std::env::var(DEVICE_VAR) {
        Ok(v) if !v.trim().is_empty() => parse_device(&v).map(Some),
        _ => Ok(None),
    }
}

/// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim().to_ascii_lowercase();
    match s.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(Device::Cuda)
            .ok_or_else(|| {
                Error::config(format!(
                    "{DEVICE_VAR}='{s}' is not a device (use cpu, cuda or cuda:N)"
                ))
            }),
    }
}

pub fn cuda_available() -> bool {
    Cuda::is_available()
}

/// Floating-point element types used for weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    pub fn kind(self) -> Kind {
        match self {
            DType::F32 => Kind::Float,
            DType::F16 => Kind::Half,
            DType::BF16 => Kind::BFloat16,
        }
    }

    pub fn from_kind(kind: Kind) -> Result<Self> {
        match kind {
            Kind::Float => Ok(DType::F32),
            Kind::Half => Ok(DType::F16),
            Kind::BFloat16 => Ok(DType::BF16),
            other => Err(Error::DType {
                op: "DType::from_kind".into(),
                expected: "f32, f16 or bf16".into(),
                actual: other,
            }),
        }
    }

    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Default closeness tolerances `(atol, rtol)` for results computed in this type.
    pub fn tolerances(self) -> (f64, f64) {
        match self {
            DType::F32 => (1e-5, 1e-4),
            DType::F16 => (1e-3, 1e-2),
            DType::BF16 => (1e-2, 2e-2),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        })
    }
}

impl FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" | "fp32" => Ok(DType::F32),
            "f16" | "float16" | "half" | "fp16" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            _ => Err(Error::config(format!(
                "unknown dtype '{s}' (use f32, f16 or bf16)"
            ))),
        }
    }
}

/// Is this a floating-point kind (trainable, castable between f32/f16/bf16)?
pub fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device(" CUDA ").unwrap(), Device::Cuda(0));
        assert_eq!(parse_device("cuda:2").unwrap(), Device::Cuda(2));
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("tpu") && e.contains("MODULAR_DEVICE"), "{e}");
    }

    #[test]
    fn dtype_round_trips() {
        for d in DType::ALL {
            assert_eq!(DType::from_kind(d.kind()).unwrap(), d);
            assert_eq!(d.to_string().parse::<DType>().unwrap(), d);
        }
        assert!(DType::from_kind(Kind::Int64).is_err());
        assert!("f8".parse::<DType>().is_err());
    }

    #[test]
    fn best_is_a_usable_device() {
        let d = best();
        if !cuda_available() {
            assert_eq!(d, Device::Cpu);
        }
        let t = tch::Tensor::ones([2], (Kind::Float, d));
        assert_eq!(t.device(), d);
    }
}
