//! The API described: an OpenAPI 3.1 document built from the handlers' own `#[utoipa::path]`
//! attributes and the protocol's types (`ToSchema`), so that a route, a parameter or a field
//! cannot change without the document seeing it. Served at `GET /openapi.json`, and browsable
//! at `GET /docs` (Swagger UI, its assets compiled into the binary: nothing is fetched).
//!
//! What every operation of a kind may answer the same way is added here once
//! (`common_problems`), not on each handler: 400 for an unknown, repeated or malformed
//! parameter (`StrictQuery`), 503 while the database is away; with a token, 401 and 403; with
//! an id in the path, 404; with a body, 413, and with a JSON body, 415 and 422. Each
//! operation's `security` names the roles that may call it: OpenAPI 3.1 lets a bearer
//! scheme's requirement list roles, and `tests/auth.rs` checks them against the answers.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rocket::http::uri::Origin;
use rocket::http::ContentType;
use rocket::response::Redirect;
use rocket::{get, routes, Route};
use taskexec_protocol::Problem;
use utoipa::openapi::header::Header;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{Content, OpenApi as Document, Ref, RefOr, Response};
use utoipa::OpenApi;
use utoipa_swagger_ui::Config;

use crate::error::ApiError;
use crate::query::StrictQuery;

/// The media type of every error answer (RFC 9457).
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Where the document is served.
pub const DOCUMENT_PATH: &str = "/openapi.json";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "taskexec",
        description = "Run shell commands on executor agents. Submit a task, follow its \
                       output, wait for its exit code. Every error is an RFC 9457 problem \
                       (`application/problem+json`) whose `type` names its kind. Tokens go \
                       in `Authorization: Bearer`; each operation's security requirement \
                       lists the roles that may call it.",
        license(name = "MIT"),
    ),
    tags(
        (name = "tasks", description = "Submitting, reading, waiting on and aborting tasks"),
        (name = "output", description = "A task's live output"),
        (name = "agents", description = "The agent protocol: pick, heartbeat, upload, report"),
        (name = "tokens", description = "API tokens (admins)"),
        (name = "operations", description = "Health, metrics, the agent registry, this document"),
    ),
    paths(document_json),
    components(
        schemas(Problem),
        responses(NotFound, Conflict, PayloadTooLarge, UnsupportedMediaType, Invalid, TooMany),
    )
)]
struct ApiDoc;

/// The whole document: this module's part, each route module's paths, the security scheme
/// and the problems every operation shares.
pub fn document() -> Document {
    let mut doc = ApiDoc::openapi();
    for part in [
        crate::health::ApiDoc::openapi(),
        crate::tasks::routes::ApiDoc::openapi(),
        crate::output::routes::ApiDoc::openapi(),
        crate::auth::routes::ApiDoc::openapi(),
        crate::agents::ApiDoc::openapi(),
        crate::metrics::ApiDoc::openapi(),
    ] {
        doc.merge(part);
    }
    let components = doc.components.get_or_insert_with(Default::default);
    let bearer = Http::builder()
        .scheme(HttpAuthScheme::Bearer)
        .description(Some(
            "A token: the deployment's ADMIN_TOKEN or AGENT_TOKEN, or one made with \
             POST /tokens (`tex_…`).",
        ))
        .build();
    components.add_security_scheme(BEARER, SecurityScheme::Http(bearer));
    for (name, description, header) in COMMON {
        let mut response = problem(description);
        if let Some((header, description)) = header {
            let mut value = Header::new(ObjectBuilder::new().schema_type(Type::String));
            value.description = Some(description.to_owned());
            response.headers.insert(header.to_owned(), value);
        }
        components.responses.insert(name.to_owned(), RefOr::T(response));
    }
    for (path, item) in doc.paths.paths.iter_mut() {
        let names_one = path.contains('{');
        for operation in operations(item) {
            common_problems(operation, names_one);
        }
    }
    doc
}

/// The name of the bearer scheme in `security` requirements.
pub const BEARER: &str = "bearer";

/// The shared problem responses, by component name, with the header each always carries.
type Common = (&'static str, &'static str, Option<(&'static str, &'static str)>);
const COMMON: [Common; 4] = [
    (
        "BadParameter",
        "An unknown, repeated or malformed query parameter or header, a malformed id, or a body \
         that is not JSON",
        None,
    ),
    (
        "Unauthorized",
        "No valid token: missing, malformed, unknown, revoked or expired",
        Some(("WWW-Authenticate", "`Bearer`")),
    ),
    ("Forbidden", "The token's role may not do this", None),
    (
        "Unavailable",
        "The database does not answer, or this process holds as many waits as it may",
        Some(("Retry-After", "Seconds to wait before trying again")),
    ),
];

/// A problem response.
pub fn problem(description: &str) -> Response {
    ResponseBuilder::new()
        .description(description)
        .content(PROBLEM_JSON, Content::new(Some(Ref::from_schema_name("Problem"))))
        .build()
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch]
        .into_iter()
        .filter_map(Option::as_mut)
}

/// Adds the answers every operation of its kind may give (see the module's comment), and the
/// roles of a token-taking operation to its description. `names_one`: its path names a task
/// or token, which may not exist.
fn common_problems(operation: &mut Operation, names_one: bool) {
    let secured = operation.security.as_ref().is_some_and(|s| !s.is_empty());
    let body = operation.request_body.as_ref();
    // Every body is read within its limit; a JSON one (`JsonBody`) also by its content type,
    // and then by its fields.
    let json = body.is_some_and(|body| body.content.contains_key("application/json"));
    let mut common = vec![("400", "BadParameter"), ("503", "Unavailable")];
    if secured {
        common.extend([("401", "Unauthorized"), ("403", "Forbidden")]);
    }
    if names_one {
        common.push(("404", "NotFound"));
    }
    if body.is_some() {
        common.push(("413", "PayloadTooLarge"));
    }
    if json {
        common.extend([("415", "UnsupportedMediaType"), ("422", "Invalid")]);
    }
    for (status, name) in common {
        let responses = &mut operation.responses.responses;
        responses
            .entry(status.to_owned())
            .or_insert_with(|| RefOr::Ref(Ref::from_response_name(name)));
    }
    if let Some(roles) = roles(operation) {
        let description = operation.description.get_or_insert_with(String::new);
        if !description.is_empty() {
            description.push_str("\n\n");
        }
        description.push_str(&format!("**Roles:** {}.", roles.join(", ")));
    }
}

/// The roles an operation's bearer requirement names.
pub fn roles(operation: &Operation) -> Option<Vec<String>> {
    let security = operation.security.as_ref()?;
    let value = serde_json::to_value(security).ok()?;
    let roles = value.as_array()?.iter().find_map(|requirement| requirement.get(BEARER))?;
    Some(roles.as_array()?.iter().filter_map(|r| r.as_str().map(str::to_owned)).collect())
}

pub fn routes() -> Vec<Route> {
    routes![document_json, docs]
}

/// A page or asset of Swagger UI, or the way to it.
#[derive(rocket::Responder)]
enum Docs {
    File(Vec<u8>, ContentType),
    Moved(Redirect),
}

/// Swagger UI (`/docs/`), browsing this document: its pages and assets are compiled into the
/// binary (utoipa-swagger-ui's `vendored` feature), so nothing is fetched from elsewhere. Not
/// described in the document: it is not part of the API. No token needed.
#[get("/docs/<tail..>")]
fn docs(_query: StrictQuery, tail: PathBuf, uri: &Origin<'_>) -> Result<Docs, ApiError> {
    // `/docs` itself: the page's assets are relative to `/docs/`.
    if tail.as_os_str().is_empty() && !uri.path().ends_with('/') {
        return Ok(Docs::Moved(Redirect::to("/docs/")));
    }
    static CONFIG: OnceLock<Arc<Config<'static>>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| Arc::new(Config::new([DOCUMENT_PATH])));
    let not_found = || ApiError::NotFound(format!("no page at /docs/{}", tail.display()));
    let file = tail.to_str().ok_or_else(not_found)?;
    match utoipa_swagger_ui::serve(file, config.clone()) {
        Ok(Some(file)) => {
            let kind =
                ContentType::parse_flexible(&file.content_type).unwrap_or(ContentType::Binary);
            Ok(Docs::File(file.bytes.into_owned(), kind))
        }
        Ok(None) => Err(not_found()),
        Err(e) => {
            log::error!("Swagger UI could not serve {file}: {e}");
            Err(ApiError::Internal)
        }
    }
}

/// This document (OpenAPI 3.1), as JSON. No token needed.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "getOpenApi",
    summary = "This document",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json"))
)]
#[get("/openapi.json")]
fn document_json(_query: StrictQuery) -> (ContentType, &'static str) {
    (ContentType::JSON, json())
}

/// The document as JSON, made once.
pub fn json() -> &'static str {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let mut value = serde_json::to_value(document()).expect("the document serializes");
        camel_case_links(&mut value);
        serde_json::to_string_pretty(&value).expect("the document serializes")
    })
}

/// utoipa 5 writes a Link Object's fields in snake case (`operation_id`), which OpenAPI
/// clients do not read as links: renamed here to the specification's `operationId`,
/// `operationRef` and `requestBody`.
fn camel_case_links(value: &mut serde_json::Value) {
    let Some(paths) = value.get_mut("paths").and_then(|p| p.as_object_mut()) else { return };
    let responses = paths
        .values_mut()
        .filter_map(|item| item.as_object_mut())
        .flat_map(|item| item.values_mut())
        .filter_map(|operation| operation.get_mut("responses")?.as_object_mut())
        .flat_map(|responses| responses.values_mut());
    for response in responses {
        let Some(links) = response.get_mut("links").and_then(|l| l.as_object_mut()) else {
            continue;
        };
        for link in links.values_mut().filter_map(|link| link.as_object_mut()) {
            for (from, to) in [
                ("operation_id", "operationId"),
                ("operation_ref", "operationRef"),
                ("request_body", "requestBody"),
            ] {
                if let Some(field) = link.remove(from) {
                    link.insert(to.to_owned(), field);
                }
            }
        }
    }
}

/// The headers an agent sends with each request of the agent protocol.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // Described only: the `Agent` guard reads the headers.
pub struct AgentHeaders {
    /// The agent's name: 1 to 128 characters, no control characters, no spaces around it (an
    /// agent token bound to a name presents only that one).
    #[param(rename = "X-Agent-Name", min_length = 1, max_length = 128)]
    name: String,
    /// The agent's version: 1 to 64 visible ASCII characters.
    #[param(rename = "X-Agent-Version", min_length = 1, max_length = 64)]
    version: Option<String>,
    /// This run of the agent (a UUID), by which its leave is told from an older run's
    /// requests still in flight.
    #[param(rename = "X-Agent-Instance")]
    instance: Option<uuid::Uuid>,
}

/// Raw bytes, as a body: a stream's output, uploaded or read.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)] // Described only: the handlers read and write the bytes themselves.
pub struct RawBytes(Vec<u8>);

/// Problem responses particular to some operations, by status.
macro_rules! problem_responses {
    ($($name:ident: $description:literal;)*) => {$(
        #[doc = $description]
        #[derive(utoipa::ToResponse)]
        #[response(description = $description, content_type = "application/problem+json")]
        #[allow(dead_code)] // Described only: `ApiError` answers.
        pub struct $name(Problem);
    )*};
}

problem_responses! {
    NotFound: "No such task or token (or not one the caller may see)";
    Conflict: "The task's state does not allow it: it has ended, or another attempt holds it (the problem's `type` says which)";
    PayloadTooLarge: "The body is over its limit";
    UnsupportedMediaType: "The body is not of the content type the operation takes";
    Invalid: "Well-formed JSON with a field that is not acceptable (the detail names it)";
}

/// The owner's quota of queued tasks, or the token's waits held at once, is full.
#[derive(utoipa::ToResponse)]
#[response(
    description = "The owner's quota of queued tasks, or the token's waits held at once, is full",
    content_type = "application/problem+json",
    headers(("Retry-After" = String, description = "Seconds to wait before trying again"))
)]
#[allow(dead_code)] // Described only: `ApiError` answers.
pub struct TooMany(Problem);
