//! serin's control plane: the judge, the rollout state machine, the state
//! store and the controller that ties them to the data plane's route table
//! and stats.
//!
//! Nothing here runs on the request path. The data plane only ever sees the
//! results: a new route table swapped in whole.

pub mod controller;
pub mod judge;
pub mod rollout;
pub mod store;

#[cfg(test)]
mod test_support;

pub use controller::{
    Controller, ControllerConfig, ControllerError, Notification, Status, UpstreamStatus, Upstreams,
};
pub use judge::{Judge, JudgePolicy, PolicyError, Verdict};
pub use rollout::{
    parse_hold, Actor, Event, Phase, Rollout, RolloutError, RolloutSnapshot, RolloutState,
    Transition,
};
pub use store::{PersistedState, StateStore, StoreError};
