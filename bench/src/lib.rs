//! serin benchmarks (under construction).
