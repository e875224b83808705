//! Read-only memory maps of model files.

#![allow(
    unsafe_code,
    reason = "memory-mapping a file is unsafe: another process could change it while mapped"
)]

use std::{fs::File, path::Path};

use memmap2::Mmap;

/// Maps `path` read-only.
///
/// The map is only read while the model is loaded; if another process truncated the file in
/// that time the process could fault, which is the accepted contract of mapping model files.
pub fn map(path: &Path) -> std::io::Result<Mmap> {
    let file = File::open(path)?;
    // SAFETY: the map is read-only and only read during loading; see the function docs.
    unsafe { Mmap::map(&file) }
}
