//! Files that serin re-reads while it runs (certificates, keys, CA bundles),
//! and the thread that looks at them.
//!
//! Kubernetes rotates a mounted Secret by swapping a symlink, cert-manager
//! renews in place, and neither tells the process. So a [`Reloader`] thread
//! calls its job every interval, and the job asks its [`WatchedFiles`]
//! whether their contents changed. Contents are compared, not modification
//! times (a symlink swap keeps the old file's time), and read twice: files
//! that change between the two reads are caught half-written and left for
//! the next look. The listener's certificate, key and client CA
//! (`serin-tls-reload`), the upstreams' TLS files (`serin-upstream-tls`) and
//! their host names (`serin-resolve`) each have such a thread. Nothing here
//! is on the request path.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

/// A file's bytes as last read, or the read's error in words.
pub(crate) type FileContents = Result<Vec<u8>, String>;

/// Reads `path` for [`WatchedFiles`] and for a first load.
pub(crate) fn read_file(path: &Path) -> FileContents {
    std::fs::read(path).map_err(|e| e.to_string())
}

/// A set of files and their contents when last looked at.
pub(crate) struct WatchedFiles {
    paths: Vec<PathBuf>,
    seen: Vec<FileContents>,
}

impl WatchedFiles {
    /// Watches `paths`, whose contents were `seen` at the first load.
    pub(crate) fn new(paths: Vec<PathBuf>, seen: Vec<FileContents>) -> Self {
        Self { paths, seen }
    }

    /// Reads `paths` now.
    pub(crate) fn read(paths: &[PathBuf]) -> Vec<FileContents> {
        paths.iter().map(|p| read_file(p)).collect()
    }

    /// The files' contents if any changed since the last call (each change
    /// is returned once, whether it is then loaded or refused), and read the
    /// same twice in a row.
    pub(crate) fn changed(&mut self) -> Option<&[FileContents]> {
        let now = Self::read(&self.paths);
        if now == self.seen || now != Self::read(&self.paths) {
            return None;
        }
        self.seen = now;
        Some(&self.seen)
    }
}

/// A thread that runs a job every interval until stopped (or dropped: the
/// thread then ends at its next look).
#[derive(Debug)]
pub(crate) struct Reloader {
    /// Dropped (or sent to) to stop the thread.
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Reloader {
    /// Starts thread `name`, which calls `job` every `interval`.
    pub(crate) fn spawn(
        name: &str,
        interval: Duration,
        mut job: impl FnMut() + Send + 'static,
    ) -> std::io::Result<Self> {
        let (stop, stopped): (Sender<()>, Receiver<()>) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    job();
                }
            })?;
        Ok(Self { stop, thread })
    }

    /// Stops the thread and waits for it (at most one run of the job).
    pub(crate) fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_seen_once() {
        let dir = serin_tests::temp_dir("reload");
        let path = dir.join("f");
        std::fs::write(&path, "one").unwrap();
        let paths = vec![path.clone()];
        let mut files = WatchedFiles::new(paths.clone(), WatchedFiles::read(&paths));
        assert!(files.changed().is_none(), "unchanged");
        std::fs::write(&path, "two").unwrap();
        assert_eq!(files.changed(), Some(&[Ok(b"two".to_vec())][..]));
        assert!(files.changed().is_none(), "seen once");
        std::fs::remove_file(&path).unwrap();
        assert!(
            matches!(files.changed(), Some([Err(_)])),
            "a missing file is a change"
        );
    }
}
