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

/// The routing config captured from mihomo, through tpacct: every outbound, group and rule in
/// mihomo's shape and order, with mihomo's type names.
async fn a_mihomo_routing_config_lists_like_mihomo() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mihomo-v1.19.23/routing");
    let text = std::fs::read_to_string(dir.join("config.yaml")).expect("config");
    let config = tpacct::config::Config::parse(&text, "routing/config.yaml").expect("parses");
    let api = crate::common::api::api_with(config).await;
    let (_, ours, _) = call(&api, get("/proxies")).await;
    let theirs = reference("routing/proxies.json");
    for name in [
        "up1",
        "up2",
        "PROXY",
        "Auto",
        "GLOBAL",
        "DIRECT",
        "REJECT",
        "PASS",
        "COMPATIBLE",
    ] {
        let (o, mut t) = (&ours["proxies"][name], theirs["proxies"][name].clone());
        // mihomo had run health checks: per-URL results under `extra` (issue 10's part).
        t["extra"] = serde_json::json!({});
        same_shape(&format!("proxies.{name}"), o, &t, true);
        assert_eq!(o["type"], t["type"], "{name}");
        if t.get("all").is_some() {
            assert_eq!(o["all"], t["all"], "{name}: members in mihomo's order");
            assert_eq!(o["now"], t["now"], "{name}");
        }
    }
    let (_, ours, _) = call(&api, get("/rules")).await;
    let theirs = reference("routing/rules.json");
    let strip = |v: &serde_json::Value| -> Vec<(String, String, String)> {
        v["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .map(|r| {
                let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
                (s("type"), s("payload"), s("proxy"))
            })
            .collect()
    };
    assert_eq!(
        strip(&ours),
        strip(&theirs),
        "types, payloads and targets as mihomo lists them"
    );
    same_shape("rules", &ours, &theirs, true);
    let (_, ours, _) = call(&api, get("/providers/rules")).await;
    same_shape(
        "providers.ads",
        &ours["providers"]["ads"],
        &reference("routing/providers_rules.json")["providers"]["ads"],
        true,
    );
}

crate::tests![
    tokio providers_in_mihomos_shape,
    tokio the_other_routes_answer_honestly,
    tokio a_mihomo_routing_config_lists_like_mihomo,
];
