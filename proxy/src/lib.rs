//! serin's data plane: it accepts client connections, splits each request
//! between the stable and canary upstreams, forwards it over a pooled
//! connection, classifies the outcome and records it.
//!
//! It knows nothing of rollouts or judging. Its input is a [`Routes`] handle
//! (the current canary weight) and its output is a [`Stats`] handle that the
//! control plane reads.

pub mod split;
pub mod stats;

pub use split::{RouteTable, Routes, SplitRules, StickyKey, Target};
pub use stats::{Stats, WindowSnapshot};
