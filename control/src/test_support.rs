//! Helpers shared by the unit tests of several modules.

use std::fs;
use std::path::PathBuf;
use std::time::SystemTime;

/// A fresh directory path under the system temp dir, removed on drop.
/// Nothing is created until a test writes there.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(name: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let path =
            std::env::temp_dir().join(format!("serin-{name}-{}-{nanos}", std::process::id()));
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
