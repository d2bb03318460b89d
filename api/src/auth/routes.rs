//! Token management, for admins: create (the secret shown this once), list, revoke.

use rocket::data::ByteUnit;
use rocket::response::status::{Created, NoContent};
use rocket::serde::json::Json;
use rocket::{delete, get, post, routes, Route, State};
use taskexec_protocol::{CreatedToken, NewToken, TokenId, TokenInfo};

use super::{tokens, Allowed, ManageTokens};
use crate::body::{JsonBody, Limited};
use crate::dispatch::Notifier;
use crate::error::ApiError;
use crate::query::StrictQuery;
use crate::Db;

pub fn routes() -> Vec<Route> {
    routes![create, list, revoke]
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(create, list, revoke), components(schemas(NewToken, CreatedToken, TokenInfo)))]
pub struct ApiDoc;

impl Limited for NewToken {
    const LIMIT: &'static str = "task";
    const DEFAULT_LIMIT: ByteUnit = ByteUnit::Kibibyte(128);
}

/// Creates a token. Its secret is in this answer only; the server keeps a digest of it.
#[utoipa::path(
    post,
    path = "/tokens",
    operation_id = "createToken",
    summary = "Create a token",
    tag = "tokens",
    security(("bearer" = ["admin"])),
    request_body(content = NewToken, content_type = "application/json"),
    responses(
        (status = 201, description = "Created, with its secret", body = CreatedToken,
         headers(("Location" = String, description = "The token's address")),
         links(("RevokeToken" = (operation_id = "revokeToken", parameters(("id" = "$response.body#/id")))))),
    )
)]
#[post("/tokens", data = "<body>")]
async fn create(
    _access: Allowed<ManageTokens>,
    _query: StrictQuery,
    db: &Db,
    body: JsonBody<NewToken>,
) -> Result<Created<Json<CreatedToken>>, ApiError> {
    tokens::check(&body.0).map_err(ApiError::Invalid)?;
    let created = tokens::create(db, &body.0).await?;
    Ok(Created::new(format!("/tokens/{}", created.id)).body(Json(created)))
}

/// Every token, without its secret.
#[utoipa::path(
    get,
    path = "/tokens",
    operation_id = "listTokens",
    summary = "List tokens",
    tag = "tokens",
    security(("bearer" = ["admin"])),
    responses((status = 200, description = "The tokens", body = Vec<TokenInfo>))
)]
#[get("/tokens")]
async fn list(
    _access: Allowed<ManageTokens>,
    _query: StrictQuery,
    db: &Db,
) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    Ok(Json(tokens::list(db).await?))
}

/// Revokes a token: every API process refuses it within seconds (at once, as a rule).
#[utoipa::path(
    delete,
    path = "/tokens/{id}",
    operation_id = "revokeToken",
    summary = "Revoke a token",
    tag = "tokens",
    security(("bearer" = ["admin"])),
    params(("id" = TokenId, Path)),
    responses(
        (status = 204, description = "Revoked"),
    )
)]
#[delete("/tokens/<id>")]
async fn revoke(
    _access: Allowed<ManageTokens>,
    _query: StrictQuery,
    db: &Db,
    notifier: &State<Notifier>,
    id: &str,
) -> Result<NoContent, ApiError> {
    let id: TokenId =
        id.parse().map_err(|_| ApiError::Malformed(format!("{id:?} is not a token id")))?;
    if tokens::revoke(db.pool(), id).await? {
        notifier.tokens_changed();
        Ok(NoContent)
    } else {
        Err(ApiError::NotFound(format!("no token with id {id}")))
    }
}
