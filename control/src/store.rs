//! The state store: the rollout's phase, weight, step, latch and history on
//! disk, so that a restart (or a `kill -9`) keeps a reverted canary at 0.
//!
//! Every save is atomic: write a temporary file in the same directory, fsync
//! it, rename it over `state.json`, fsync the directory. A reader sees the
//! old file or the new one, never a mix. A file that cannot be read or
//! parsed is an error the caller must answer on the safe side (canary at 0);
//! this module never guesses at a partial state.
//!
//! Its I/O is blocking `std::fs`: call it off the request path (the
//! controller uses `spawn_blocking`).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::rollout::RolloutState;

/// The state file's name inside the state directory.
pub const STATE_FILE: &str = "state.json";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Prefix of temporary files, so a crash's leftovers are recognisable.
const TEMP_PREFIX: &str = ".state.json.tmp-";

/// What is saved: a format version and the rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PersistedState {
    /// The file format version ([`FORMAT_VERSION`] when written by this build).
    pub version: u32,
    /// The rollout state machine's persisted form.
    pub rollout: RolloutState,
}

impl PersistedState {
    /// The current format wrapping `rollout`.
    pub fn new(rollout: RolloutState) -> Self {
        Self {
            version: FORMAT_VERSION,
            rollout,
        }
    }
}

/// Why state could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file exists but could not be read.
    #[error("cannot read state file {}: {source}", path.display())]
    Read {
        /// The state file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file is not valid state JSON.
    #[error(
        "state file {} is corrupt ({source}); move it aside or delete it to start fresh",
        path.display()
    )]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The file was written by an incompatible version of serin.
    #[error(
        "state file {} has format version {found}, but this serin reads version {expected}; \
         move it aside to start fresh",
        path.display()
    )]
    Version {
        /// The state file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The version this build reads.
        expected: u32,
    },
    /// The state could not be written.
    #[error("cannot write state to {}: {source}; check that the state directory (--state-dir) is writable", path.display())]
    Write {
        /// The file or directory being written.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// The state directory. Cheap to clone.
#[derive(Clone, Debug)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// A store in `dir` (created on the first save).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The state file, `<dir>/state.json`.
    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Reads the saved state: `Ok(None)` when there is none yet (no file, or
    /// no directory), an error when it exists but cannot be used.
    pub fn load(&self) -> Result<Option<PersistedState>, StoreError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let corrupt = |source| StoreError::Corrupt {
            path: path.clone(),
            source,
        };
        let Version { version } = serde_json::from_slice(&bytes).map_err(corrupt)?;
        if version != FORMAT_VERSION {
            return Err(StoreError::Version {
                path,
                found: version,
                expected: FORMAT_VERSION,
            });
        }
        serde_json::from_slice(&bytes).map(Some).map_err(corrupt)
    }

    /// Moves an unusable state file aside, to `state.json.corrupt-<unix
    /// seconds>`, so that the next save does not destroy the evidence.
    /// Returns where it went.
    pub fn quarantine(&self) -> io::Result<PathBuf> {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let aside = self.dir.join(format!("{STATE_FILE}.corrupt-{secs}"));
        fs::rename(self.path(), &aside)?;
        Ok(aside)
    }

    /// Saves `state` atomically (temp file, fsync, rename, fsync of the
    /// directory), creating the directory if needed.
    pub fn save(&self, state: &PersistedState) -> Result<(), StoreError> {
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Write { path, source }
        };
        fs::create_dir_all(&self.dir).map_err(write_err(&self.dir))?;
        let bytes = serde_json::to_vec_pretty(state)
            .map_err(|e| write_err(&self.dir)(io::Error::other(e)))?;

        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        let temp = self.dir.join(format!(
            "{TEMP_PREFIX}{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        ));
        let written = write_synced(&temp, &bytes).and_then(|()| fs::rename(&temp, self.path()));
        if let Err(source) = written {
            // Best effort: the error that matters is the one returned.
            let _ = fs::remove_file(&temp);
            return Err(StoreError::Write {
                path: self.path(),
                source,
            });
        }
        sync_dir(&self.dir).map_err(write_err(&self.dir))
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Makes the rename durable: fsync the directory that holds the entry.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Directories cannot be opened for fsync here; the rename is all we have.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;
    use crate::rollout::{Actor, Rollout};
    use crate::test_support::TempDir;

    fn state() -> PersistedState {
        let mut rollout = Rollout::new(Instant::now());
        rollout.set_weight(12.5, Actor::Api).unwrap();
        rollout.rollback(Actor::Judge, "12 consecutive canary errors".into());
        PersistedState::new(rollout.to_state())
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn round_trip_creates_the_directory() {
        let tmp = TempDir::new("store-round-trip");
        let store = StateStore::new(tmp.0.join("nested").join("state"));
        assert!(store.load().unwrap().is_none(), "no directory yet");
        let saved = state();
        store.save(&saved).unwrap();
        assert_eq!(store.load().unwrap(), Some(saved.clone()));
        let text = fs::read_to_string(store.path()).unwrap();
        assert!(text.contains("\"version\": 1"), "{text}");
        assert!(text.contains("\"phase\": \"rolled_back\""), "{text}");
    }

    #[test]
    fn replace_leaves_no_temp_files() {
        let tmp = TempDir::new("store-replace");
        let store = StateStore::new(&tmp.0);
        let mut s = state();
        for i in 0..5 {
            s.rollout.reason = format!("save {i}");
            store.save(&s).unwrap();
        }
        assert_eq!(files(&tmp.0), [STATE_FILE]);
        assert_eq!(store.load().unwrap().unwrap().rollout.reason, "save 4");
    }

    #[test]
    fn corrupt_file_is_an_error_that_says_what_to_do() {
        let tmp = TempDir::new("store-corrupt");
        let store = StateStore::new(&tmp.0);
        fs::create_dir_all(&tmp.0).unwrap();
        fs::write(
            store.path(),
            b"{\"version\": 1, \"rollout\": {\"phase\": \"gar",
        )
        .unwrap();
        let err = store.load().unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("state.json is corrupt"), "{text}");
        assert!(
            text.ends_with("move it aside or delete it to start fresh"),
            "{text}"
        );

        fs::write(store.path(), b"\x00\xff not json").unwrap();
        assert!(matches!(store.load(), Err(StoreError::Corrupt { .. })));

        let aside = store.quarantine().unwrap();
        assert!(aside
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("state.json.corrupt-"));
        assert!(store.load().unwrap().is_none());
        assert_eq!(fs::read(aside).unwrap(), b"\x00\xff not json");
    }

    #[test]
    fn other_versions_are_refused() {
        let tmp = TempDir::new("store-version");
        let store = StateStore::new(&tmp.0);
        let mut s = state();
        s.version = 2;
        store.save(&s).unwrap();
        let err = store.load().unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Version {
                    found: 2,
                    expected: 1,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn unreadable_file_is_an_error() {
        let tmp = TempDir::new("store-unreadable");
        let store = StateStore::new(&tmp.0);
        // A directory where the file should be cannot be read as one.
        fs::create_dir_all(store.path()).unwrap();
        let err = store.load().unwrap_err();
        assert!(matches!(err, StoreError::Read { .. }), "{err:?}");
        // Nor can it be replaced; the error names the remedy.
        let err = store.save(&state()).unwrap_err();
        assert!(
            err.to_string().contains("check that the state directory"),
            "{err}"
        );
        assert_eq!(files(&tmp.0), [STATE_FILE], "the temp file was removed");
    }
}
