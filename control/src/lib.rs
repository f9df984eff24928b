//! serin control plane (under construction).
