//! The OpenAPI document against the router it describes: every mounted route is in it with
//! the parameters the route takes, nothing is in it that is not mounted, it is served at
//! /openapi.json, and /docs renders it from assets served by the API itself. (Whether the
//! answers match the document is Schemathesis's part: scripts/fuzz-api. Whether the roles it
//! names are the roles that get in: tests/auth.rs.)

use std::collections::{BTreeMap, BTreeSet};

use reqwest::Method;
use serde_json::Value;
use taskexec_tests::{test_figment, TestApp};

/// Mounted routes the document leaves out, and why: Swagger UI's pages and assets are not
/// part of the API.
const UNDESCRIBED: [&str; 1] = ["GET /docs/<tail..>"];

fn document() -> Value {
    serde_json::from_str(taskexec_api::openapi::json()).expect("the document is JSON")
}

/// Each operation of the document as "METHOD /path/<param>", with its path and query
/// parameters.
fn described() -> BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)> {
    let document = document();
    let mut operations = BTreeMap::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("a path item") {
            let route = path.replace('{', "<").replace('}', ">");
            let mut params = (BTreeSet::new(), BTreeSet::new());
            for parameter in operation["parameters"].as_array().into_iter().flatten() {
                let name = parameter["name"].as_str().expect("a name").to_owned();
                match parameter["in"].as_str() {
                    Some("path") => params.0.insert(name),
                    Some("query") => params.1.insert(name),
                    _ => false,
                };
            }
            operations.insert(format!("{} {route}", method.to_uppercase()), params);
        }
    }
    operations
}

#[test]
fn every_mounted_route_is_described_with_its_parameters_and_nothing_else_is() {
    let rocket = taskexec_api::build(test_figment("postgres://unused@127.0.0.1/unused"));
    let described = described();
    let mut mounted = BTreeSet::new();
    let mut wrong = Vec::new();
    for route in rocket.routes() {
        let path = route.uri.path().to_string();
        let name = format!("{} {path}", route.method);
        if UNDESCRIBED.contains(&name.as_str()) {
            continue;
        }
        mounted.insert(name.clone());
        let Some((path_params, query_params)) = described.get(&name) else {
            wrong.push(format!("{name} is mounted but not in the document"));
            continue;
        };
        let segments: BTreeSet<String> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('<')?.strip_suffix('>').map(str::to_owned))
            .collect();
        if &segments != path_params {
            wrong.push(format!("{name}: path parameters {segments:?}, described {path_params:?}"));
        }
        let query: BTreeSet<String> = route
            .uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|s| s.strip_prefix('<')?.strip_suffix('>').map(str::to_owned))
            .collect();
        if &query != query_params {
            wrong.push(format!("{name}: query parameters {query:?}, described {query_params:?}"));
        }
    }
    for name in described.keys().filter(|name| !mounted.contains(*name)) {
        wrong.push(format!("{name} is described but not mounted"));
    }
    assert!(mounted.len() >= 20, "only {} routes found", mounted.len());
    assert!(wrong.is_empty(), "the document and the router disagree:\n{}", wrong.join("\n"));
}

#[test]
fn every_operation_has_an_id_a_summary_and_its_problems() {
    let document = document();
    assert_eq!(document["openapi"], "3.1.0");
    assert_eq!(document["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let name = format!("{method} {path}");
            assert!(operation["operationId"].is_string(), "{name}: no operationId");
            assert!(operation["summary"].is_string(), "{name}: no summary");
            let responses = operation["responses"].as_object().unwrap();
            assert!(responses.contains_key("400") && responses.contains_key("503"), "{name}");
            let secured = operation.get("security").is_some();
            assert_eq!(responses.contains_key("401"), secured, "{name}: 401 iff it takes a token");
            for (status, response) in responses.iter().filter(|(s, _)| s.as_str() >= "400") {
                let problem = match response.get("$ref").and_then(Value::as_str) {
                    Some(name) => {
                        let name = name.rsplit('/').next().unwrap();
                        &document["components"]["responses"][name]
                    }
                    None => response,
                };
                let schema = &problem["content"]["application/problem+json"]["schema"]["$ref"];
                assert_eq!(schema, "#/components/schemas/Problem", "{name} {status}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_document_and_its_browsable_reference_are_served_without_a_token() {
    let app = TestApp::spawn().await;

    let response = app.anonymous(Method::GET, "/openapi.json").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let served: Value = response.json().await.unwrap();
    assert_eq!(served, document());

    let direct = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build();
    let moved = direct.unwrap().get(format!("{}/docs", app.url)).send().await.unwrap();
    assert!(moved.status().is_redirection(), "{}", moved.status());
    assert_eq!(moved.headers()["location"], "/docs/", "its assets are relative to /docs/");
    let page = app.anonymous(Method::GET, "/docs/").send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    // Every asset the page loads comes from the API itself: nothing from a CDN.
    let assets: Vec<&str> = html
        .split(['"', '\''])
        .filter(|s| s.ends_with(".js") || s.ends_with(".css") || s.ends_with(".png"))
        .collect();
    assert!(!assets.is_empty(), "{html}");
    for asset in assets {
        assert!(!asset.contains("//"), "{asset} is not served by the API");
        let url = format!("/docs/{}", asset.trim_start_matches("./"));
        let response = app.anonymous(Method::GET, &url).send().await.unwrap();
        assert_eq!(response.status(), 200, "{url}");
    }
    // The page is told where the document is.
    let initializer = app.anonymous(Method::GET, "/docs/swagger-initializer.js").send().await;
    let initializer = initializer.unwrap().text().await.unwrap();
    assert!(initializer.contains("/openapi.json"), "{initializer}");
}
