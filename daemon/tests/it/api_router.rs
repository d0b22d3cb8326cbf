//! The Clash API router, request by request (`oneshot`): every endpoint, auth on and off,
//! CORS preflight, bad input as JSON 4xx, and JSON shapes checked key by key and type by type
//! against the captures from a real mihomo in `../shared/reference/`.

use std::{net::SocketAddr, time::Duration};

use axum::{
    body::Body,
    http::{Request, StatusCode, header},
};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use crate::common::api::{api, call, first_line, get, reference, same_shape, with_body, with_flow};

async fn root_and_version() {
    let api = api("").await;
    let (s, body, _) = call(&api, get("/")).await;
    assert_eq!((s, body["hello"].as_str()), (StatusCode::OK, Some("clash")));
    let (s, body, _) = call(&api, get("/version")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        body["version"],
        format!("tpacct {}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(body["meta"], true);
    same_shape("version", &body, &reference("version.json"), true);
}

async fn auth_on_needs_the_bearer_token_and_token_only_on_websocket() {
    let api = api("s3cr3t").await;
    for req in [
        get("/connections"),
        Request::get("/connections")
            .header(header::AUTHORIZATION, "Bearer wrong")
            .body(Body::empty())
            .expect("r"),
        get("/connections?token=s3cr3t"),
    ] {
        let (s, body, _) = call(&api, req).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(body, reference("noauth.json"));
    }
    let ok = Request::get("/connections")
        .header(header::AUTHORIZATION, "Bearer s3cr3t")
        .body(Body::empty())
        .expect("r");
    assert_eq!(call(&api, ok).await.0, StatusCode::OK);
    let upgrade = Request::get("/connections?token=s3cr3t")
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "upgrade")
        .body(Body::empty())
        .expect("r");
    assert_ne!(call(&api, upgrade).await.0, StatusCode::UNAUTHORIZED);
}

async fn auth_off_lets_everything_through() {
    let api = api("").await;
    assert_eq!(call(&api, get("/connections")).await.0, StatusCode::OK);
}

async fn cors_preflight_needs_no_token() {
    let api = api("s3cr3t").await;
    let preflight = Request::builder()
        .method("OPTIONS")
        .uri("/connections/x")
        .header(header::ORIGIN, "http://dashboard.example")
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "DELETE")
        .header(
            header::ACCESS_CONTROL_REQUEST_HEADERS,
            "authorization,content-type",
        )
        .header("access-control-request-private-network", "true")
        .body(Body::empty())
        .expect("r");
    let (s, _, h) = call(&api, preflight).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
    let methods = h[header::ACCESS_CONTROL_ALLOW_METHODS]
        .to_str()
        .expect("ascii");
    assert!(
        methods.contains("DELETE") && methods.contains("PATCH"),
        "{methods}"
    );
    let headers = h[header::ACCESS_CONTROL_ALLOW_HEADERS]
        .to_str()
        .expect("ascii")
        .to_ascii_lowercase();
    assert!(
        headers.contains("authorization") && headers.contains("content-type"),
        "{headers}"
    );
    assert_eq!(h["access-control-allow-private-network"], "true");
}

async fn connections_live_closed_and_closing() {
    let mut api = api("").await;
    let (s, empty, _) = call(&api, get("/connections")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        empty["connections"],
        Value::Array(vec![]),
        "[] when empty, never null"
    );

    let id = with_flow(&mut api).await;
    let (_, body, _) = call(&api, get("/connections")).await;
    let conn = &body["connections"][0];
    assert_eq!(conn["id"], id.to_string());
    assert_eq!(
        (conn["upload"].as_u64(), conn["download"].as_u64()),
        (Some(1234), Some(5678))
    );
    assert_eq!(conn["metadata"]["destinationPort"], "443");
    // mihomo's fields: the sniffed name is `sniffHost`; `host` only when it overrides.
    assert_eq!(conn["metadata"]["host"], "");
    assert_eq!(conn["metadata"]["sniffHost"], "example.com");
    assert_eq!(conn["metadata"]["remoteDestination"], "93.184.216.34");
    assert_eq!(conn["chains"], serde_json::json!(["DIRECT"]));
    assert_eq!(
        (body["uploadTotal"].as_u64(), body["downloadTotal"].as_u64()),
        (Some(1234), Some(5678))
    );
    assert!(conn.get("uploadSpeed").is_some() && conn.get("downloadSpeed").is_some());
    same_shape(
        "connections",
        &body,
        &reference("tproxy_connections.json"),
        true,
    );

    for (uri, status) in [
        ("/connections/not-a-uuid", StatusCode::BAD_REQUEST),
        (
            "/connections/3f2504e0-4f89-41d3-9a0c-0305e82c3301",
            StatusCode::NOT_FOUND,
        ),
    ] {
        let (s, body, _) = call(&api, Request::delete(uri).body(Body::empty()).expect("r")).await;
        assert_eq!(s, status, "{uri}");
        assert!(body["message"].is_string(), "{uri}: {body}");
    }
    let flow = api.registry.get(&id).expect("live");
    let (s, _, _) = call(
        &api,
        Request::delete(format!("/connections/{id}"))
            .body(Body::empty())
            .expect("r"),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(flow.close_token().is_cancelled(), "DELETE closes that flow");

    let other = with_flow(&mut api).await;
    let other = api.registry.get(&other).expect("live");
    let (s, _, _) = call(
        &api,
        Request::delete("/connections")
            .body(Body::empty())
            .expect("r"),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(
        other.close_token().is_cancelled(),
        "DELETE /connections closes all"
    );

    api.registry.finish(flow).await;
    let (s, body, _) = call(&api, get("/connections/closed?limit=5")).await;
    assert_eq!(s, StatusCode::OK);
    let closed = &body["connections"][0];
    assert_eq!(closed["id"], id.to_string());
    assert_eq!(closed["upload"], 1234);
    assert!(
        closed["closedAt"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{closed}"
    );
    let (_, none, _) = call(&api, get("/connections/closed?limit=0")).await;
    assert_eq!(none["connections"], Value::Array(vec![]));
}

async fn bad_query_values_are_json_400s() {
    let api = api("").await;
    for uri in [
        "/connections?interval=soon",
        "/connections/closed?limit=-1",
        "/logs?level=loud",
    ] {
        let (s, body, _) = call(&api, get(uri)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{uri}: {body}"
        );
    }
    let (s, body, _) = call(&api, get("/no/such/thing")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(body["message"].is_string());
}

async fn traffic_and_memory_stream_lines() {
    let api = api("").await;
    let traffic = first_line(&api, "/traffic").await;
    same_shape("traffic", &traffic, &reference("traffic_http.txt"), true);
    let memory = first_line(&api, "/memory").await;
    same_shape("memory", &memory, &reference("memory_http.txt"), true);
    assert!(
        memory["inuse"].as_u64().is_some_and(|m| m > 0),
        "real RSS: {memory}"
    );
}

async fn configs_read_and_patch() {
    let api = api("").await;
    let (s, body, _) = call(&api, get("/configs")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["tproxy-port"], 7893);
    assert_eq!(body["mode"], "rule");
    same_shape("configs", &body, &reference("tproxy_configs.json"), false);

    let (s, _, _) = call(&api, with_body("PATCH", "/configs", r#"{"mode":"Global"}"#)).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(call(&api, get("/configs")).await.1["mode"], "global");
    for bad in [
        r#"{"mode":"sideways"}"#,
        r#"{"log-level":"loud"}"#,
        "{not json",
    ] {
        let (s, body, _) = call(&api, with_body("PATCH", "/configs", bad)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
        assert!(body["message"].is_string(), "{bad}: {body}");
    }
}

async fn proxies_groups_and_rules() {
    let api = api("").await;
    let (s, body, _) = call(&api, get("/proxies")).await;
    assert_eq!(s, StatusCode::OK);
    let mihomo = reference("proxies.json");
    same_shape(
        "proxies.DIRECT",
        &body["proxies"]["DIRECT"],
        &mihomo["proxies"]["DIRECT"],
        true,
    );
    same_shape(
        "proxies.REJECT",
        &body["proxies"]["REJECT"],
        &mihomo["proxies"]["REJECT"],
        true,
    );
    same_shape(
        "proxies.GLOBAL",
        &body["proxies"]["GLOBAL"],
        &mihomo["proxies"]["GLOBAL"],
        true,
    );
    assert_eq!(
        call(&api, get("/proxies/NOPE")).await.0,
        StatusCode::NOT_FOUND
    );

    let (s, _, _) = call(
        &api,
        with_body("PUT", "/proxies/GLOBAL", r#"{"name":"REJECT"}"#),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(call(&api, get("/proxies/GLOBAL")).await.1["now"], "REJECT");
    for (uri, body) in [
        ("/proxies/GLOBAL", r#"{"name":"ELSEWHERE"}"#),
        ("/proxies/DIRECT", r#"{"name":"REJECT"}"#),
        ("/proxies/GLOBAL", "[]"),
    ] {
        let (s, reply, _) = call(&api, with_body("PUT", uri, body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri} {body}");
        assert!(reply["message"].is_string());
    }

    let (_, groups, _) = call(&api, get("/group")).await;
    same_shape("group", &groups, &reference("group.json"), true);
    assert_eq!(call(&api, get("/group/GLOBAL")).await.0, StatusCode::OK);
    assert_eq!(
        call(&api, get("/group/NOPE")).await.0,
        StatusCode::NOT_FOUND
    );
    let (_, rules, _) = call(&api, get("/rules")).await;
    same_shape("rules", &rules, &reference("rules.json"), true);
}

/// An HTTP server on loopback answering every request with `status`, or never (`None`).
async fn test_server(status: Option<u16>) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf).await;
                match status {
                    Some(code) => {
                        let reply =
                            format!("HTTP/1.1 {code} Whatever\r\nContent-Length: 0\r\n\r\n");
                        let _ = conn.write_all(reply.as_bytes()).await;
                    }
                    None => tokio::time::sleep(Duration::from_secs(30)).await,
                }
            });
        }
    });
    addr
}

async fn delay_tests_run_a_real_head_and_share_one_history() {
    let api = api("").await;
    let ok = test_server(Some(204)).await;
    let silent = test_server(None).await;
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };

    let (s, body, _) = call(
        &api,
        get(&format!(
            "/proxies/DIRECT/delay?url=http://{ok}/generate_204&timeout=2000&expected=204"
        )),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(body["delay"].as_u64().is_some_and(|d| d < 2000), "{body}");
    let history = call(&api, get("/proxies")).await.1["proxies"]["DIRECT"]["history"].clone();
    assert_eq!(history.as_array().map(Vec::len), Some(1), "{history}");
    assert_eq!(history[0]["delay"], body["delay"]);
    same_shape(
        "history",
        &history[0],
        &serde_json::json!({"time": "", "delay": 0}),
        true,
    );

    // A timeout is a 504 and removes the entry.
    let (s, body, _) = call(
        &api,
        get(&format!(
            "/proxies/DIRECT/delay?url=http://{silent}/&timeout=300"
        )),
    )
    .await;
    assert_eq!(
        (s, body["message"].as_str()),
        (StatusCode::GATEWAY_TIMEOUT, Some("Timeout"))
    );
    assert_eq!(
        call(&api, get("/proxies/DIRECT")).await.1["history"],
        serde_json::json!([])
    );

    // Errors are 503s: refused, an unexpected status, REJECT.
    for uri in [
        format!("/proxies/DIRECT/delay?url=http://{refused}/&timeout=2000"),
        format!("/proxies/DIRECT/delay?url=http://{ok}/&timeout=2000&expected=200"),
        format!("/proxies/REJECT/delay?url=http://{ok}/&timeout=2000"),
    ] {
        let (s, body, _) = call(&api, get(&uri)).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{uri}: {body}");
        assert!(body["message"].is_string());
    }

    // Bad parameters are 400s; unknown proxies 404s.
    for uri in [
        "/proxies/DIRECT/delay?timeout=100".to_owned(),
        format!("/proxies/DIRECT/delay?url=http://{ok}/"),
        format!("/proxies/DIRECT/delay?url=http://{ok}/&timeout=soon"),
        format!("/proxies/DIRECT/delay?url=http://{ok}/&timeout=100&expected=2xx"),
        "/proxies/DIRECT/delay?url=not%20a%20url&timeout=100".to_owned(),
    ] {
        assert_eq!(
            call(&api, get(&uri)).await.0,
            StatusCode::BAD_REQUEST,
            "{uri}"
        );
    }
    assert_eq!(
        call(
            &api,
            get(&format!("/proxies/NOPE/delay?url=http://{ok}/&timeout=100"))
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );

    // A group tests each member; GLOBAL's own test goes through its selection.
    let (s, body, _) = call(
        &api,
        get(&format!(
            "/group/GLOBAL/delay?url=http://{ok}/&timeout=2000"
        )),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        body["DIRECT"].is_u64() && body.get("REJECT").is_none(),
        "{body}"
    );
    let (s, _, _) = call(
        &api,
        get(&format!(
            "/proxies/GLOBAL/delay?url=http://{ok}/&timeout=2000"
        )),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    // One shared history: both tests went through DIRECT, GLOBAL's current member.
    assert_eq!(
        call(&api, get("/proxies/GLOBAL")).await.1["history"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
}

/// `openssl s_server` with a fresh self-signed certificate on a free loopback port.
struct TlsServer {
    child: std::process::Child,
    addr: SocketAddr,
}

impl TlsServer {
    fn start() -> TlsServer {
        let dir = crate::common::scratch::path("tls");
        std::fs::create_dir_all(&dir).expect("dir");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let made = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl req");
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let child = std::process::Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept", &addr.to_string()])
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl s_server");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "s_server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        TlsServer { child, addr }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn https_delay_tests_verify_the_certificate() {
    let api = api("").await;
    let server = TlsServer::start();
    let uri = format!(
        "/proxies/DIRECT/delay?url=https://localhost:{}/&timeout=3000",
        server.addr.port()
    );
    let (s, body, _) = call(&api, get(&uri)).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("TLS") && message.to_lowercase().contains("certificate"),
        "{message}"
    );
}

async fn logs_stream_records_at_or_above_the_level() {
    tpacct::logging::init(tpacct::config::LogLevel::Info);
    let api = api("").await;
    let resp = api
        .router
        .clone()
        .oneshot(get("/logs?level=warning"))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    tracing::info!("below the asked level");
    tracing::warn!("a warning for the dashboard");
    let mut body = resp.into_body();
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("a record within 5 s")
        .expect("frame")
        .expect("frame ok");
    let line: Value = serde_json::from_slice(&frame.into_data().expect("data")).expect("json");
    assert_eq!(line["type"], "warning");
    assert_eq!(line["payload"], "a warning for the dashboard");
}

crate::tests![
    tokio root_and_version,
    tokio auth_on_needs_the_bearer_token_and_token_only_on_websocket,
    tokio auth_off_lets_everything_through,
    tokio cors_preflight_needs_no_token,
    tokio connections_live_closed_and_closing,
    tokio bad_query_values_are_json_400s,
    tokio traffic_and_memory_stream_lines,
    tokio configs_read_and_patch,
    tokio proxies_groups_and_rules,
    tokio delay_tests_run_a_real_head_and_share_one_history,
    tokio https_delay_tests_verify_the_certificate,
    tokio logs_stream_records_at_or_above_the_level,
];
