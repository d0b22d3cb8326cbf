//! Bearer-token auth: `Authorization: Bearer <secret>` on every request, `?token=` accepted
//! only on WebSocket upgrades (browsers cannot set headers there); compared in constant time.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::Next,
    response::Response,
};
use subtle::ConstantTimeEq;

use super::{ApiError, ApiState};

pub(super) async fn require(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let secret = state
        .config
        .secret
        .as_deref()
        .unwrap_or_default()
        .as_bytes();
    if secret.is_empty() {
        return Ok(next.run(request).await);
    }
    let matches = |given: &str| bool::from(given.as_bytes().ct_eq(secret));
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let upgrade = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let token = upgrade
        .then(|| {
            request.uri().query().and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix("token="))
                    .map(percent_decode)
            })
        })
        .flatten();
    if bearer.is_some_and(matches) || token.as_deref().is_some_and(matches) {
        Ok(next.run(request).await)
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "Unauthorized".to_owned(),
        ))
    }
}

/// `%XX` and `+` decoding for the token query value.
fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| Some(hex(*bytes.get(i + 1)?)? << 4 | hex(*bytes.get(i + 2)?)?))
            .flatten();
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn decodes_tokens() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("s3cr%2Ft"), "s3cr/t");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
