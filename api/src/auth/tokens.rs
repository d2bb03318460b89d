//! Token secrets and the SQL of tokens. A secret is `tex_` and 43 characters of base64url: 256
//! random bits. Only its SHA-256 digest is stored; a presented secret is found by its digest.
//! Neither the secret nor the digest is ever logged (a log line may name a token's id or name).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use sqlx::{PgExecutor, PgPool};
use taskexec_protocol::{CreatedToken, NewToken, Role, TokenId, TokenInfo, TOKEN_PREFIX};

use super::{is_agent_name, Principal, ADMIN_NAME, AGENT_NAME};
use crate::db::{DbError, Op};

/// The channel that tells every API process a token was revoked; the payload is its id.
pub const TOKENS_CHANNEL: &str = "taskexec_tokens";

/// The longest a token may be made to last: ten years.
pub const MAX_EXPIRES_IN_SECS: u64 = 10 * 365 * 86_400;

/// A new secret: the prefix and 32 random bytes.
///
/// # Errors
/// When the system has no randomness to give.
pub fn new_secret() -> Result<SecretString, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)?;
    Ok(format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)).into())
}

/// Whether `presented` has the shape of a secret (the prefix and 43 characters of base64url),
/// so that anything else is refused without a look in the database.
pub fn is_well_formed(presented: &str) -> bool {
    presented.strip_prefix(TOKEN_PREFIX).is_some_and(|rest| {
        rest.len() == 43
            && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// The digest a secret is stored and found by.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Why a new token's fields cannot be taken.
pub fn check(new: &NewToken) -> Result<(), String> {
    let name_ok = new.name.len() <= 64
        && new.name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && new.name.chars().all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c));
    if !name_ok {
        return Err("`name` must be 1 to 64 of letters, digits and `._@-`, starting with a \
                    letter or a digit"
            .into());
    }
    // The shared tokens own what they submit under these names.
    if [ADMIN_NAME, AGENT_NAME].contains(&new.name.as_str()) {
        return Err(format!(
            "`{}` is the name of the shared {} token of the deployment; choose another",
            new.name,
            if new.name == ADMIN_NAME { "ADMIN_TOKEN" } else { "AGENT_TOKEN" }
        ));
    }
    if let Some(secs) = new.expires_in_secs {
        if !(1..=MAX_EXPIRES_IN_SECS).contains(&secs) {
            return Err(format!("`expires_in_secs` must be from 1 to {MAX_EXPIRES_IN_SECS}"));
        }
    }
    match (&new.agent_name, new.role) {
        (Some(_), role) if role != Role::Agent => {
            Err("`agent_name` binds an agent token; this one is not".into())
        }
        (Some(name), _) if !is_agent_name(name) => {
            Err("`agent_name` must be 1 to 128 printable characters, without spaces around them"
                .into())
        }
        _ => Ok(()),
    }
}

/// Creates a token (its fields checked with `check`) and returns it with its secret.
pub async fn create(pool: &PgPool, new: &NewToken) -> Result<CreatedToken, DbError> {
    let secret = new_secret()
        .map_err(|e| std::io::Error::other(e.to_string()))
        .map_err(sqlx::Error::Io)
        .op("make a token secret")?;
    let id = TokenId::random();
    let row = sqlx::query!(
        r#"INSERT INTO tokens (id, name, role, digest, agent_name, expires_at)
           VALUES ($1, $2, $3, $4, $5, now() + $6 * interval '1 second')
           RETURNING created_at, expires_at"#,
        id as TokenId,
        new.name,
        new.role as Role,
        &digest(secret.expose_secret())[..],
        new.agent_name,
        new.expires_in_secs.map(|secs| secs as f64),
    )
    .fetch_one(pool)
    .await
    .op("create a token")?;
    log::info!("token {id} ({}, {}) created", new.name, new.role);
    Ok(CreatedToken {
        id,
        name: new.name.clone(),
        role: new.role,
        agent_name: new.agent_name.clone(),
        token: secret.expose_secret().to_owned(),
        created_at: row.created_at,
        expires_at: row.expires_at,
    })
}

/// Every token, newest first, without secrets.
pub async fn list(pool: &PgPool) -> Result<Vec<TokenInfo>, DbError> {
    sqlx::query_as!(
        TokenInfo,
        r#"SELECT id AS "id: TokenId", name, role AS "role: Role", agent_name, created_at,
                  expires_at, revoked_at, last_used_at
             FROM tokens ORDER BY created_at DESC, id"#
    )
    .fetch_all(pool)
    .await
    .op("list tokens")
}

/// Revokes a token and tells every API process (when the statement commits). False when
/// there is no such token; revoking a revoked token changes nothing and is not an error.
pub async fn revoke(db: impl PgExecutor<'_>, id: TokenId) -> Result<bool, DbError> {
    let revoked = sqlx::query_scalar!(
        r#"UPDATE tokens SET revoked_at = coalesce(revoked_at, now())
            WHERE id = $1
           RETURNING pg_notify($2, id::text) IS NOT NULL AS "notified!""#,
        id as TokenId,
        TOKENS_CHANNEL,
    )
    .fetch_optional(db)
    .await
    .op("revoke a token")?;
    if revoked.is_some() {
        log::info!("token {id} revoked");
    }
    Ok(revoked.is_some())
}

/// A token found by the digest of a presented secret, if it is current (neither revoked nor
/// expired), with when it expires; its `last_used_at` is brought up to now.
pub async fn find(
    pool: &PgPool,
    digest: &[u8; 32],
) -> Result<Option<(Principal, Option<DateTime<Utc>>)>, DbError> {
    let row = sqlx::query!(
        r#"UPDATE tokens SET last_used_at = now()
            WHERE digest = $1 AND revoked_at IS NULL
              AND (expires_at IS NULL OR expires_at > now())
           RETURNING id AS "id: TokenId", name, role AS "role: Role", agent_name, expires_at"#,
        &digest[..],
    )
    .fetch_optional(pool)
    .await
    .op("verify a token")?;
    Ok(row.map(|row| {
        let who = Principal {
            digest: Some(*digest),
            id: Some(row.id),
            name: row.name,
            role: row.role,
            agent_name: row.agent_name,
        };
        (who, row.expires_at)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_256_random_bits_behind_a_prefix() {
        let (a, b) = (new_secret().unwrap(), new_secret().unwrap());
        let a = a.expose_secret();
        assert!(a.starts_with("tex_") && a.len() == 4 + 43, "{}", a.len());
        assert_ne!(a, b.expose_secret());
        assert_eq!(digest(a), digest(a));
        assert_ne!(digest(a), digest(b.expose_secret()));
    }

    #[test]
    fn token_fields_are_checked() {
        let token = |name: &str, role, agent: Option<&str>| NewToken {
            name: name.into(),
            role,
            expires_in_secs: None,
            agent_name: agent.map(str::to_owned),
        };
        assert!(check(&token("ci-bot", Role::Submitter, None)).is_ok());
        assert!(check(&token("", Role::Submitter, None)).is_err());
        assert!(check(&token("-x", Role::Submitter, None)).is_err());
        assert!(check(&token("a b", Role::Submitter, None)).is_err());
        assert!(check(&token(&"x".repeat(65), Role::Reader, None)).is_err());
        assert!(check(&token("runner", Role::Agent, Some("agent-1"))).is_ok());
        assert!(check(&token("runner", Role::Reader, Some("agent-1"))).is_err());
        let forever = NewToken { expires_in_secs: Some(0), ..token("x", Role::Reader, None) };
        assert!(check(&forever).is_err());
        // The shared tokens' names: a token of that name would own what they submitted.
        assert!(check(&token("admin", Role::Submitter, None)).unwrap_err().contains("ADMIN_TOKEN"));
        assert!(check(&token("agent", Role::Agent, None)).is_err());
        assert!(check(&token("admin2", Role::Submitter, None)).is_ok());
        assert!(check(&token("runner", Role::Agent, Some("agent-1 "))).is_err());
    }

    #[test]
    fn only_the_shape_of_a_secret_is_looked_up() {
        let real = new_secret().unwrap();
        assert!(is_well_formed(real.expose_secret()));
        for other in
            ["", "tex_", "tex_short", "xyz_", &real.expose_secret().replace("tex_", "tey_")]
        {
            assert!(!is_well_formed(other), "{other:?}");
        }
        let tail = &real.expose_secret()[4..];
        assert!(!is_well_formed(&format!("tex_{}=", &tail[..42])), "not base64url");
        assert!(!is_well_formed(&format!("{}A", real.expose_secret())), "too long");
    }
}
