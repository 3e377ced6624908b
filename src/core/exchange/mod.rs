//! Exchanges and routing.

pub mod headers;
pub mod topic;
