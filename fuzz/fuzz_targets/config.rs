//! Config parsing (`Config::parse_toml`, then `Config::from_raw` with no
//! overrides) on arbitrary text.
//!
//! Properties: it never panics; every error says something (its message,
//! not only the key it names, is non-empty); and an accepted config is
//! within the documented bounds (1 to 256 workers, a weight of at most
//! 100%, request heads of 8 KiB to 1 MiB, at least one request in flight).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use serin_control::config::{Config, ConfigError, Overrides};

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let parsed = Config::parse_toml(text, Path::new("fuzz.toml"))
        .and_then(|raw| Config::from_raw(raw, &Overrides::default()));
    match parsed {
        Err(e) => check_error(&e),
        Ok(config) => {
            let proxy = &config.proxy;
            assert!((1..=256).contains(&proxy.workers), "workers");
            assert!(config.canary_weight_bp <= 10_000, "canary weight");
            assert!((8 * 1024..=1024 * 1024).contains(&proxy.max_header_bytes));
            assert!(proxy.max_inflight >= 1, "max_inflight");
        }
    }
});

fn check_error(e: &ConfigError) {
    let says = match e {
        ConfigError::Read { .. } | ConfigError::Tls(_) | ConfigError::UpstreamTls { .. } => {
            unreachable!("no file is read")
        }
        ConfigError::Parse { message, .. }
        | ConfigError::Invalid { message, .. }
        | ConfigError::Policy(message) => message.as_str(),
        ConfigError::Missing { hint, .. } => hint,
    };
    assert!(!says.trim().is_empty(), "empty error message: {e:?}");
    assert!(!e.to_string().trim().is_empty(), "empty error: {e:?}");
}
