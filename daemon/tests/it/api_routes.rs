//! Every route mihomo's controller defines answers here: in mihomo's shape where tpacct has
//! the thing (providers), or with an honest JSON answer a client can handle where it has not
//! (204 for a flush with nothing to flush, 501 for an upgrade); `POST /restart` restarts.

use axum::{body::Body, http::Request, http::StatusCode};
use serde_json::json;

use crate::common::api::{api, call, get, reference, same_shape};

fn request(method: &str, uri: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .expect("request")
}

async fn providers_in_mihomos_shape() {
    let api = api("").await;
    let (s, body, _) = call(&api, get("/providers/proxies")).await;
    assert_eq!(s, StatusCode::OK);
    let mihomo = reference("routing/providers_proxies.json");
    let default = &body["providers"]["default"];
    same_shape(
        "providers.default",
        default,
        &mihomo["providers"]["default"],
        true,
    );
    let names: Vec<&str> = default["proxies"]
        .as_array()
        .expect("proxies")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["DIRECT", "REJECT"], "GLOBAL is not in a provider");
    assert_eq!(default["vehicleType"], "Compatible");

    let (s, one, _) = call(&api, get("/providers/proxies/default")).await;
    assert_eq!((s, &one), (StatusCode::OK, default));
    let (s, direct, _) = call(&api, get("/providers/proxies/default/DIRECT")).await;
    assert_eq!((s, &direct["type"]), (StatusCode::OK, &json!("Direct")));
    for uri in ["/providers/proxies/nope", "/providers/proxies/default/nope"] {
        let (s, body, _) = call(&api, get(uri)).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(body, json!({ "message": "Resource not found" }), "{uri}");
    }
    let (s, _, _) = call(&api, request("PUT", "/providers/proxies/default")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    let (s, rules, _) = call(&api, get("/providers/rules")).await;
    assert_eq!((s, rules), (StatusCode::OK, json!({ "providers": {} })));
    let (s, _, _) = call(&api, request("PUT", "/providers/rules/nope")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

async fn the_other_routes_answer_honestly() {
    let api = api("").await;
    for (method, uri, status) in [
        ("POST", "/cache/fakeip/flush", StatusCode::NO_CONTENT),
        ("POST", "/cache/dns/flush", StatusCode::NO_CONTENT),
        ("POST", "/upgrade/geo", StatusCode::NO_CONTENT),
        ("POST", "/configs/geo", StatusCode::NO_CONTENT),
        (
            "GET",
            "/dns/query?name=example.com",
            StatusCode::NOT_IMPLEMENTED,
        ),
        ("POST", "/upgrade", StatusCode::NOT_IMPLEMENTED),
        ("POST", "/upgrade/ui", StatusCode::NOT_IMPLEMENTED),
        ("DELETE", "/proxies/GLOBAL", StatusCode::BAD_REQUEST),
        ("DELETE", "/proxies/NOPE", StatusCode::NOT_FOUND),
        ("GET", "/debug/pprof", StatusCode::NOT_FOUND),
    ] {
        let (s, body, _) = call(&api, request(method, uri)).await;
        assert_eq!(s, status, "{method} {uri}: {body}");
        if s != StatusCode::NO_CONTENT {
            assert!(body["message"].is_string(), "{method} {uri}: {body}");
        }
    }
    assert!(!api.state.restart.is_cancelled());
    let (s, body, _) = call(&api, request("POST", "/restart")).await;
    assert_eq!((s, body), (StatusCode::OK, json!({ "status": "ok" })));
    assert!(
        api.state.restart.is_cancelled(),
        "the daemon is told to restart"
    );
}

crate::tests![
    tokio providers_in_mihomos_shape,
    tokio the_other_routes_answer_honestly,
];
