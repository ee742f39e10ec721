//! Handlers of the ingest role: events, kinds, quarantine and tokens.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use chrono::Utc;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use scholia_events::envelope::format_time;
use scholia_events::schema::{FieldSpec, FieldType, column_name};
use scholia_events::store::{Batch, KindInfo, Quarantined};
use scholia_events::token::{self, Scope, Token};
use scholia_http::{
    Admin, ApiError, ApiResult, AppJson, AppPath, AppQuery, Ingester, Problem, Reader,
};

use crate::IngestState;
use crate::parse::{self, BodyFormat, Defaults};

pub fn router(state: IngestState) -> Router {
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

fn overloaded(state: &IngestState) -> ApiError {
    state
        .core
        .metrics
        .counter(
            "scholia_ingest_overloaded_total",
            "Batches refused because too many were in flight.",
        )
        .fetch_add(1, Ordering::Relaxed);
    ApiError::new(
        Problem::Overloaded,
        "Too many batches are being written right now; retry after the given delay.",
    )
}

async fn post_events(
    Ingester(token): Ingester,
    State(state): State<IngestState>,
    AppQuery(query): AppQuery<IngestQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<IngestResponse>> {
    let started = Instant::now();
    let format = body_format(&headers)?;
    let gzip = gzip(&headers)?;
    let limit = state.limits.max_body_bytes;
    let too_large = || {
        ApiError::new(
            Problem::TooLarge,
            format!(
                "The body is larger than {limit} bytes (SCHOLIA_MAX_BODY_BYTES); split it into smaller batches."
            ),
        )
    };
    if let Some(length) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        && length > limit
    {
        return Err(too_large());
    }
    let raw = {
        let _receiving = state
            .receiving
            .clone()
            .try_acquire_owned()
            .map_err(|_| overloaded(&state))?;
        let timeout = state.limits.body_timeout;
        tokio::time::timeout(timeout, read_body(body, limit, too_large))
            .await
            .map_err(|_| {
                ApiError::new(
                    Problem::RequestTimeout,
                    format!(
                        "The body did not arrive within {} seconds; send it faster or in smaller batches.",
                        timeout.as_secs()
                    ),
                )
            })??
    };
    let _permit = state
        .inflight
        .clone()
        .try_acquire_owned()
        .map_err(|_| overloaded(&state))?;

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
            kinds.schema(kind)
        })
        .map_err(ApiError::bad_request)
    })
    .await
    .map_err(ApiError::internal)??;

    if let Some(record) = parsed
        .records
        .iter()
        .find(|r| !token.may_write_source(&r.envelope.source))
    {
        return Err(ApiError::forbidden(format!(
            "This token may write only sources matching {}; line {} has source {:?}. Nothing in this batch was written.",
            token.sources.join(", "),
            record.line,
            record.envelope.source
        )));
    }
    let written = state
        .core
        .store
        .records
        .write(Batch {
            records: parsed.records,
            rejected: parsed.rejected,
            actor: token.actor(),
            received_at,
            schemas: parsed.schemas,
        })
        .await?;
    for (kind, schema) in written.schemas {
        state.kinds.remember(&kind, schema);
    }

    let m = &state.core.metrics;
    m.counter(
        "scholia_ingest_records_accepted_total",
        "Records durably stored.",
    )
    .fetch_add(written.accepted, Ordering::Relaxed);
    m.counter(
        "scholia_ingest_records_duplicate_total",
        "Records already stored with the same content.",
    )
    .fetch_add(written.duplicates, Ordering::Relaxed);
    m.counter(
        "scholia_ingest_records_quarantined_total",
        "Records quarantined.",
    )
    .fetch_add(written.quarantined.len() as u64, Ordering::Relaxed);
    m.counter("scholia_ingest_batches_total", "Batches committed.")
        .fetch_add(1, Ordering::Relaxed);
    m.histogram(
        "scholia_ingest_batch_seconds",
        "Time from request to durable commit.",
    )
    .observe(started.elapsed().as_secs_f64());

    let quarantined = written.quarantined.len() as u64;
    let errors = written
        .quarantined
        .into_iter()
        .take(MAX_LISTED_ERRORS)
        .map(|r| LineError {
            line: r.line,
            error: r.error,
        })
        .collect();
    Ok(Json(IngestResponse {
        accepted: written.accepted,
        duplicates: written.duplicates,
        quarantined,
        errors,
    }))
}

async fn read_body(
    body: Body,
    limit: usize,
    too_large: impl Fn() -> ApiError,
) -> ApiResult<Vec<u8>> {
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
    Ok(raw)
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
        Some(other) => Err(ApiError::new(
            Problem::UnsupportedMediaType,
            format!(
                "Content-Type {other:?} is not accepted; send application/json (one envelope or an array) or application/x-ndjson (one envelope per line)."
            ),
        )),
        None => Err(ApiError::new(
            Problem::UnsupportedMediaType,
            "Set Content-Type to application/json (one envelope or an array) or application/x-ndjson (one envelope per line).",
        )),
    }
}

fn gzip(headers: &HeaderMap) -> ApiResult<bool> {
    match headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
    {
        None => Ok(false),
        Some(e) if e == "identity" => Ok(false),
        Some(e) if e == "gzip" => Ok(true),
        Some(e) => Err(ApiError::new(
            Problem::UnsupportedMediaType,
            format!(
                "Content-Encoding {e:?} is not supported; send the body plain or gzip-compressed."
            ),
        )),
    }
}

/// Inflate every member of a gzip body (`cat a.gz b.gz` is one valid gzip file), within
/// the body limit.
fn inflate(compressed: &[u8], limit: usize) -> ApiResult<Vec<u8>> {
    let mut out = Vec::new();
    let mut reader = flate2::read::MultiGzDecoder::new(compressed).take(limit as u64 + 1);
    reader
        .read_to_end(&mut out)
        .map_err(|e| ApiError::bad_request(format!("The body is not valid gzip ({e}).")))?;
    if out.len() > limit {
        return Err(ApiError::new(
            Problem::TooLarge,
            format!(
                "The body inflates to more than {limit} bytes (SCHOLIA_MAX_BODY_BYTES); split it into smaller batches."
            ),
        ));
    }
    Ok(out)
}

fn parse_uuid(text: &str, what: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(text)
        .map_err(|_| ApiError::bad_request(format!("{text:?} is not {what}; it is a UUID.")))
}

#[derive(Serialize)]
struct StoredRecord {
    data_id: Uuid,
    kind: String,
    source: String,
    created: String,
    data: serde_json::Map<String, serde_json::Value>,
    received_at: String,
    seq: i64,
}

async fn get_event(
    Reader(_): Reader,
    State(state): State<IngestState>,
    AppPath(data_id): AppPath<String>,
) -> ApiResult<Json<StoredRecord>> {
    let data_id = parse_uuid(&data_id, "a data id")?;
    let stored = state
        .core
        .store
        .records
        .get(data_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("No record has data_id {data_id}.")))?;
    Ok(Json(StoredRecord {
        data_id,
        kind: stored.envelope.kind,
        source: stored.envelope.source,
        created: format_time(stored.envelope.created),
        data: stored.envelope.data,
        received_at: format_time(stored.received_at),
        seq: stored.seq,
    }))
}

/// A field of a kind, as `GET /v1/kinds` shows it.
#[derive(Serialize)]
struct FieldView {
    #[serde(flatten)]
    spec: FieldSpec,
    /// The column it becomes in an analysis' input.
    column: String,
}

#[derive(Serialize)]
struct KindView {
    kind: String,
    fields: BTreeMap<String, FieldView>,
    updated_at: String,
}

impl From<KindInfo> for KindView {
    fn from(info: KindInfo) -> Self {
        KindView {
            fields: info
                .schema
                .fields
                .into_iter()
                .map(|(name, spec)| {
                    let column = column_name(&name);
                    (name, FieldView { spec, column })
                })
                .collect(),
            kind: info.kind,
            updated_at: format_time(info.updated_at),
        }
    }
}

#[derive(Serialize)]
struct KindList {
    kinds: Vec<KindView>,
}

async fn list_kinds(
    Reader(_): Reader,
    State(state): State<IngestState>,
) -> ApiResult<Json<KindList>> {
    let kinds = state.core.store.kinds.list().await?;
    Ok(Json(KindList {
        kinds: kinds.into_iter().map(KindView::from).collect(),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KindDeclaration {
    fields: BTreeMap<String, FieldType>,
}

async fn put_kind(
    Admin(token): Admin,
    State(state): State<IngestState>,
    AppPath(kind): AppPath<String>,
    AppJson(declaration): AppJson<KindDeclaration>,
) -> ApiResult<Json<KindView>> {
    if kind.is_empty() || kind.len() > 200 || kind.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "A kind name must be 1 to 200 characters long, without control characters.",
        ));
    }
    if let Some(name) = declaration
        .fields
        .keys()
        .find(|name| name.is_empty() || name.len() > 256 || name.chars().any(char::is_control))
    {
        return Err(ApiError::bad_request(format!(
            "Field name {name:?} must be 1 to 256 characters long, without control characters."
        )));
    }
    let info = state
        .core
        .store
        .kinds
        .declare(&kind, &declaration.fields, &token.actor())
        .await?;
    state.kinds.remember(&kind, info.schema.clone());
    Ok(Json(KindView::from(info)))
}

#[derive(Debug, Deserialize)]
struct QuarantineQuery {
    /// Oldest first, after this id.
    after: Option<i64>,
    /// Newest first, before this id (the default, from the newest).
    before: Option<i64>,
    limit: Option<i64>,
}

#[derive(Serialize)]
struct QuarantinePage {
    records: Vec<QuarantineView>,
    /// Pass as `after` (oldest-first pages) or `before` (newest-first pages) for the next.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_before: Option<i64>,
}

#[derive(Serialize)]
struct QuarantineView {
    #[serde(flatten)]
    record: Quarantined,
}

async fn list_quarantine(
    Admin(_): Admin,
    State(state): State<IngestState>,
    AppQuery(q): AppQuery<QuarantineQuery>,
) -> ApiResult<Json<QuarantinePage>> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1_000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be from 1 to 1000."));
    }
    let store = &state.core.store.quarantine;
    let (records, next_after, next_before) = match q.after {
        Some(after) => {
            let records = store.list_after(after, limit as usize).await?;
            let next = records.last().map(|r| r.id);
            (records, next, None)
        }
        None => {
            let records = store.list(q.before, limit as usize).await?;
            let next = records.last().map(|r| r.id);
            (records, None, next)
        }
    };
    Ok(Json(QuarantinePage {
        records: records
            .into_iter()
            .map(|record| QuarantineView { record })
            .collect(),
        next_after,
        next_before,
    }))
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

#[derive(Serialize)]
struct CreatedToken {
    #[serde(flatten)]
    token: Token,
    /// The secret: shown this once, never stored.
    #[serde(rename = "token")]
    secret: String,
}

async fn create_token(
    Admin(admin): Admin,
    State(state): State<IngestState>,
    AppJson(request): AppJson<CreateToken>,
) -> ApiResult<impl IntoResponse> {
    if !request.sources.is_empty() && request.scope != Scope::Ingest {
        return Err(ApiError::bad_request(
            "Source patterns limit ingest tokens only; leave sources out for read and admin tokens.",
        ));
    }
    if request
        .sources
        .iter()
        .any(|s| s.is_empty() || s.len() > 200)
    {
        return Err(ApiError::bad_request(
            "A source pattern must be 1 to 200 characters long.",
        ));
    }
    let name = request
        .name
        .unwrap_or_else(|| format!("{} token", request.scope));
    if name.len() > 200 {
        return Err(ApiError::bad_request(
            "A token's name must be at most 200 characters long.",
        ));
    }
    let secret = token::new_secret();
    let token = state
        .core
        .store
        .tokens
        .create(
            request.scope,
            request.sources,
            &name,
            &token::hash_secret(&secret),
            Some(&admin.actor()),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(CreatedToken { token, secret })))
}

#[derive(Serialize)]
struct TokenList {
    tokens: Vec<Token>,
}

async fn list_tokens(
    Admin(_): Admin,
    State(state): State<IngestState>,
) -> ApiResult<Json<TokenList>> {
    Ok(Json(TokenList {
        tokens: state.core.store.tokens.list().await?,
    }))
}

async fn revoke_token(
    Admin(admin): Admin,
    State(state): State<IngestState>,
    AppPath(id): AppPath<String>,
) -> ApiResult<StatusCode> {
    let id = parse_uuid(&id, "a token id")?;
    if !state.core.store.tokens.revoke(id, &admin.actor()).await? {
        return Err(ApiError::not_found(format!("No live token has id {id}.")));
    }
    state.core.auth.forget_all();
    Ok(StatusCode::NO_CONTENT)
}
