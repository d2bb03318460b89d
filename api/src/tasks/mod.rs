//! Everything about tasks: the resource (`model`), its SQL (`store`) and its endpoints
//! (`routes`).

pub mod model;
pub mod routes;
pub mod store;
