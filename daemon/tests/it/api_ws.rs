//! The controller over a real socket: WebSockets read the client side (Close answered at once,
//! Ping answered), an oversized body is refused before it is read, and a client that sends half
//! a request head is dropped after the header deadline.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tpacct::{
    api,
    config::{Config, LogLevel},
};

/// The API on a loopback port of this process (user-space accounting, no flows).
async fn serve(secret: &str) -> (SocketAddr, CancellationToken) {
    tpacct::logging::init(LogLevel::Info);
    let cancel = CancellationToken::new();
    let config = Config {
        external_controller: "127.0.0.1:0".into(),
        secret: Some(secret.into()),
        ..Config::default()
    };
    let api = crate::common::api::api_with(config.clone()).await;
    let addr = api::start(&config, api.state.clone(), &cancel, &TaskTracker::new())
        .expect("start the API")
        .expect("listening");
    (addr, cancel)
}

/// Opens `path` as a WebSocket, sends Close and returns how long the server took to answer it
/// (the frames pushed meanwhile are skipped).
async fn close_round_trip(addr: SocketAddr, path: &str) -> Duration {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}{path}"))
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let sent = Instant::now();
    ws.send(Message::Close(None)).await.expect("send close");
    loop {
        match tokio::time::timeout(Duration::from_secs(3), ws.next()).await {
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) => return sent.elapsed(),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => panic!("{path}: {e}"),
            Err(_) => panic!("{path}: the server never answered the Close"),
        }
    }
}

async fn websocket_close_is_answered_within_100ms() {
    let (addr, cancel) = serve("").await;
    for path in [
        "/connections?interval=100",
        "/traffic",
        "/memory",
        "/logs?level=debug",
    ] {
        let took = close_round_trip(addr, path).await;
        assert!(
            took < Duration::from_millis(100),
            "{path}: Close answered after {took:?}"
        );
    }
    cancel.cancel();
}

async fn websocket_ping_is_answered_with_pong() {
    let (addr, cancel) = serve("").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/traffic"))
        .await
        .expect("websocket");
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .expect("ping");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Pong(p)))) => {
                assert_eq!(&p[..], b"are you there");
                break;
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no pong: {other:?}"),
        }
    }
    cancel.cancel();
}

/// One raw HTTP exchange: writes `request`, returns what came back before the server closed or
/// `wait` passed.
fn raw(addr: SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut conn = std::net::TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(wait)).expect("timeout");
    conn.write_all(request).expect("request");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = conn.read(&mut buf) {
        got.extend_from_slice(&buf[..n]);
        if got.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

async fn an_oversized_body_is_refused_before_it_is_read() {
    let (addr, cancel) = serve("").await;
    let reply = tokio::task::spawn_blocking(move || {
        raw(
            addr,
            b"PATCH /configs HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n\
              Content-Length: 50000000\r\n\r\n{",
            Duration::from_secs(5),
        )
    })
    .await
    .expect("client");
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply:?}");
    cancel.cancel();
}

async fn half_a_request_head_is_dropped_after_the_deadline() {
    let (addr, cancel) = serve("").await;
    let ends = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let conns: Vec<_> = (0..50)
            .map(|_| {
                let mut c = std::net::TcpStream::connect(addr).expect("connect");
                c.write_all(b"GET /connections HTTP/1.1\r\nHost: a")
                    .expect("half a head");
                c.set_read_timeout(Some(api::HEADER_TIMEOUT * 3))
                    .expect("timeout");
                c
            })
            .collect();
        conns
            .into_iter()
            .map(|mut c| {
                let mut buf = [0u8; 64];
                let r = c.read(&mut buf);
                (r.map_err(|e| e.kind()), started.elapsed())
            })
            .collect::<Vec<_>>()
    })
    .await
    .expect("clients");
    for (result, after) in ends {
        assert!(
            !matches!(result, Err(std::io::ErrorKind::WouldBlock)),
            "a slow client was still connected after {after:?}"
        );
        assert!(
            after >= api::HEADER_TIMEOUT && after < api::HEADER_TIMEOUT + Duration::from_secs(3),
            "dropped after {after:?}"
        );
    }
    cancel.cancel();
}

crate::tests![
    tokio websocket_close_is_answered_within_100ms,
    tokio websocket_ping_is_answered_with_pong,
    tokio an_oversized_body_is_refused_before_it_is_read,
    tokio half_a_request_head_is_dropped_after_the_deadline,
];
