//! Handlers of the ingest role.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use scholia_events::auth::{self, Scope};
use scholia_events::envelope::format_time;
use scholia_events::error::DbContext;
use scholia_events::{Database, EventBody, NewEvent, log};

use crate::IngestState;
use crate::kinds::KindSpec;
use crate::parse::{self, BodyFormat, Defaults};
use crate::problem::{ApiError, ApiResult, AppJson};
use crate::store;

pub(crate) fn router(state: IngestState) -> Router {
    Router::new()
        .route("/v1/events", post(post_events))
        .route("/v1/events/{data_id}", get(get_event))
        .route("/v1/kinds", get(list_kinds))
        .route("/v1/kinds/{kind}", put(put_kind))
        .route("/v1/quarantine", get(list_quarantine))
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{id}", delete(revoke_token))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
struct IngestQuery {
    kind: Option<String>,
    source: Option<String>,
}

#[derive(Debug, Serialize)]
struct LineError {
    line: usize,
    error: String,
}

#[derive(Debug, Serialize)]
struct IngestResponse {
    accepted: u64,
    duplicates: u64,
    quarantined: u64,
    errors: Vec<LineError>,
}

/// At most this many line errors are listed in a response; all are in the quarantine.
const MAX_LISTED_ERRORS: usize = 1_000;

async fn post_events(
    State(state): State<IngestState>,
    Query(query): Query<IngestQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<IngestResponse>> {
    let started = Instant::now();
    let token = state
        .shared
        .auth
        .require(&headers, None, Scope::Ingest)
        .await?;
    let _permit = state.inflight.clone().try_acquire_owned().map_err(|_| {
        state
            .shared
            .metrics
            .counter(
                "scholia_ingest_overloaded_total",
                "Batches refused because too many were in flight.",
            )
            .fetch_add(1, Ordering::Relaxed);
        ApiError::overloaded(
            "Too many batches are being written right now; retry after the given delay.",
        )
    })?;
    let format = body_format(&headers)?;
    let gzip = match headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
    {
        None => false,
        Some(e) if e == "identity" => false,
        Some(e) if e == "gzip" => true,
        Some(e) => {
            return Err(ApiError::unsupported_media_type(format!(
                "Content-Encoding {e:?} is not supported; send the body plain or gzip-compressed."
            )));
        }
    };
    let limit = state.limits.max_body_bytes;
    let too_large = || {
        ApiError::too_large(format!(
            "The body is larger than {limit} bytes (SCHOLIA_MAX_BODY_BYTES); split it into smaller batches."
        ))
    };
    if let Some(length) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        && length > limit
    {
        return Err(too_large());
    }
    let mut raw = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("The body could not be read: {e}")))?;
        if raw.len() + chunk.len() > limit {
            return Err(too_large());
        }
        raw.extend_from_slice(&chunk);
    }

    let defaults = Defaults {
        kind: query.kind,
        source: query.source,
    };
    let kinds = state.kinds.clone();
    let received_at = Utc::now();
    let parsing = state
        .parsers
        .clone()
        .acquire_owned()
        .await
        .map_err(ApiError::internal)?;
    let parsed = tokio::task::spawn_blocking(move || {
        let _parsing = parsing;
        let body = if gzip { inflate(&raw, limit)? } else { raw };
        parse::parse_body(&body, format, &defaults, received_at, &|kind| {
            kinds.spec(kind)
        })
        .map_err(ApiError::bad_request)
    })
    .await
    .map_err(ApiError::internal)??;

    if let Some((line, envelope)) = parsed
        .envelopes
        .iter()
        .find(|(_, e)| !token.may_write_source(&e.source))
    {
        return Err(ApiError::forbidden(format!(
            "This token may write only sources matching {}; line {line} has source {:?}. Nothing in this batch was written.",
            token.sources.join(", "),
            envelope.source
        )));
    }
    let outcome = store::write_batch(
        &state.shared.db,
        parsed.envelopes,
        parsed.rejected,
        &token.actor(),
        received_at,
    )
    .await?;
    // One source.ingested event per kind of the batch: the kinds this batch brought.
    for event in &outcome.events {
        if let EventBody::SourceIngested { kind, .. } = &event.body
            && !state.kinds.knows(kind)
        {
            state.kinds.remember(kind);
        }
    }

    let m = &state.shared.metrics;
    m.counter(
        "scholia_ingest_records_accepted_total",
        "Records durably stored.",
    )
    .fetch_add(outcome.accepted, Ordering::Relaxed);
    m.counter(
        "scholia_ingest_records_duplicate_total",
        "Records already stored with the same content.",
    )
    .fetch_add(outcome.duplicates, Ordering::Relaxed);
    m.counter(
        "scholia_ingest_records_quarantined_total",
        "Records quarantined.",
    )
    .fetch_add(outcome.quarantined.len() as u64, Ordering::Relaxed);
    m.counter("scholia_ingest_batches_total", "Batches committed.")
        .fetch_add(1, Ordering::Relaxed);
    m.histogram(
        "scholia_ingest_batch_seconds",
        "Time from request to durable commit.",
    )
    .observe(started.elapsed().as_secs_f64());

    let mut errors: Vec<LineError> = outcome
        .quarantined
        .iter()
        .map(|r| LineError {
            line: r.line,
            error: r.error.clone(),
        })
        .collect();
    errors.sort_by_key(|e| e.line);
    errors.truncate(MAX_LISTED_ERRORS);
    Ok(Json(IngestResponse {
        accepted: outcome.accepted,
        duplicates: outcome.duplicates,
        quarantined: outcome.quarantined.len() as u64,
        errors,
    }))
}

fn body_format(headers: &HeaderMap) -> ApiResult<BodyFormat> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    match content_type.as_deref() {
        Some("application/json") => Ok(BodyFormat::Json),
        Some(
            "application/x-ndjson"
            | "application/ndjson"
            | "application/jsonl"
            | "application/x-jsonlines",
        ) => Ok(BodyFormat::Ndjson),
        Some(other) => Err(ApiError::unsupported_media_type(format!(
            "Content-Type {other:?} is not accepted; send application/json (one envelope or an array) or application/x-ndjson (one envelope per line)."
        ))),
        None => Err(ApiError::unsupported_media_type(
            "Set Content-Type to application/json (one envelope or an array) or application/x-ndjson (one envelope per line).",
        )),
    }
}

fn inflate(compressed: &[u8], limit: usize) -> Result<Vec<u8>, ApiError> {
    use std::io::Read;
    let mut out = Vec::new();
    let mut reader = flate2::read::GzDecoder::new(compressed).take(limit as u64 + 1);
    reader
        .read_to_end(&mut out)
        .map_err(|e| ApiError::bad_request(format!("The body is not valid gzip ({e}).")))?;
    if out.len() > limit {
        return Err(ApiError::too_large(format!(
            "The body inflates to more than {limit} bytes (SCHOLIA_MAX_BODY_BYTES); split it into smaller batches."
        )));
    }
    Ok(out)
}

async fn get_event(
    State(state): State<IngestState>,
    Path(data_id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    state
        .shared
        .auth
        .require(&headers, None, Scope::Read)
        .await?;
    let data_id = Uuid::parse_str(&data_id).map_err(|_| {
        ApiError::bad_request(format!("{data_id:?} is not a UUID; data ids are UUIDs."))
    })?;
    let row = match &state.shared.db {
        Database::Postgres(pg) => sqlx::query_as::<_, (String, String, DateTime<Utc>, DateTime<Utc>, i64, String)>(
            "SELECT kind, source, created, received_at, seq, data::text FROM records WHERE data_id = $1",
        )
        .bind(data_id)
        .fetch_optional(&pg.pool)
        .await
        .context("reading a record")?,
        Database::Sqlite(d) => sqlx::query_as::<_, (String, String, i64, i64, i64, String)>(
            "SELECT kind, source, created, received_at, seq, data FROM records WHERE data_id = $1",
        )
        .bind(data_id)
        .fetch_optional(&d.pool)
        .await
        .context("reading a record")?
        .map(|(k, s, c, r, seq, d)| (k, s, from_micros(c), from_micros(r), seq, d)),
    };
    let (kind, source, created, received_at, seq, data) =
        row.ok_or_else(|| ApiError::not_found(format!("No record has data_id {data_id}.")))?;
    let data: Value = serde_json::from_str(&data).map_err(ApiError::internal)?;
    Ok(Json(json!({
        "data_id": data_id,
        "kind": kind,
        "source": source,
        "created": format_time(created),
        "data": data,
        "received_at": format_time(received_at),
        "seq": seq,
    })))
}

pub(crate) fn from_micros(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or_default()
}

async fn list_kinds(
    State(state): State<IngestState>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    state
        .shared
        .auth
        .require(&headers, None, Scope::Read)
        .await?;
    let kinds = state.kinds.list().await?;
    Ok(Json(json!({ "kinds": kinds })))
}

async fn put_kind(
    State(state): State<IngestState>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    AppJson(spec): AppJson<KindSpec>,
) -> ApiResult<Json<Value>> {
    let token = state
        .shared
        .auth
        .require(&headers, None, Scope::Admin)
        .await?;
    if kind.is_empty() || kind.len() > 200 {
        return Err(ApiError::bad_request(
            "A kind name must be 1 to 200 characters long.",
        ));
    }
    let info = state.kinds.put(&kind, &spec).await?;
    log::append_now(
        &state.shared.db,
        vec![NewEvent::new(
            token.actor(),
            EventBody::AdminAction {
                action: "kind.declared".into(),
                target: kind,
                detail: json!(spec.fields),
            },
        )],
    )
    .await?;
    Ok(Json(json!(info)))
}

#[derive(Debug, Deserialize)]
struct QuarantineQuery {
    after: Option<i64>,
    limit: Option<i64>,
}

async fn list_quarantine(
    State(state): State<IngestState>,
    Query(q): Query<QuarantineQuery>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    state
        .shared
        .auth
        .require(&headers, None, Scope::Admin)
        .await?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1_000);
    let after = q.after.unwrap_or(0);
    type Row = (
        i64,
        DateTime<Utc>,
        Option<String>,
        Option<String>,
        Option<Uuid>,
        i32,
        String,
        String,
        String,
    );
    let sql = "SELECT id, received_at, kind, source, data_id, line, raw, error, actor FROM quarantine \
               WHERE id > $1 ORDER BY id LIMIT $2";
    let rows: Vec<Row> = match &state.shared.db {
        Database::Postgres(pg) => {
            sqlx::query_as(sql)
                .bind(after)
                .bind(limit)
                .fetch_all(&pg.pool)
                .await
        }
        Database::Sqlite(d) => {
            sqlx::query_as(sql)
                .bind(after)
                .bind(limit)
                .fetch_all(&d.pool)
                .await
        }
    }
    .context("reading the quarantine")?;
    let next_after = rows.last().map(|r| r.0);
    let records: Vec<Value> = rows
        .into_iter()
        .map(|(id, received_at, kind, source, data_id, line, raw, error, actor)| {
            json!({"id": id, "received_at": format_time(received_at), "kind": kind, "source": source,
                   "data_id": data_id, "line": line, "raw": raw, "error": error, "actor": actor})
        })
        .collect();
    Ok(Json(
        json!({ "records": records, "next_after": next_after }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    scope: Scope,
    #[serde(default)]
    sources: Vec<String>,
    #[serde(default)]
    name: Option<String>,
}

async fn create_token(
    State(state): State<IngestState>,
    headers: HeaderMap,
    AppJson(request): AppJson<CreateToken>,
) -> ApiResult<impl IntoResponse> {
    let admin = state
        .shared
        .auth
        .require(&headers, None, Scope::Admin)
        .await?;
    if !request.sources.is_empty() && request.scope != Scope::Ingest {
        return Err(ApiError::bad_request(
            "Source patterns limit ingest tokens only; leave sources out for read and admin tokens.",
        ));
    }
    let name = request
        .name
        .unwrap_or_else(|| format!("{} token", request.scope));
    let (token, secret) =
        auth::create(&state.shared.db, request.scope, request.sources, &name).await?;
    log::append_now(
        &state.shared.db,
        vec![NewEvent::new(
            admin.actor(),
            EventBody::AdminAction {
                action: "token.created".into(),
                target: token.id.to_string(),
                detail: json!({"scope": token.scope, "sources": token.sources, "name": token.name}),
            },
        )],
    )
    .await?;
    let mut body = serde_json::to_value(&token).map_err(ApiError::internal)?;
    body["token"] = Value::String(secret);
    Ok((StatusCode::CREATED, Json(body)))
}

async fn list_tokens(
    State(state): State<IngestState>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    state
        .shared
        .auth
        .require(&headers, None, Scope::Admin)
        .await?;
    Ok(Json(
        json!({ "tokens": auth::list(&state.shared.db).await? }),
    ))
}

async fn revoke_token(
    State(state): State<IngestState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let admin = state
        .shared
        .auth
        .require(&headers, None, Scope::Admin)
        .await?;
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::bad_request(format!("{id:?} is not a token id.")))?;
    if !auth::revoke(&state.shared.db, id).await? {
        return Err(ApiError::not_found(format!("No live token has id {id}.")));
    }
    state.shared.auth.forget_all();
    log::append_now(
        &state.shared.db,
        vec![NewEvent::new(
            admin.actor(),
            EventBody::AdminAction {
                action: "token.revoked".into(),
                target: id.to_string(),
                detail: Value::Null,
            },
        )],
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
