//! safetensors I/O: bit-exact round trips for every dtype, truncated and
//! corrupt files named, weights refused when integer or non-finite, atomic
//! writes that leave the old file on failure and honour the umask.

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};
use tensor_core::Error;
use tensor_core::io::{SafetensorsFile, load, save};
use tensor_core::testing::{device, randn_seeded};

/// Files are written from host tensors; what is read back is read onto the
/// test device only where the device path is under test (round trip).
const CPU: Device = Device::Cpu;

/// The raw bytes of `t`, copied to the host.
fn bytes(t: &Tensor) -> Vec<u8> {
    let n = t.numel();
    let mut v = vec![0u8; n * t.kind().elt_size_in_bytes()];
    t.contiguous().copy_data_u8(&mut v, n);
    v
}

#[test]
fn round_trip_is_bit_exact_for_every_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all.safetensors");
    let base = randn_seeded(&[3, 5], 1, CPU).unwrap() * 1000.0;
    // Special values must survive too (NaN payload, infinities, signed zero, subnormal).
    let special = Tensor::from_slice(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 1e-40]);
    let tensors = vec![
        ("f32", base.shallow_clone()),
        ("f16", base.to_kind(Kind::Half)),
        ("bf16", base.to_kind(Kind::BFloat16)),
        ("f64", base.to_kind(Kind::Double)),
        ("i64", Tensor::from_slice(&[i64::MIN, -1, 0, 1, i64::MAX])),
        ("i32", Tensor::from_slice(&[i32::MIN, 7, i32::MAX])),
        ("u8", Tensor::from_slice(&[0u8, 255])),
        ("bool", Tensor::from_slice(&[true, false, true])),
        ("special", special),
        ("scalar", Tensor::from(3.5f32)),
        ("empty", Tensor::zeros([0, 4], (Kind::Float, CPU))),
        ("strided", base.tr()),
    ];
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    save(&path, &refs, Some(meta.clone())).unwrap();
    let f = SafetensorsFile::open(&path).unwrap();
    assert_eq!(f.metadata(), Some(&meta));
    assert_eq!(f.names().len(), tensors.len());
    // Read onto the test device: a bit-exact copy there too.
    let dev = device();
    for (name, t) in &tensors {
        let back = f.load(name, dev).unwrap();
        assert_eq!(back.device(), dev, "{name}");
        assert_eq!(back.kind(), t.kind(), "{name}");
        assert_eq!(back.size(), t.size(), "{name}");
        assert_eq!(bytes(&back), bytes(t), "{name} not bit-exact");
    }
    let all = load(&path, dev).unwrap();
    assert_eq!(all.len(), tensors.len());
    assert!(all.iter().all(|(_, t)| t.device() == dev));
    // No temporary file is left beside the result.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

fn write_sample(path: &std::path::Path) -> Vec<u8> {
    let a = randn_seeded(&[4, 4], 2, CPU).unwrap();
    let b = Tensor::from_slice(&[1i64, 2, 3]);
    save(path, &[("a", &a), ("b", &b)], None).unwrap();
    std::fs::read(path).unwrap()
}

#[test]
fn truncated_file_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    let full = write_sample(&path);
    for cut in [0, 4, 8, 20, full.len() - 1] {
        std::fs::write(&path, &full[..cut]).unwrap();
        let e = SafetensorsFile::open(&path).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, Error::File { .. }), "cut {cut}: {text}");
        assert!(text.contains("t.safetensors"), "{text}");
    }
}

#[test]
fn corrupt_header_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    let mut full = write_sample(&path);
    full[10] = b'}';
    full[11] = b'{';
    std::fs::write(&path, &full).unwrap();
    let text = SafetensorsFile::open(&path).unwrap_err().to_string();
    assert!(
        text.contains("c.safetensors") && text.contains("header"),
        "{text}"
    );
    // An absurd header length.
    let mut huge = full.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &huge).unwrap();
    assert!(SafetensorsFile::open(&path).is_err());
}

/// A hand-written file whose header declares more bytes than a tensor's
/// dtype and shape can hold.
#[test]
fn mislabelled_tensor_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let header = br#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,8]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0u8; 8]);
    std::fs::write(&path, &file).unwrap();
    let text = SafetensorsFile::open(&path).unwrap_err().to_string();
    assert!(text.contains("m.safetensors"), "{text}");
    // An unsupported dtype names the tensor.
    let header = br#"{"w8":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0u8; 4]);
    std::fs::write(&path, &file).unwrap();
    let text = SafetensorsFile::open(&path).unwrap_err().to_string();
    assert!(text.contains("w8") && text.contains("F8_E4M3"), "{text}");
}

#[test]
fn unknown_tensor_lists_available_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u.safetensors");
    write_sample(&path);
    let f = SafetensorsFile::open(&path).unwrap();
    let text = f.load("c", CPU).unwrap_err().to_string();
    assert!(text.contains("'c'") && text.contains("a, b"), "{text}");
    assert_eq!(f.info("a").unwrap(), (Kind::Float, vec![4, 4]));
}

#[test]
fn failed_save_leaves_old_file_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keep.safetensors");
    let before = write_sample(&path);
    let a = Tensor::zeros([2], (Kind::Float, CPU));
    // Duplicate names and an unsupported dtype both fail before anything is written.
    assert!(save(&path, &[("x", &a), ("x", &a)], None).is_err());
    let c = Tensor::zeros([2], (Kind::ComplexFloat, CPU));
    let text = save(&path, &[("cplx", &c)], None).unwrap_err().to_string();
    assert!(text.contains("cplx"), "{text}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let entries = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(entries, 1);
    // A folder that does not exist: an I/O error naming the path, nothing created.
    let missing = dir.path().join("no/such/dir/x.safetensors");
    let text = save(&missing, &[("a", &a)], None).unwrap_err().to_string();
    assert!(text.contains("no/such/dir"), "{text}");
}

#[test]
fn missing_file_is_an_io_error() {
    let e = SafetensorsFile::open("/nonexistent/model.safetensors").unwrap_err();
    assert!(matches!(e, Error::Io { .. }));
    assert!(e.to_string().contains("/nonexistent/model.safetensors"));
}

#[test]
fn load_weight_refuses_integer_dtypes_and_non_finite_values_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let good = randn_seeded(&[2, 3], 4, CPU).unwrap();
    let half = good.to_kind(Kind::Half);
    let ints = Tensor::from_slice(&[1i32, 2, 3]);
    let flags = Tensor::from_slice(&[true, false]);
    let nan = Tensor::from_slice(&[0.0f32, f32::NAN, 1.0]);
    let inf = Tensor::from_slice(&[f32::INFINITY, 0.0]).to_kind(Kind::BFloat16);
    let refs = [
        ("good", &good),
        ("half", &half),
        ("ints", &ints),
        ("flags", &flags),
        ("nan", &nan),
        ("inf", &inf),
    ];
    save(&path, &refs, None).unwrap();
    let f = SafetensorsFile::open(&path).unwrap();
    // Float weights come back as stored, bit for bit.
    assert_eq!(bytes(&f.load_weight("good", CPU).unwrap()), bytes(&good));
    assert_eq!(f.load_weight("half", CPU).unwrap().kind(), Kind::Half);
    for (name, needle) in [
        ("ints", "stored as Int"),
        ("flags", "stored as Bool"),
        ("nan", "1 non-finite value(s)"),
        ("inf", "1 non-finite value(s)"),
    ] {
        let e = f.load_weight(name, CPU).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, Error::File { ref tensor, .. } if tensor == name),
            "{msg}"
        );
        assert!(msg.contains("w.safetensors"), "{msg}");
        assert!(msg.contains(needle), "{name}: {msg}");
    }
    // `load` itself stays a raw reader.
    assert_eq!(f.load("ints", CPU).unwrap().kind(), Kind::Int);
    // The whole-file form stops at the first bad tensor (sorted names: "flags").
    let e = f.load_all_weights(CPU).unwrap_err();
    assert!(
        matches!(e, Error::File { ref tensor, .. } if tensor == "flags"),
        "{e}"
    );
}

#[test]
fn write_errors_say_write_and_outputs_honour_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let t = Tensor::from_slice(&[1.0f32, 2.0]);
    // A folder where the file should be: the write fails, and says so.
    let path = dir.path().join("taken.safetensors");
    std::fs::create_dir(&path).unwrap();
    let e = save(&path, &[("t", &t)], None).unwrap_err().to_string();
    assert!(e.contains("taken.safetensors"), "{e}");
    assert!(!e.contains("(header)"), "{e}");
    // The written file gets the usual 0666 minus the umask (0644 under 022),
    // not a temporary file's 0600.
    let path = dir.path().join("ok.safetensors");
    save(&path, &[("t", &t)], None).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    let probe = dir.path().join("probe");
    std::fs::write(&probe, b"").unwrap();
    let expected = std::fs::metadata(&probe).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, expected, "{mode:o} vs a plain file's {expected:o}");
}
