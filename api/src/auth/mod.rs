//! Who is calling, and what they may do. Every endpoint but `GET /`, `GET /health` and the
//! API's description (`/openapi.json`, `/docs`) takes an `Allowed<A>` guard whose `A` states
//! the roles that may call it: a request without a valid token gets 401 (with
//! `WWW-Authenticate: Bearer`), a token whose role is not among them 403.
//!
//! A token is one of the shared secrets of the deployment (`AGENT_TOKEN`, an agent; the
//! optional `ADMIN_TOKEN`, an admin), compared in constant time, or a token created through
//! `/tokens` or `taskexec-api token create`, found by the SHA-256 digest of its secret
//! (`tokens.rs`) and cached briefly (`verifier.rs`).

pub mod routes;
pub mod tokens;
pub mod verifier;

use std::marker::PhantomData;

use rocket::outcome::Outcome;
use rocket::request::{self, FromRequest};
use rocket::Request;
use subtle::ConstantTimeEq;
use taskexec_protocol::output::headers;
use taskexec_protocol::{Role, TokenId};

use crate::config::AppConfig;
use crate::error::ApiError;
use verifier::Verifier;

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's id; `None` for the shared tokens of the deployment.
    pub id: Option<TokenId>,
    /// The token's name: the owner of the tasks it submits.
    pub name: String,
    pub role: Role,
    /// An agent token bound to one agent name.
    pub agent_name: Option<String>,
    /// The digest of its secret, by which a long response checks it again (`Verifier::recheck`);
    /// `None` for the shared tokens, which only a restart changes.
    pub digest: Option<[u8; 32]>,
}

/// The name the shared `ADMIN_TOKEN` goes by (the owner of what it submits).
pub const ADMIN_NAME: &str = "admin";
/// The name the shared `AGENT_TOKEN` goes by.
pub const AGENT_NAME: &str = "agent";

impl Principal {
    /// The only owner whose tasks this caller may see, or `None` for all: a submitter sees
    /// its own tasks only.
    pub fn scope(&self) -> Option<&str> {
        (self.role == Role::Submitter).then_some(self.name.as_str())
    }
}

/// A kind of access, and the roles that have it.
pub trait Access: Send + Sync + 'static {
    const ROLES: &'static [Role];
    /// What it allows, for the 403's detail.
    const WHAT: &'static str;
}

/// Creating tasks.
pub enum Submit {}
impl Access for Submit {
    const ROLES: &'static [Role] = &[Role::Admin, Role::Submitter];
    const WHAT: &'static str = "submit tasks";
}

/// Reading tasks and their output (a submitter, its own only).
pub enum Read {}
impl Access for Read {
    const ROLES: &'static [Role] = &[Role::Admin, Role::Reader, Role::Submitter];
    const WHAT: &'static str = "read tasks";
}

/// Aborting tasks (a submitter, its own only).
pub enum Abort {}
impl Access for Abort {
    const ROLES: &'static [Role] = &[Role::Admin, Role::Submitter];
    const WHAT: &'static str = "abort tasks";
}

/// The agent endpoints: pick, heartbeat, output, finish, release.
pub enum Run {}
impl Access for Run {
    const ROLES: &'static [Role] = &[Role::Admin, Role::Agent];
    const WHAT: &'static str = "use the agent endpoints";
}

/// The operator's view: metrics, agents.
pub enum Observe {}
impl Access for Observe {
    const ROLES: &'static [Role] = &[Role::Admin, Role::Reader];
    const WHAT: &'static str = "read the operator's metrics";
}

/// Creating, listing and revoking tokens.
pub enum ManageTokens {}
impl Access for ManageTokens {
    const ROLES: &'static [Role] = &[Role::Admin];
    const WHAT: &'static str = "manage tokens";
}

/// Proof that the request carries a valid token whose role has access `A`.
pub struct Allowed<A: Access> {
    pub who: Principal,
    access: PhantomData<A>,
}

#[rocket::async_trait]
impl<'r, A: Access> FromRequest<'r> for Allowed<A> {
    type Error = ApiError;

    async fn from_request(request: &'r Request<'_>) -> request::Outcome<Self, ApiError> {
        let verified = request.local_cache_async(authenticate(request)).await;
        let who = match verified {
            Ok(who) => who.clone(),
            Err(error) => return Outcome::Error(error.clone().remember(request)),
        };
        if !A::ROLES.contains(&who.role) {
            let error = ApiError::Forbidden(format!(
                "a {} token may not {}; that takes {}",
                who.role,
                A::WHAT,
                roles(A::ROLES)
            ));
            return Outcome::Error(error.remember(request));
        }
        Outcome::Success(Allowed { who, access: PhantomData })
    }
}

fn roles(roles: &[Role]) -> String {
    let names: Vec<_> = roles.iter().map(|role| format!("{role}")).collect();
    format!("an {} token", names.join(" or "))
}

/// The caller of this request, once per request (every guard shares it).
async fn authenticate(request: &Request<'_>) -> Result<Principal, ApiError> {
    let Some(config) = request.rocket().state::<AppConfig>() else {
        return Err(ApiError::Internal);
    };
    let presented = match bearer(request) {
        Some(Ok(token)) => token,
        Some(Err(())) => {
            return Err(ApiError::Unauthorized(
                "the Authorization header must be `Bearer <token>`".into(),
            ))
        }
        None => return Err(ApiError::Unauthorized("send Authorization: Bearer <token>".into())),
    };
    // Constant time, so the comparison does not reveal how much of a guess was right.
    let shared = [
        (config.admin_token(), ADMIN_NAME, Role::Admin),
        (Some(config.agent_token()), AGENT_NAME, Role::Agent),
    ];
    for (secret, name, role) in shared {
        if secret.is_some_and(|secret| bool::from(presented.as_bytes().ct_eq(secret.as_bytes()))) {
            return Ok(Principal {
                id: None,
                name: name.into(),
                role,
                agent_name: None,
                digest: None,
            });
        }
    }
    let Some(verifier) = request.rocket().state::<Verifier>() else {
        return Err(ApiError::Internal);
    };
    verifier.verify(presented).await
}

/// The bearer token: `None` without an `Authorization` header, `Err` for another scheme or
/// no token.
fn bearer<'r>(request: &'r Request<'_>) -> Option<Result<&'r str, ()>> {
    let value = request.headers().get_one("Authorization")?;
    // The scheme is case-insensitive (RFC 9110, section 11.1).
    let token = value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty());
    Some(token.ok_or(()))
}

/// The agent's self-chosen name from `X-Agent-Name`: 1 to 128 printable characters, and the
/// one its token is bound to, if it is.
pub struct AgentName(pub String);

pub const MAX_AGENT_NAME_CHARS: usize = 128;

/// Whether `name` may name an agent.
pub fn is_agent_name(name: &str) -> bool {
    !name.is_empty()
        && name.chars().count() <= MAX_AGENT_NAME_CHARS
        && !name.chars().any(char::is_control)
        // `X-Agent-Name` is trimmed: a name with spaces around it could never be presented.
        && name.trim() == name
}

#[rocket::async_trait]
impl<'r> FromRequest<'r> for AgentName {
    type Error = ApiError;

    async fn from_request(request: &'r Request<'_>) -> request::Outcome<Self, ApiError> {
        let name = request.headers().get_one(headers::AGENT_NAME).unwrap_or_default().trim();
        if !is_agent_name(name) {
            let detail = format!(
                "agents must name themselves in X-Agent-Name: 1 to {MAX_AGENT_NAME_CHARS} \
                 printable characters"
            );
            return Outcome::Error(ApiError::Malformed(detail).remember(request));
        }
        let bound = match request.local_cache_async(authenticate(request)).await {
            Ok(who) => who.agent_name.clone(),
            Err(_) => None,
        };
        match bound {
            Some(bound) if bound != name => {
                let detail = format!("this token is bound to the agent {bound:?}, not {name:?}");
                Outcome::Error(ApiError::Forbidden(detail).remember(request))
            }
            _ => Outcome::Success(AgentName(name.to_owned())),
        }
    }
}
