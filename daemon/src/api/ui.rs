//! `/ui/`: the usage page (its three files are in the binary) and mihomo's `external-ui`, a
//! dashboard's static build served from a folder at `/ui/<name>/` without a byte from outside
//! that folder (no `..`, no encoded slashes, no symlink that leads out).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use axum::{
    Router,
    body::Body,
    extract::State,
    http::{StatusCode, Uri, header},
    response::{Html, IntoResponse, Redirect, Response},
    routing::get,
};

use super::{ApiError, ApiState};

const INDEX: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/usage.js");
const STYLE: &str = include_str!("ui/usage.css");
/// Where the page links to the dashboard.
const SLOT: &str = "<!--EXTERNAL-UI-->";

/// The routes, served without the secret (the page asks for it; data calls carry it).
pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(index))
        .route(
            "/ui/usage.js",
            get(|| async { asset("text/javascript", SCRIPT) }),
        )
        .route("/ui/usage.css", get(|| async { asset("text/css", STYLE) }))
        .route("/ui/{name}", get(slash))
        .route("/ui/{name}/", get(external))
        .route("/ui/{name}/{*path}", get(external))
}

fn asset(kind: &'static str, text: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, format!("{kind}; charset=utf-8")),
            (header::CACHE_CONTROL, "no-cache".to_owned()),
        ],
        text,
    )
        .into_response()
}

async fn index(State(state): State<Arc<ApiState>>) -> Html<String> {
    let link = state
        .config
        .external_ui(&state.dir)
        .map(|(_, name)| format!("<a href=\"/ui/{name}/\">{name}</a>"))
        .unwrap_or_default();
    // Whether the page must ask for a secret before its first request (so a first visit
    // does not start with a refused one).
    let auth = match state.config.secret.as_deref() {
        Some("") => "none",
        _ => "required",
    };
    Html(
        INDEX
            .replace(SLOT, &link)
            .replace("<body>", &format!("<body data-auth=\"{auth}\">")),
    )
}

async fn slash(uri: Uri) -> Redirect {
    Redirect::permanent(&format!("{}/", uri.path()))
}

/// Why a path under `/ui/<name>/` is not served.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("no dashboard is configured under this name (external-ui)")]
    NoDashboard,
    #[error("the path has an encoded slash or backslash")]
    EncodedSeparator,
    #[error("the path has a `.` or `..` segment, a backslash or a NUL")]
    Segment,
    #[error("the path is not valid UTF-8 once decoded")]
    Encoding,
    #[error("the path leads outside the dashboard's folder")]
    Outside,
    #[error("no such file")]
    Missing,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let status = match self {
            Refused::NoDashboard | Refused::Missing => StatusCode::NOT_FOUND,
            Refused::Outside => StatusCode::FORBIDDEN,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError(status, self.to_string()).into_response()
    }
}

/// The file `rest` (the raw, still encoded path after `/ui/<name>/`) names inside `root`,
/// checked segment by segment before decoding and by its real location after.
pub fn resolve(root: &Path, rest: &str) -> Result<PathBuf, Refused> {
    let lower = rest.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") {
        return Err(Refused::EncodedSeparator);
    }
    let mut path = root.to_owned();
    for raw in rest.split('/').filter(|s| !s.is_empty()) {
        let segment = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| Refused::Encoding)?;
        if segment == "." || segment == ".." || segment.contains(['\\', '\0']) {
            return Err(Refused::Segment);
        }
        path.push(segment.as_ref());
    }
    let root = root.canonicalize().map_err(|_| Refused::NoDashboard)?;
    let mut real = path.canonicalize().map_err(|_| Refused::Missing)?;
    if real.is_dir() {
        real = real
            .join("index.html")
            .canonicalize()
            .map_err(|_| Refused::Missing)?;
    }
    if !real.starts_with(&root) {
        return Err(Refused::Outside);
    }
    Ok(real)
}

async fn external(State(state): State<Arc<ApiState>>, uri: Uri) -> Result<Response, Refused> {
    let (root, name) = state
        .config
        .external_ui(&state.dir)
        .ok_or(Refused::NoDashboard)?;
    let prefix = format!("/ui/{name}/");
    let rest = uri
        .path()
        .strip_prefix(&prefix)
        .ok_or(Refused::NoDashboard)?;
    let rest = rest.to_owned();
    let file = tokio::task::spawn_blocking(move || resolve(&root, &rest))
        .await
        .map_err(|_| Refused::Missing)??;
    let opened = tokio::fs::File::open(&file)
        .await
        .map_err(|_| Refused::Missing)?;
    let len = opened.metadata().await.map_err(|_| Refused::Missing)?.len();
    let mime = mime_guess::from_path(&file).first_or_octet_stream();
    let text = mime.type_() == mime_guess::mime::TEXT
        || mime.suffix() == Some(mime_guess::mime::XML)
        || ["javascript", "json", "xml"].contains(&mime.subtype().as_str());
    let kind = if text {
        format!("{mime}; charset=utf-8")
    } else {
        mime.to_string()
    };
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(opened));
    Ok((
        [
            (header::CONTENT_TYPE, kind),
            (header::CONTENT_LENGTH, len.to_string()),
            (header::CACHE_CONTROL, "no-cache".to_owned()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
        ],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_folder() {
        let top = std::env::temp_dir().join(format!("tpacct-ui-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&top);
        let root = top.join("ui");
        std::fs::create_dir_all(root.join("assets")).expect("fixture");
        std::fs::write(root.join("index.html"), "<html>").expect("fixture");
        std::fs::write(root.join("assets/a b.js"), "x").expect("fixture");
        std::fs::write(top.join("secret.txt"), "no").expect("fixture");
        std::os::unix::fs::symlink(top.join("secret.txt"), root.join("link.txt")).expect("fixture");
        let real = |p: &str| root.join(p).canonicalize().expect("fixture");
        assert_eq!(resolve(&root, ""), Ok(real("index.html")));
        assert_eq!(resolve(&root, "assets/a%20b.js"), Ok(real("assets/a b.js")));
        assert_eq!(resolve(&root, "../secret.txt"), Err(Refused::Segment));
        assert_eq!(resolve(&root, "assets/%2e%2e/../x"), Err(Refused::Segment));
        assert_eq!(
            resolve(&root, "..%2fsecret.txt"),
            Err(Refused::EncodedSeparator)
        );
        assert_eq!(
            resolve(&root, "..%5Csecret.txt"),
            Err(Refused::EncodedSeparator)
        );
        assert_eq!(resolve(&root, "link.txt"), Err(Refused::Outside));
        assert_eq!(resolve(&root, "nothing.js"), Err(Refused::Missing));
        assert_eq!(resolve(&root, "a%00b"), Err(Refused::Segment));
        assert_eq!(resolve(&root, "%ff"), Err(Refused::Encoding));
        std::fs::remove_dir_all(&top).expect("fixture");
    }
}
