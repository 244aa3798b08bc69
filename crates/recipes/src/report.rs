//! Text outputs written atomically (a temporary sibling renamed into place,
//! so a failed or interrupted run leaves the previous file intact).

use std::path::Path;

use crate::AnyResult;

/// Write `text` to `out` atomically, creating its parent folder.
pub fn write_quiet(out: &Path, text: &str) -> AnyResult<()> {
    if let Some(d) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    tensor_core::io::write_atomic(out, |tmp| {
        std::fs::write(tmp, text).map_err(|source| tensor_core::Error::Io {
            path: tmp.to_owned(),
            source,
        })
    })?;
    Ok(())
}

/// Write `text` to `out` atomically, print it, and say where it went.
pub fn write(out: &Path, text: &str) -> AnyResult<()> {
    write_quiet(out, text)?;
    println!("{text}");
    println!("written to {}", out.display());
    Ok(())
}
