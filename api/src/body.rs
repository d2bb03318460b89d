//! JSON request bodies, with every way a body can be wrong answered as a precise problem:
//! wrong content type (415), over the size limit (413), not JSON (400), JSON of the wrong
//! shape (422).

use rocket::data::{self, ByteUnit, Data, FromData};
use rocket::outcome::Outcome;
use rocket::Request;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A body type and the name of its limit in the `limits` table of `Rocket.toml`.
pub trait Limited: DeserializeOwned {
    const LIMIT: &'static str;
    /// Applies when the configuration has no such limit.
    const DEFAULT_LIMIT: ByteUnit;
}

/// A JSON body of type `T`, read within `T`'s limit.
pub struct JsonBody<T>(pub T);

#[rocket::async_trait]
impl<'r, T: Limited> FromData<'r> for JsonBody<T> {
    type Error = ApiError;

    async fn from_data(request: &'r Request<'_>, data: Data<'r>) -> data::Outcome<'r, Self> {
        match read::<T>(request, data).await {
            Ok(value) => Outcome::Success(JsonBody(value)),
            Err(error) => Outcome::Error(error.remember(request)),
        }
    }
}

async fn read<T: Limited>(request: &Request<'_>, data: Data<'_>) -> Result<T, ApiError> {
    if !request.content_type().is_some_and(|ct| ct.is_json()) {
        return Err(ApiError::UnsupportedMediaType(
            "the body must be JSON: send Content-Type: application/json".into(),
        ));
    }
    let limit = request.limits().get(T::LIMIT).unwrap_or(T::DEFAULT_LIMIT);
    let bytes = read_within(data, limit).await?;
    serde_json::from_slice(&bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::Invalid(e.to_string()),
        _ => ApiError::Malformed(format!("the body is not valid JSON: {e}")),
    })
}

/// The whole body, or 413 when it is larger than `limit`.
pub async fn read_within(data: Data<'_>, limit: ByteUnit) -> Result<Vec<u8>, ApiError> {
    let bytes = data
        .open(limit)
        .into_bytes()
        .await
        .map_err(|e| ApiError::Malformed(format!("the body could not be read: {e}")))?;
    if !bytes.is_complete() {
        return Err(ApiError::PayloadTooLarge(format!("the body is larger than {limit}")));
    }
    Ok(bytes.into_inner())
}
