//! Everything about tasks: what the server checks (`model`), its SQL (`store`), the fenced
//! writes of an attempt (`lease`), the coalesced inserts of submissions (`intake`) and its
//! endpoints (`routes`).

pub mod intake;
pub mod journal;
pub mod lease;
pub mod model;
pub mod routes;
pub mod store;
