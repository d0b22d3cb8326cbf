//! `/api/v1/stats` and `/api/v1/health`: the history's summary, groups and time series in
//! the shape mihomo-connections-tracker's users know (`{status, data, message}`), exact up to
//! now: live flows count at their current bytes.

use std::{collections::HashMap, sync::Arc};

use axum::{
    Json,
    extract::{Query as Params, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{ApiState, queries::QueryError};
use crate::store::{
    Row, Store,
    query::{self, FILTERS, GROUPS, INTERVALS, Query},
};

/// A stats answer: 200 with `data`, or an error status with `message`.
fn envelope(status: StatusCode, result: Result<Value, String>) -> Response {
    let body = match result {
        Ok(data) => json!({ "status": "success", "data": data, "message": null }),
        Err(message) => json!({ "status": "error", "data": null, "message": message }),
    };
    (status, Json(body)).into_response()
}

fn bad(message: impl Into<String>) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, message.into())
}

/// Runs `work` on a query thread and answers with its result (503 when too many wait).
async fn respond(
    state: Arc<ApiState>,
    work: impl FnOnce(&ApiState) -> Result<Value, (StatusCode, String)> + Send + 'static,
) -> Response {
    let shared = state.clone();
    match state.queries.run(move || work(&shared)).await {
        Ok(Ok(data)) => envelope(StatusCode::OK, Ok(data)),
        Ok(Err((status, message))) => envelope(status, Err(message)),
        Err(e @ QueryError::Busy) => envelope(StatusCode::SERVICE_UNAVAILABLE, Err(e.to_string())),
        Err(e) => envelope(StatusCode::INTERNAL_SERVER_ERROR, Err(e.to_string())),
    }
}

pub(super) async fn health() -> &'static str {
    "OK"
}

const KNOWN: &[&str] = &[
    "type",
    "group_by",
    "interval",
    "metric",
    "limit",
    "sort_by",
    "sort_order",
];

fn time(params: &HashMap<String, String>, key: &str) -> Result<Option<i64>, (StatusCode, String)> {
    params
        .get(key)
        .map(|v| {
            humantime::parse_rfc3339_weak(v)
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as i64)
                .ok_or_else(|| bad(format!("{key}: {v:?} is not an RFC 3339 time")))
        })
        .transpose()
}

fn one_of<'a>(
    params: &'a HashMap<String, String>,
    key: &str,
    allowed: &[&str],
    default: Option<&'a str>,
) -> Result<&'a str, (StatusCode, String)> {
    match params.get(key).map(String::as_str).or(default) {
        Some(v) if allowed.contains(&v) => Ok(v),
        Some(v) => Err(bad(format!(
            "{key}: {v:?} is not one of {}",
            allowed.join(", ")
        ))),
        None => Err(bad(format!("{key} is required"))),
    }
}

/// The time range and filters; any parameter not among them or `known` is refused.
fn parse(params: &HashMap<String, String>, known: &[&str]) -> Result<Query, (StatusCode, String)> {
    if let Some(unknown) = params.keys().find(|k| {
        !known.contains(&k.as_str())
            && !["from", "to"].contains(&k.as_str())
            && !FILTERS.iter().any(|(f, _)| f == k)
    }) {
        return Err(bad(format!("unknown parameter {unknown:?}")));
    }
    let from_ms = time(params, "from")?;
    let to_ms = time(params, "to")?;
    if let (Some(f), Some(t)) = (from_ms, to_ms)
        && f > t
    {
        return Err(bad("from is after to"));
    }
    let filters = FILTERS
        .iter()
        .filter_map(|(name, column)| params.get(*name).map(|v| (*column, v.clone())))
        .collect();
    Ok(Query {
        from_ms,
        to_ms,
        filters,
    })
}

/// `limit`: a number in `1..=max`, else `default`.
fn limit(
    params: &HashMap<String, String>,
    default: u32,
    max: u32,
) -> Result<u32, (StatusCode, String)> {
    match params.get("limit") {
        None => Ok(default),
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| bad(format!("limit: {v:?} is not a number from 1 to {max}"))),
    }
}

/// Flows the database may not hold yet: the recently closed ring and the live flows.
fn unsaved(state: &ApiState, store: &Store, with_live: bool) -> Vec<Row> {
    let (recent, mut live) = state.registry.recent_and_live();
    if !with_live {
        live.clear();
    }
    recent
        .iter()
        .map(|c| store.row(c))
        .chain(live.iter().map(|l| store.row(&l.flow.closed(l.traffic))))
        .collect()
}

/// The history's store and a query connection holding what it may not have yet.
fn connect(
    state: &ApiState,
    with_live: bool,
) -> Result<(&Store, rusqlite::Connection), (StatusCode, String)> {
    let store = state.registry.store().ok_or((
        StatusCode::NOT_FOUND,
        "history is off (storage.enable: false)".to_owned(),
    ))?;
    let conn = query::open(store.path(), &unsaved(state, store, with_live))
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, format!("history: {e}")))?;
    Ok((store, conn))
}

fn failed(e: rusqlite::Error) -> (StatusCode, String) {
    (StatusCode::INTERNAL_SERVER_ERROR, format!("query: {e}"))
}

/// `GET /api/v1/devices`: every device with its addresses, name and usage today, this month
/// and in all (UTC days and months).
pub(super) async fn devices(State(state): State<Arc<ApiState>>) -> Response {
    respond(state, move |state| {
        let (store, conn) = connect(state, true)?;
        let mut list = query::devices(&conn, std::time::SystemTime::now()).map_err(failed)?;
        for d in list.iter_mut() {
            let id = d["device"].as_str().unwrap_or_default().to_owned();
            let name = store.devices.name(&id).or_else(|| {
                d["ips"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find_map(|ip| store.devices.name(ip.as_str().unwrap_or_default()))
            });
            d["hostname"] = json!(name);
        }
        Ok(Value::Array(list))
    })
    .await
}

fn answer(
    state: &ApiState,
    params: &HashMap<String, String>,
) -> Result<Value, (StatusCode, String)> {
    let q = parse(params, KNOWN)?;
    let kind = one_of(params, "type", &["summary", "group", "timeseries"], None)?;
    let (_, conn) = connect(state, true)?;
    match kind {
        "summary" => query::summary(&conn, &q).map_err(failed),
        "group" => {
            let names: Vec<&str> = GROUPS.iter().map(|g| g.0).collect();
            let by = one_of(params, "group_by", &names, None)?;
            let (_, key, expr) = GROUPS
                .iter()
                .find(|g| g.0 == by)
                .copied()
                .unwrap_or(GROUPS[0]);
            let sort_by = one_of(
                params,
                "sort_by",
                &["count", "download", "upload", "total"],
                Some("total"),
            )?;
            let order = one_of(params, "sort_order", &["asc", "desc"], Some("desc"))?;
            let limit = limit(params, 100, 10_000)?;
            query::group(&conn, &q, (key, expr), (sort_by, order == "desc"), limit).map_err(failed)
        }
        _ => {
            let names: Vec<&str> = INTERVALS.iter().map(|i| i.0).collect();
            let interval = one_of(params, "interval", &names, None)?;
            let (_, bucket, slot) = INTERVALS
                .iter()
                .find(|i| i.0 == interval)
                .copied()
                .unwrap_or(INTERVALS[0]);
            let metric = one_of(
                params,
                "metric",
                &["connections", "download", "upload", "total"],
                Some("total"),
            )?;
            query::timeseries(&conn, &q, (bucket, slot), metric).map_err(failed)
        }
    }
}

pub(super) async fn stats(
    State(state): State<Arc<ApiState>>,
    Params(params): Params<HashMap<String, String>>,
) -> Response {
    respond(state, move |state| answer(state, &params)).await
}

/// `GET /api/v1/connections`: closed flows, the newest first, `limit` (1–1000, default 100) a
/// page; `cursor` (the previous page's `next_cursor`) continues after it. Same range and
/// filters as the stats.
pub(super) async fn connections(
    State(state): State<Arc<ApiState>>,
    Params(params): Params<HashMap<String, String>>,
) -> Response {
    respond(state, move |state| {
        let q = parse(&params, &["limit", "cursor"])?;
        let limit = limit(&params, 100, 1000)?;
        let after = params
            .get("cursor")
            .map(|c| {
                c.split_once('_')
                    .and_then(|(ms, id)| Some((ms.parse::<i64>().ok()?, id.to_owned())))
                    .ok_or_else(|| bad(format!("cursor: {c:?} is not one this API gave")))
            })
            .transpose()?;
        let (_, conn) = connect(state, false)?;
        let (rows, next) = query::closed(&conn, &q, after, limit).map_err(failed)?;
        Ok(json!({ "connections": rows, "next_cursor": next }))
    })
    .await
}
