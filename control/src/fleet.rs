//! Fleet mode: many serins (the sidecars of one Deployment, or replicas of a
//! standalone proxy) share one rollout held in the Kubernetes API as a
//! [`crd::SerinRollout`]. Without `--fleet`, nothing here runs.

pub mod crd;
