//! API tokens: who may call what. A token has a role; its secret is shown once, when it is
//! created, and the server keeps only a digest of it.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::TokenId;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
#[cfg_attr(
    feature = "sqlx",
    derive(sqlx::Type),
    sqlx(type_name = "token_role", rename_all = "snake_case")
)]
pub enum Role {
    /// Everything, tokens included.
    Admin,
    /// Create tasks; read, wait on, follow and abort its own.
    Submitter,
    /// Read every task and its output; no writes.
    Reader,
    /// The agent endpoints only.
    Agent,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Submitter, Role::Reader, Role::Agent];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Submitter => "submitter",
            Role::Reader => "reader",
            Role::Agent => "agent",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL.into_iter().find(|role| role.as_str() == s).ok_or_else(|| {
            format!("unknown role {s:?}; expected admin, submitter, reader or agent")
        })
    }
}

/// The body of `POST /tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// Who holds it: 1 to 64 of letters, digits and `._@-`. A submitter's tasks are owned by
    /// this name.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"))]
    pub name: String,
    pub role: Role,
    /// Seconds until it expires; never when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
    /// For an agent token: the only `X-Agent-Name` it may present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_name: Option<String>,
}

/// A token as lists show it: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenInfo {
    pub id: TokenId,
    pub name: String,
    pub role: Role,
    pub agent_name: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// The answer to `POST /tokens`: the token and, this once, its secret (which its `Debug`
/// leaves out).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreatedToken {
    pub id: TokenId,
    pub name: String,
    pub role: Role,
    pub agent_name: Option<String>,
    /// The secret, `tex_` and 43 characters: shown only here.
    pub token: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for CreatedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedToken")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("role", &self.role)
            .field("agent_name", &self.agent_name)
            .field("token", &"<secret>")
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// The prefix of every token secret, so that secret scanners can find leaked ones.
pub const TOKEN_PREFIX: &str = "tex_";
