//! `tpacctd top`: a live terminal view of a gateway over its controller — the live flows
//! with their rates, and every device with its rate and its today / this month / all-time
//! bytes — refreshed in place (ratatui), for an operator on SSH. `--once` prints one frame
//! as plain text instead, for scripts.

mod model;
mod view;

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use serde_json::Value;

pub use model::{Model, Sort};

/// Answers larger than this are refused.
const MAX_BODY: usize = 64 << 20;
/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(3);

/// What went wrong talking to the controller or the terminal.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: not a controller address (host:port or http://host:port)")]
    Address(String),
    #[error("GET {path}: {message}")]
    Request { path: String, message: String },
    #[error("the terminal: {0}")]
    Terminal(#[from] std::io::Error),
}

/// Where the controller is and how to ask it.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port`.
    pub addr: String,
    pub secret: Option<String>,
}

impl Target {
    /// From `host:port`, `:port` or `http://host:port[/]` (mihomo's `external-controller`).
    pub fn new(controller: &str, secret: Option<String>) -> Result<Target, Error> {
        let bare = controller
            .strip_prefix("http://")
            .unwrap_or(controller)
            .trim_end_matches('/');
        let addr = match bare.strip_prefix(':') {
            Some(port) => format!("127.0.0.1:{port}"),
            None => bare
                .replace("0.0.0.0:", "127.0.0.1:")
                .replace("[::]:", "[::1]:"),
        };
        if addr.is_empty() || !addr.contains(':') || addr.contains('/') {
            return Err(Error::Address(controller.to_owned()));
        }
        Ok(Target { addr, secret })
    }

    /// `GET path` as JSON.
    async fn get(&self, path: &str) -> Result<Value, Error> {
        let failed = |message: String| Error::Request {
            path: path.to_owned(),
            message,
        };
        let work = async {
            let stream = tokio::net::TcpStream::connect(&self.addr)
                .await
                .map_err(|e| failed(format!("connecting to {}: {e}", self.addr)))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| failed(e.to_string()))?;
            tokio::spawn(conn);
            let mut req = Request::get(path).header(hyper::header::HOST, &self.addr);
            if let Some(s) = &self.secret {
                req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {s}"));
            }
            let req = req
                .body(Empty::<Bytes>::new())
                .map_err(|e| failed(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| failed(e.to_string()))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| failed(e.to_string()))?
                .to_bytes();
            if !status.is_success() {
                return Err(failed(format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&body).trim()
                )));
            }
            serde_json::from_slice(&body).map_err(|e| failed(e.to_string()))
        };
        tokio::time::timeout(TIMEOUT, work)
            .await
            .map_err(|_| failed("timed out".into()))?
    }

    /// The live flows, and the devices (none when the history is off).
    async fn sample(&self) -> Result<(Value, Option<Value>), Error> {
        let (flows, devices) = tokio::join!(self.get("/connections"), self.get("/api/v1/devices"));
        let devices = devices.ok().map(|mut d| d["data"].take());
        Ok((flows?, devices))
    }
}

/// Prints one frame (`width` × `height`) as text: two samples `interval` apart, so that
/// the rates are real.
pub fn once(target: &Target, interval: Duration, width: u16, height: u16) -> Result<String, Error> {
    let rt = runtime()?;
    let mut model = Model::new(&target.addr);
    let (flows, devices) = rt.block_on(target.sample())?;
    model.update(&flows, devices.as_ref(), Instant::now());
    std::thread::sleep(interval);
    let (flows, devices) = rt.block_on(target.sample())?;
    model.update(&flows, devices.as_ref(), Instant::now());
    // A test backend cannot fail.
    let Ok(mut terminal) =
        ratatui::Terminal::new(ratatui::backend::TestBackend::new(width, height));
    let _ = terminal.draw(|f| view::draw(f, &model));
    let buffer = terminal.backend().buffer();
    let mut text = String::new();
    for y in 0..buffer.area.height {
        let line: String = (0..buffer.area.width)
            .map(|x| buffer[(x, y)].symbol())
            .collect();
        text += line.trim_end();
        text.push('\n');
    }
    Ok(text)
}

/// The live view until `q`, Esc or Ctrl-C: samples every `interval`, keys in between (`s`
/// cycles the flows' order).
pub fn run(target: &Target, interval: Duration) -> Result<(), Error> {
    let rt = runtime()?;
    let mut terminal = ratatui::try_init()?;
    let result = (|| {
        let mut model = Model::new(&target.addr);
        loop {
            match rt.block_on(target.sample()) {
                Ok((flows, devices)) => model.update(&flows, devices.as_ref(), Instant::now()),
                Err(e) => model.error = Some(e.to_string()),
            }
            terminal.draw(|f| view::draw(f, &model))?;
            let next = Instant::now() + interval;
            while let Some(left) = next.checked_duration_since(Instant::now()) {
                if !event::poll(left)? {
                    break;
                }
                if let Event::Key(k) = event::read()?
                    && k.kind == KeyEventKind::Press
                {
                    match k.code {
                        KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                            return Ok(());
                        }
                        KeyCode::Char('s') => {
                            model.sort = model.sort.next();
                            terminal.draw(|f| view::draw(f, &model))?;
                        }
                        _ => {}
                    }
                }
            }
        }
    })();
    ratatui::try_restore()?;
    result
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_addresses_in_every_form_mihomo_takes() {
        let addr = |s: &str| Target::new(s, None).map(|t| t.addr);
        assert_eq!(addr("127.0.0.1:9090").ok(), Some("127.0.0.1:9090".into()));
        assert_eq!(addr(":9090").ok(), Some("127.0.0.1:9090".into()));
        assert_eq!(addr("0.0.0.0:9090").ok(), Some("127.0.0.1:9090".into()));
        assert_eq!(addr("http://[::]:9090/").ok(), Some("[::1]:9090".into()));
        assert!(addr("nowhere").is_err());
        assert!(addr("http://a:1/x").is_err());
    }
}
