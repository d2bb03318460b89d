//! Authentication of executor agents: the agent endpoints require the shared bearer token.

use rocket::http::Status;
use rocket::outcome::Outcome;
use rocket::request::{self, FromRequest};
use rocket::Request;
use subtle::ConstantTimeEq;
use taskexec_protocol::output::headers;

use crate::config::AppConfig;
use crate::error::ApiError;

/// Proof that the request carries `Authorization: Bearer <AGENT_TOKEN>`.
pub struct AgentAuth;

#[rocket::async_trait]
impl<'r> FromRequest<'r> for AgentAuth {
    type Error = ApiError;

    async fn from_request(request: &'r Request<'_>) -> request::Outcome<Self, ApiError> {
        let Some(config) = request.rocket().state::<AppConfig>() else {
            return Outcome::Error((Status::InternalServerError, ApiError::Internal));
        };
        let presented = request
            .headers()
            .get_one("Authorization")
            .and_then(|value| value.split_once(' '))
            // The scheme is case-insensitive (RFC 9110, section 11.1).
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token.trim());
        // Constant time, so the comparison does not reveal how much of a guess was right.
        if bool::from(presented.as_bytes().ct_eq(config.agent_token().as_bytes())) {
            Outcome::Success(AgentAuth)
        } else {
            Outcome::Error(ApiError::Unauthorized.remember(request))
        }
    }
}

/// The agent's self-chosen name from `X-Agent-Name`: 1 to 128 printable characters.
pub struct AgentName(pub String);

pub const MAX_AGENT_NAME_CHARS: usize = 128;

#[rocket::async_trait]
impl<'r> FromRequest<'r> for AgentName {
    type Error = ApiError;

    async fn from_request(request: &'r Request<'_>) -> request::Outcome<Self, ApiError> {
        let name = request.headers().get_one(headers::AGENT_NAME).unwrap_or_default().trim();
        let valid = !name.is_empty()
            && name.chars().count() <= MAX_AGENT_NAME_CHARS
            && !name.chars().any(char::is_control);
        if valid {
            Outcome::Success(AgentName(name.to_owned()))
        } else {
            let detail = format!(
                "agents must name themselves in X-Agent-Name: 1 to {MAX_AGENT_NAME_CHARS} \
                 printable characters"
            );
            Outcome::Error(ApiError::Malformed(detail).remember(request))
        }
    }
}
