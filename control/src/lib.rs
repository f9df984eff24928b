//! serin control plane (under construction).
pub mod inject;
