//! The fake OTLP/HTTP collector (`proxy/tests/otlp/collector.py`, which
//! decodes with PyPI's official `opentelemetry-proto` classes), started as a
//! process for tests that run a whole proxy against it.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// A running collector; killed when dropped.
pub struct OtlpCollector {
    _child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// Its OTLP/HTTP traces URL.
    pub endpoint: String,
}

fn otlp_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proxy/tests/otlp")
}

/// The `NAME==VERSION` lines of `requirements.txt`.
fn pins() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(otlp_dir().join("requirements.txt"))
        .expect("proxy/tests/otlp/requirements.txt");
    text.lines()
        .filter_map(|l| l.trim().split_once("=="))
        .map(|(name, version)| (name.to_string(), version.to_string()))
        .collect()
}

/// A Python with the pinned OTLP classes: `SERIN_OTLP_PYTHON`, else the
/// venv `proxy/tests/otlp/venv.sh` creates once, so `cargo test --workspace`
/// runs on a fresh machine. Looked for once per test process.
pub fn python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let python = std::env::var("SERIN_OTLP_PYTHON").unwrap_or_else(|_| {
            let out = std::process::Command::new("bash")
                .arg(otlp_dir().join("venv.sh"))
                .stderr(Stdio::inherit())
                .output()
                .expect("run proxy/tests/otlp/venv.sh");
            assert!(
                out.status.success(),
                "proxy/tests/otlp/venv.sh could not install the OTLP classes from PyPI"
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        });
        for (name, version) in pins() {
            let out = std::process::Command::new(&python)
                .args(["-c", &format!("import importlib.metadata as m; print(m.version({name:?}))")])
                .output()
                .expect("run the OTLP venv's python");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                version,
                "{python} must have {name}=={version} (pip install -r proxy/tests/otlp/requirements.txt)"
            );
        }
        python
    })
}

impl OtlpCollector {
    /// Starts the collector on 127.0.0.1, port 0, and waits until it listens.
    pub async fn start() -> Self {
        let mut child = Command::new(python())
            .arg(otlp_dir().join("collector.py"))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start proxy/tests/otlp/collector.py");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("collector.py listens within 30 s")
            .unwrap()
            .expect("collector.py exited before listening");
        let (_, addr) = first
            .rsplit_once("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from collector.py: {first}"));
        Self {
            _child: child,
            lines,
            endpoint: format!("http://{addr}/v1/traces"),
        }
    }

    /// The next span the collector decoded, as `MessageToDict` gives it
    /// (see collector.py), or `None` after `wait` without one.
    pub async fn next_span(&mut self, wait: Duration) -> Option<serde_json::Value> {
        let line = tokio::time::timeout(wait, self.lines.next_line())
            .await
            .ok()?
            .ok()??;
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")))
    }
}
