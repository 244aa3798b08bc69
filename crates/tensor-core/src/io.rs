//! safetensors I/O: memory-mapped reads onto any device, atomic writes.
//!
//! Reading maps the file and validates the whole header once (offsets,
//! sizes, dtypes), so a truncated or corrupt file fails at `open` with the
//! file's name, and a tensor whose bytes do not match its declared dtype and
//! shape fails naming that tensor. Writing goes to a temporary file in the
//! target folder, is synced, then renamed over the target: a failure leaves
//! the old file (or nothing) in place, never half a file.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// Where one tensor's bytes are, inside the mapped file.
#[derive(Debug, Clone)]
struct Entry {
    kind: Kind,
    shape: Vec<i64>,
    start: usize,
    end: usize,
}

/// An open, validated safetensors file.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    map: Mmap,
    entries: BTreeMap<String, Entry>,
    metadata: Option<HashMap<String, String>>,
}

fn file_err(path: &Path, tensor: &str, reason: impl Into<String>) -> Error {
    Error::File {
        path: path.to_owned(),
        tensor: tensor.to_owned(),
        reason: reason.into(),
    }
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

impl SafetensorsFile {
    /// Map and validate `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_owned();
        let file = File::open(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the map is read-only; a concurrent writer truncating the
        // file could fault, which is why our own writes go through rename.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let (entries, metadata) = {
            let (_, meta) = SafeTensors::read_metadata(&map[..]).map_err(|e| {
                file_err(
                    &path,
                    "(header)",
                    format!("corrupt or truncated header: {e}"),
                )
            })?;
            let st = SafeTensors::deserialize(&map[..]).map_err(|e| {
                file_err(&path, "(header)", format!("corrupt or truncated file: {e}"))
            })?;
            let base = map.as_ptr() as usize;
            let mut entries = BTreeMap::new();
            for (name, view) in st.tensors() {
                let kind = kind_of(view.dtype()).ok_or_else(|| {
                    file_err(
                        &path,
                        &name,
                        format!("unsupported dtype {:?}", view.dtype()),
                    )
                })?;
                let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
                let numel: usize = view.shape().iter().product();
                let data = view.data();
                if data.len() != numel * kind.elt_size_in_bytes() {
                    return Err(file_err(
                        &path,
                        &name,
                        format!(
                            "{} bytes do not hold {numel} {:?} values",
                            data.len(),
                            view.dtype()
                        ),
                    ));
                }
                let start = data.as_ptr() as usize - base;
                entries.insert(
                    name,
                    Entry {
                        kind,
                        shape,
                        start,
                        end: start + data.len(),
                    },
                );
            }
            (entries, meta.metadata().clone())
        };
        Ok(Self {
            path,
            map,
            entries,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The `__metadata__` string map, if the file has one.
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.as_ref()
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| {
            Error::unknown(
                format!("tensor in {}", self.path.display()),
                name,
                self.names(),
            )
        })
    }

    /// Declared kind and shape, without reading the data.
    pub fn info(&self, name: &str) -> Result<(Kind, Vec<i64>)> {
        let e = self.entry(name)?;
        Ok((e.kind, e.shape.clone()))
    }

    /// Read one tensor onto `device` (its stored dtype is kept).
    pub fn load(&self, name: &str, device: Device) -> Result<Tensor> {
        let e = self.entry(name)?;
        let bytes = &self.map[e.start..e.end];
        let t = Tensor::f_from_data_size(bytes, &e.shape, e.kind)
            .map_err(|err| file_err(&self.path, name, crate::error::torch_message(&err)))?;
        if device == Device::Cpu {
            Ok(t)
        } else {
            t.f_to_device(device)
                .map_err(|err| file_err(&self.path, name, crate::error::torch_message(&err)))
        }
    }

    /// Read one floating-point weight onto `device`, refusing what a model
    /// or adapter must never be given: a tensor stored with an integer or
    /// bool dtype (copying it into a float parameter would turn codes into
    /// numbers silently) and a tensor holding NaN or Inf. Both errors name the
    /// file and the tensor. The stored float dtype is kept (callers upcast).
    pub fn load_weight(&self, name: &str, device: Device) -> Result<Tensor> {
        let e = self.entry(name)?;
        if !crate::device::is_float(e.kind) {
            return Err(file_err(
                &self.path,
                name,
                format!(
                    "stored as {:?}, but a weight must be floating point (F32, F16, BF16 or F64)",
                    e.kind
                ),
            ));
        }
        let t = self.load(name, device)?;
        let bad = t
            .f_isfinite()
            .and_then(|f| f.f_logical_not())
            .and_then(|f| f.f_sum(Kind::Int64))
            .map_err(|err| file_err(&self.path, name, crate::error::torch_message(&err)))?
            .int64_value(&[]);
        if bad > 0 {
            return Err(file_err(
                &self.path,
                name,
                format!(
                    "holds {bad} non-finite value(s) (NaN or Inf) of {}",
                    t.numel()
                ),
            ));
        }
        Ok(t)
    }

    /// [`SafetensorsFile::load_weight`] for every tensor of the file.
    pub fn load_all_weights(&self, device: Device) -> Result<Vec<(String, Tensor)>> {
        self.entries
            .keys()
            .map(|n| Ok((n.clone(), self.load_weight(n, device)?)))
            .collect()
    }

    /// Read every tensor onto `device`.
    pub fn load_all(&self, device: Device) -> Result<Vec<(String, Tensor)>> {
        self.entries
            .keys()
            .map(|n| Ok((n.clone(), self.load(n, device)?)))
            .collect()
    }
}

/// Read every tensor of a file onto `device`.
pub fn load(path: impl AsRef<Path>, device: Device) -> Result<Vec<(String, Tensor)>> {
    SafetensorsFile::open(path)?.load_all(device)
}

/// A tensor's bytes, copied to the host, in the form `safetensors` serialises.
struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn to_host(path: &Path, name: &str, t: &Tensor) -> Result<HostTensor> {
    let kind = t
        .f_kind()
        .map_err(|e| file_err(path, name, crate::error::torch_message(&e)))?;
    let dtype = dtype_of(kind)
        .ok_or_else(|| file_err(path, name, format!("cannot store dtype {kind:?}")))?;
    let t = t
        .f_detach()
        .and_then(|t| t.f_to_device(Device::Cpu))
        .and_then(|t| t.f_contiguous())
        .map_err(|e| file_err(path, name, crate::error::torch_message(&e)))?;
    let numel = t.numel();
    let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
    t.f_copy_data_u8(&mut data, numel)
        .map_err(|e| file_err(path, name, crate::error::torch_message(&e)))?;
    Ok(HostTensor {
        dtype,
        shape: t.size().iter().map(|&d| d as usize).collect(),
        data,
    })
}

/// Write named tensors (any device, any supported dtype) to `path`, atomically.
pub fn save<S: AsRef<str>>(
    path: impl AsRef<Path>,
    tensors: &[(S, &Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let mut host = BTreeMap::new();
    for (name, t) in tensors {
        let name = name.as_ref();
        if host
            .insert(name.to_owned(), to_host(path, name, t)?)
            .is_some()
        {
            return Err(file_err(path, name, "the same name is given twice"));
        }
    }
    write_atomic(path, |tmp| {
        safetensors::serialize_to_file(host.iter().map(|(n, t)| (n.as_str(), t)), metadata, tmp)
            .map_err(|e| file_err(path, "(write)", format!("write failed: {e}")))
    })
}

/// Run `write` on a temporary path beside `path`, sync it, then rename it
/// over `path`. On any failure the temporary file is removed and `path` is
/// left as it was. The result has the mode a new file gets (0666 less the
/// umask), whatever the writer did.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| io(std::io::Error::other("not a file path")))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    // The mode a plain new file gets here (0666 less the umask). Writers
    // that go through a temporary file of their own (safetensors does) would
    // leave 0600; the output gets the usual mode back before it is renamed.
    let mode = File::create(&tmp)
        .and_then(|f| f.metadata())
        .map(|m| m.permissions())
        .map_err(io);
    let result = mode.and_then(|mode| {
        write(&tmp)?;
        std::fs::set_permissions(&tmp, mode).map_err(io)?;
        File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
