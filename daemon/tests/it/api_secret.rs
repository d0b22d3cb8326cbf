//! The controller is never open by default: `tpacctd run` without a `secret` generates one,
//! keeps it in the state directory and logs it; every request needs it, while a dashboard on
//! its own origin still gets through CORS preflights and opens WebSockets with `?token=`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
};

use futures_util::StreamExt;

use crate::common::daemon::{Daemon, state_dir};

const CONFIG: &str = "accounting: userspace\ntproxy-port: 0\nexternal-controller: 127.0.0.1:0\n";

/// Starts the daemon with [`CONFIG`]; returns it with its secret (as logged) and API address.
fn start() -> (Daemon, String, SocketAddr) {
    let path = crate::common::scratch::file("secret.yaml", CONFIG);
    let daemon = Daemon::start(None, &["run", "--config", path.to_str().expect("utf-8")]);
    let line = daemon.wait_for("external-controller: secret ");
    let secret = line
        .split("external-controller: secret ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("secret in the log")
        .to_owned();
    let line = daemon.wait_for("Clash API on http://");
    let addr = line
        .rsplit("http://")
        .next()
        .and_then(|a| a.trim().parse().ok())
        .expect("address in the log");
    daemon.wait_for("ready");
    (daemon, secret, addr)
}

/// Status line and headers of one request.
fn head(addr: SocketAddr, request: &str) -> String {
    let mut conn = TcpStream::connect(addr).expect("connect");
    conn.write_all(request.as_bytes()).expect("write");
    let mut reply = String::new();
    let _ = conn.read_to_string(&mut reply);
    reply
        .split_once("\r\n\r\n")
        .map_or(reply.clone(), |(h, _)| h.to_owned())
}

fn get(addr: SocketAddr, auth: Option<&str>) -> String {
    let auth = auth.map_or(String::new(), |s| format!("Authorization: Bearer {s}\r\n"));
    head(
        addr,
        &format!("GET /version HTTP/1.1\r\nHost: a\r\n{auth}Connection: close\r\n\r\n"),
    )
}

async fn websocket(addr: SocketAddr, token: &str) -> Result<usize, String> {
    let url = format!("ws://{addr}/traffic?token={token}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| e.to_string())?;
    let mut frames = 0;
    while frames < 2 {
        match ws.next().await {
            Some(Ok(m)) if m.is_text() => frames += 1,
            Some(Ok(_)) => {}
            other => return Err(format!("{other:?}")),
        }
    }
    Ok(frames)
}

fn the_controller_gets_a_generated_secret() {
    let _turn = crate::common::serial();
    let _ = std::fs::remove_dir_all(state_dir());
    let (daemon, secret, addr) = start();
    assert_eq!(secret.len(), 32, "{secret}");
    let kept = std::fs::read_to_string(state_dir().join("secret")).expect("secret file");
    assert_eq!(kept.trim(), secret);

    assert!(get(addr, None).starts_with("HTTP/1.1 401"));
    assert!(get(addr, Some("wrong")).starts_with("HTTP/1.1 401"));
    assert!(get(addr, Some(&secret)).starts_with("HTTP/1.1 200"));

    // A dashboard on its own origin: the preflight needs no token and allows the header.
    let preflight = head(
        addr,
        "OPTIONS /connections HTTP/1.1\r\nHost: a\r\nOrigin: http://dashboard.example\r\n\
         Access-Control-Request-Method: GET\r\nAccess-Control-Request-Headers: authorization\r\n\
         Connection: close\r\n\r\n",
    )
    .to_ascii_lowercase();
    assert!(preflight.starts_with("http/1.1 200"), "{preflight}");
    assert!(
        preflight.contains("access-control-allow-origin: *"),
        "{preflight}"
    );
    assert!(preflight.contains("authorization"), "{preflight}");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    assert_eq!(rt.block_on(websocket(addr, &secret)), Ok(2));
    let refused = rt.block_on(websocket(addr, "wrong")).expect_err("refused");
    assert!(refused.contains("401"), "{refused}");
    assert!(daemon.terminate().success());

    // The next start keeps the same secret; `POST /restart` restarts in place.
    let (daemon, again, addr) = start();
    assert_eq!(again, secret);
    let reply = head(
        addr,
        &format!(
            "POST /restart HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {secret}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    daemon.wait_for("restarting");
    daemon.wait_for("starting");
    daemon.wait_for("ready");
    assert!(
        daemon.terminate().success(),
        "the restarted daemon stops cleanly"
    );
}

crate::tests![any the_controller_gets_a_generated_secret];
