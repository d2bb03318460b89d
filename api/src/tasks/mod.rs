//! Everything about tasks: the resource (`model`), its SQL (`store`), the coalesced inserts
//! of submissions (`intake`) and its endpoints (`routes`).

pub mod intake;
pub mod model;
pub mod routes;
pub mod store;
