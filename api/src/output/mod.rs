//! Live output: agents upload what a running command prints, users read it by offset, follow
//! the combined log, or wait for the task to end.

pub mod feed;
pub mod routes;
pub mod store;
