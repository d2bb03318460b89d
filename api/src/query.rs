//! Query parameters, strictly: every route takes its declared parameters only, each at most
//! once, and each parsed here so that a bad one gets a 400 problem that names it. (Rocket's
//! own parsing would ignore an unknown parameter, turn a repeated one into "absent", and read
//! `follow=tru` as "no".)

use std::collections::HashSet;

use rocket::outcome::Outcome;
use rocket::request::{self, FromRequest};
use rocket::Request;

use crate::error::ApiError;

/// Proof that the request's query holds only the parameters its route declares
/// (`/tasks?<status>&<limit>`), none of them twice. Every route takes it first, so that a
/// wrong query is refused before anything else happens.
pub struct StrictQuery;

#[rocket::async_trait]
impl<'r> FromRequest<'r> for StrictQuery {
    type Error = ApiError;

    async fn from_request(request: &'r Request<'_>) -> request::Outcome<Self, ApiError> {
        let declared = request.route().and_then(|route| route.uri.query()).unwrap_or("");
        let declared: Vec<&str> = declared
            .split('&')
            .map(|field| field.trim_start_matches('<').trim_end_matches('>'))
            .filter(|name| !name.is_empty())
            .collect();
        let mut seen = HashSet::new();
        for field in request.query_fields() {
            let name = field.name.source().as_str();
            let error = if !declared.contains(&name) {
                let takes = match declared.as_slice() {
                    [] => "no query parameters".to_owned(),
                    names => format!("only {}", quoted(names)),
                };
                Some(format!("unknown query parameter `{name}`: this endpoint takes {takes}"))
            } else if !seen.insert(name) {
                Some(format!("query parameter `{name}` is given more than once"))
            } else {
                None
            };
            if let Some(detail) = error {
                return Outcome::Error(ApiError::bad_parameter(name, detail).remember(request));
            }
        }
        Outcome::Success(StrictQuery)
    }
}

fn quoted(names: &[&str]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

/// A boolean parameter: `true`/`false` or `1`/`0`; `default` when absent.
pub fn flag(name: &str, value: Option<&str>, default: bool) -> Result<bool, ApiError> {
    match value {
        None => Ok(default),
        Some("true" | "1") => Ok(true),
        Some("false" | "0") => Ok(false),
        Some(other) => Err(ApiError::bad_parameter(
            name,
            format!("`{name}` must be true, false, 1 or 0, not {other:?}"),
        )),
    }
}

/// A whole number from `min` to `max`; `default` when absent.
pub fn number(
    name: &str,
    value: Option<&str>,
    default: u64,
    (min, max): (u64, u64),
    unit: &str,
) -> Result<u64, ApiError> {
    let Some(text) = value else { return Ok(default) };
    text.parse::<u64>().ok().filter(|n| (min..=max).contains(n)).ok_or_else(|| {
        ApiError::bad_parameter(
            name,
            format!("`{name}` must be a whole number{unit} from {min} to {max}"),
        )
    })
}

/// A `wait` parameter: whole seconds from 0 to `max`; `default` when absent.
pub fn wait_secs(value: Option<&str>, default: u64, max: u64) -> Result<u64, ApiError> {
    number("wait", value, default, (0, max), " of seconds")
}

/// A user's `wait` (a task's end, new output): whole seconds, cut to `max`. Answering sooner
/// is always a valid answer to such a wait (the client looks again), so a client need not know
/// this deployment's maximum. (An agent's waits, whose timing it relies on, are refused past
/// theirs: `wait_secs`.)
pub fn wait_secs_capped(value: Option<&str>, max: u64) -> Result<u64, ApiError> {
    let Some(text) = value else { return Ok(0) };
    match text.parse::<u64>() {
        Ok(secs) => Ok(secs.min(max)),
        // Digits beyond u64: a wait longer than any maximum.
        Err(_) if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => Ok(max),
        Err(_) => Err(ApiError::bad_parameter("wait", "`wait` must be a whole number of seconds")),
    }
}

/// Any other parameter, parsed by `parse`, whose error becomes the problem's detail.
pub fn parsed<T, E: std::fmt::Display>(
    name: &str,
    value: Option<&str>,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<Option<T>, ApiError> {
    value
        .map(|text| parse(text).map_err(|e| ApiError::bad_parameter(name, e.to_string())))
        .transpose()
}
