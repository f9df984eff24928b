//! Shared test support for serin integration tests.
