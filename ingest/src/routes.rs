//! Handlers of the ingest role: events, kinds, quarantine and tokens, and their part of
//! the OpenAPI document ([`IngestState::openapi`]).

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
use utoipa::openapi::schema::{
    AnyOfBuilder, ArrayBuilder, ObjectBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{IntoParams, OpenApi, PartialSchema, ToSchema};
use uuid::Uuid;

use scholia_events::envelope::format_time;
use scholia_events::schema::{FieldSpec, FieldType, MAX_FIELDS, column_name};
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

#[derive(OpenApi)]
#[openapi(
    paths(
        post_events,
        get_event,
        list_kinds,
        put_kind,
        list_quarantine,
        create_token,
        list_tokens,
        revoke_token
    ),
    tags(
        (name = "events", description = "Records in: one envelope, a JSON array or NDJSON; answered once durably committed."),
        (name = "kinds", description = "Kinds of records and the types of their fields."),
        (name = "quarantine", description = "Records that were refused, with their raw text and why."),
        (name = "tokens", description = "Bearer tokens: create (the secret is shown once), list, revoke.")
    )
)]
struct IngestDoc;

impl IngestState {
    /// The OpenAPI document of the ingest role's endpoints.
    pub fn openapi() -> utoipa::openapi::OpenApi {
        IngestDoc::openapi()
    }
}

/// Defaults for envelopes that leave these fields out.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct IngestQuery {
    /// The kind of envelopes that do not name one.
    kind: Option<String>,
    /// The source of envelopes that do not name one.
    source: Option<String>,
}

/// One record as a producer sends it. `kind` and `source` may be left out when the query
/// string gives them.
// Only a schema: `parse.rs` reads envelopes item by item, so that a bad one is quarantined
// rather than refused. `Deserialize` carries `deny_unknown_fields` into the schema.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct ProducerEnvelope {
    /// The record's id; leave it out to have a time-ordered one assigned. Sending a record
    /// again with the same id and content is a duplicate, with other content a conflict.
    data_id: Option<Uuid>,
    /// What the record is (1 to 200 characters, no control characters).
    #[schema(example = "generation")]
    kind: Option<String>,
    /// Where it comes from (1 to 200 characters, no control characters).
    #[schema(example = "generator-10")]
    source: Option<String>,
    /// Event time, RFC 3339, from year 1 to 9999; defaults to the time it is received.
    #[schema(value_type = Option<String>, format = DateTime)]
    created: Option<String>,
    /// The measurements: field names of 1 to 256 characters, values of the types the kind
    /// declares or learned from its first records.
    #[schema(value_type = Object, example = json!({"output_mw": 12.5}))]
    data: serde_json::Map<String, serde_json::Value>,
}

/// The JSON body of `POST /v1/events`.
struct EventsBody;

impl PartialSchema for EventsBody {
    fn schema() -> RefOr<Schema> {
        let envelope = || Ref::from_schema_name(ProducerEnvelope::name());
        let anything_else = SchemaType::Array(vec![
            Type::Object,
            Type::String,
            Type::Number,
            Type::Boolean,
            Type::Null,
        ]);
        AnyOfBuilder::new()
            .description(Some(
                "One envelope, or an array of them. Each item is judged on its own: one that is not a valid envelope is quarantined and listed in `errors`, and the others are written; so any other JSON value is taken too, but for an empty array.",
            ))
            .item(envelope())
            .item(ArrayBuilder::new().items(envelope()).min_items(Some(1)))
            .item(
                ObjectBuilder::new()
                    .schema_type(anything_else)
                    .description(Some("Not an envelope: quarantined.")),
            )
            .item(
                ArrayBuilder::new()
                    .items(ObjectBuilder::new().schema_type(SchemaType::AnyValue))
                    .min_items(Some(1))
                    .description(Some(
                        "Items that are not envelopes are quarantined, the others written.",
                    )),
            )
            .into()
    }
}

impl ToSchema for EventsBody {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((
            ProducerEnvelope::name().into_owned(),
            ProducerEnvelope::schema(),
        ));
    }
}

/// A line (or array item) that was quarantined.
#[derive(Debug, Serialize, ToSchema)]
struct LineError {
    /// The line of the body (or item of the array), from 1.
    #[schema(minimum = 1)]
    line: usize,
    error: String,
}

/// What became of a batch.
#[derive(Debug, Serialize, ToSchema)]
struct IngestResponse {
    /// Records written.
    accepted: u64,
    /// Records already stored with the same content.
    duplicates: u64,
    /// Records quarantined.
    quarantined: u64,
    /// Why each quarantined record was refused (the first 1,000; all are in the quarantine).
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

/// Ingest records.
///
/// The body is one envelope, a JSON array, or NDJSON (one envelope per line), plain or with
/// `Content-Encoding: gzip` (within the same size limit once inflated). Answers once the
/// batch is durably committed; records that are not valid are quarantined, and the others
/// written.
#[utoipa::path(
    post,
    path = "/v1/events",
    tag = "events",
    security(("bearer" = [])),
    params(IngestQuery),
    request_body(
        description = "One envelope, a JSON array of them, or NDJSON (one envelope per line, as in `{\"kind\":\"generation\",\"source\":\"g1\",\"data\":{\"output_mw\":1.5}}`); optionally gzip-compressed (`Content-Encoding: gzip`).",
        content(
            (EventsBody = "application/json"),
            (String = "application/x-ndjson")
        )
    ),
    responses(
        (status = 200, description = "The batch is committed: what was written, what was a duplicate, and what was quarantined.", body = IngestResponse),
        (status = 400, description = "Nothing in the body is JSON, or it is not valid gzip.", body = scholia_http::ProblemBody, content_type = "application/problem+json"),
        (status = 408, description = "The body did not arrive in time.", body = scholia_http::ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "The body (or what it inflates to) is larger than `SCHOLIA_MAX_BODY_BYTES`.", body = scholia_http::ProblemBody, content_type = "application/problem+json"),
        (status = 415, description = "The Content-Type is not JSON or NDJSON, or the Content-Encoding is not gzip.", body = scholia_http::ProblemBody, content_type = "application/problem+json")
    )
)]
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

/// A stored record.
#[derive(Serialize, ToSchema)]
struct StoredRecord {
    data_id: Uuid,
    kind: String,
    source: String,
    #[schema(format = DateTime)]
    created: String,
    #[schema(value_type = Object)]
    data: serde_json::Map<String, serde_json::Value>,
    /// When it was committed.
    #[schema(format = DateTime)]
    received_at: String,
    /// The log sequence of the `source.ingested` event that brought it in.
    seq: i64,
}

/// A stored record, by its id.
#[utoipa::path(
    get,
    path = "/v1/events/{data_id}",
    tag = "events",
    security(("bearer" = [])),
    params(("data_id" = Uuid, Path, description = "The record's id.")),
    responses((status = 200, description = "The record, with when it was received and its log sequence.", body = StoredRecord))
)]
async fn get_event(
    Reader(_reader): Reader,
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
#[derive(Serialize, ToSchema)]
struct FieldView {
    #[serde(flatten)]
    spec: FieldSpec,
    /// The column it becomes in an analysis' input.
    column: String,
}

/// A kind and its fields, by name.
#[derive(Serialize, ToSchema)]
struct KindView {
    kind: String,
    fields: BTreeMap<String, FieldView>,
    #[schema(format = DateTime)]
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

#[derive(Serialize, ToSchema)]
struct KindList {
    kinds: Vec<KindView>,
}

/// Every kind with its fields' types.
///
/// Types are declared, or learned from a kind's first records.
#[utoipa::path(
    get,
    path = "/v1/kinds",
    tag = "kinds",
    security(("bearer" = [])),
    responses((status = 200, description = "The kinds.", body = KindList))
)]
async fn list_kinds(
    Reader(_reader): Reader,
    State(state): State<IngestState>,
) -> ApiResult<Json<KindList>> {
    let kinds = state.core.store.kinds.list().await?;
    Ok(Json(KindList {
        kinds: kinds.into_iter().map(KindView::from).collect(),
    }))
}

/// The declared types of a kind's fields, by field name.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"fields": {"output_mw": "float"}}))]
struct KindDeclaration {
    /// Field names are 1 to 256 characters, without control characters; a kind has at
    /// most 1,000 fields, learned and declared together.
    fields: BTreeMap<String, FieldType>,
}

/// Declare the types of a kind's fields.
///
/// Records whose fields have other types are quarantined from then on.
#[utoipa::path(
    put,
    path = "/v1/kinds/{kind}",
    tag = "kinds",
    security(("bearer" = [])),
    params(("kind" = String, Path, min_length = 1, max_length = 200, pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$", description = "The kind: 1 to 200 characters, without control characters.", example = "generation")),
    request_body = KindDeclaration,
    responses((status = 200, description = "The kind as it is now.", body = KindView))
)]
async fn put_kind(
    Admin(token): Admin,
    State(state): State<IngestState>,
    AppPath(kind): AppPath<String>,
    AppJson(declaration): AppJson<KindDeclaration>,
) -> ApiResult<Json<KindView>> {
    if kind.is_empty() || kind.len() > 200 || kind.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "A kind name must be 1 to 200 characters long, without control characters.",
        ));
    }
    if let Some(name) = declaration
        .fields
        .keys()
        .find(|name| name.is_empty() || name.len() > 256 || name.chars().any(char::is_control))
    {
        return Err(ApiError::invalid(format!(
            "Field name {name:?} must be 1 to 256 characters long, without control characters."
        )));
    }
    let fields = state
        .kinds
        .schema(&kind)
        .fields_with(declaration.fields.keys());
    if fields > MAX_FIELDS {
        return Err(ApiError::invalid(format!(
            "This declaration would give kind {kind:?} {fields} fields, more than the {MAX_FIELDS} a kind may have. Declare fewer fields, or put related values in one field of type json."
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

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct QuarantineQuery {
    /// Oldest first, after this id.
    after: Option<i64>,
    /// Newest first, before this id (the default, from the newest).
    before: Option<i64>,
    /// How many records, from 1 to 1000 (100 when left out).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// A page of the quarantine.
#[derive(Serialize, ToSchema)]
struct QuarantinePage {
    records: Vec<Quarantined>,
    /// Pass as `after` for the next page (oldest-first pages).
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after: Option<i64>,
    /// Pass as `before` for the next page (newest-first pages).
    #[serde(skip_serializing_if = "Option::is_none")]
    next_before: Option<i64>,
}

/// Quarantined records.
///
/// Newest first (before `before`), or oldest first after `after`.
#[utoipa::path(
    get,
    path = "/v1/quarantine",
    tag = "quarantine",
    security(("bearer" = [])),
    params(QuarantineQuery),
    responses((status = 200, description = "A page of records.", body = QuarantinePage))
)]
async fn list_quarantine(
    Admin(_admin): Admin,
    State(state): State<IngestState>,
    AppQuery(q): AppQuery<QuarantineQuery>,
) -> ApiResult<Json<QuarantinePage>> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1_000).contains(&limit) {
        return Err(ApiError::bad_request(
            "Give limit as a number from 1 to 1000.",
        ));
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
        records,
        next_after,
        next_before,
    }))
}

/// A token to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"scope": "ingest", "sources": ["generator-*"]}))]
struct CreateToken {
    scope: Scope,
    /// For ingest tokens only: the sources it may write, as patterns where `*` matches any
    /// run of characters and `?` one (1 to 200 characters each); none means any source.
    #[serde(default)]
    sources: Vec<String>,
    /// What it is for, at most 200 characters (default: "<scope> token").
    #[serde(default)]
    name: Option<String>,
}

/// A new token, with its secret.
#[derive(Serialize, ToSchema)]
struct CreatedToken {
    #[serde(flatten)]
    token: Token,
    /// The secret: shown this once, never stored.
    #[serde(rename = "token")]
    secret: String,
}

/// Create a token; its secret is in this answer only.
#[utoipa::path(
    post,
    path = "/v1/tokens",
    tag = "tokens",
    security(("bearer" = [])),
    request_body = CreateToken,
    responses((status = 201, description = "The token, with its secret.", body = CreatedToken))
)]
async fn create_token(
    Admin(admin): Admin,
    State(state): State<IngestState>,
    AppJson(request): AppJson<CreateToken>,
) -> ApiResult<impl IntoResponse> {
    if !request.sources.is_empty() && request.scope != Scope::Ingest {
        return Err(ApiError::invalid(
            "Source patterns limit ingest tokens only; leave sources out for read and admin tokens.",
        ));
    }
    if request
        .sources
        .iter()
        .any(|s| s.is_empty() || s.len() > 200)
    {
        return Err(ApiError::invalid(
            "A source pattern must be 1 to 200 characters long.",
        ));
    }
    let name = request
        .name
        .unwrap_or_else(|| format!("{} token", request.scope));
    if name.len() > 200 {
        return Err(ApiError::invalid(
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

#[derive(Serialize, ToSchema)]
struct TokenList {
    tokens: Vec<Token>,
}

/// Every live token, without secrets.
#[utoipa::path(
    get,
    path = "/v1/tokens",
    tag = "tokens",
    security(("bearer" = [])),
    responses((status = 200, description = "The tokens.", body = TokenList))
)]
async fn list_tokens(
    Admin(_admin): Admin,
    State(state): State<IngestState>,
) -> ApiResult<Json<TokenList>> {
    Ok(Json(TokenList {
        tokens: state.core.store.tokens.list().await?,
    }))
}

/// Revoke a token.
///
/// It stops working at once in this process, and within seconds in others. A token cannot
/// revoke itself.
#[utoipa::path(
    delete,
    path = "/v1/tokens/{id}",
    tag = "tokens",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The token's id.")),
    responses(
        (status = 204, description = "Revoked."),
        (status = 409, description = "The token is the one making the request; a token cannot revoke itself.", body = scholia_http::ProblemBody, content_type = "application/problem+json")
    )
)]
async fn revoke_token(
    Admin(admin): Admin,
    State(state): State<IngestState>,
    AppPath(id): AppPath<String>,
) -> ApiResult<StatusCode> {
    let id = parse_uuid(&id, "a token id")?;
    if id == admin.id {
        // Revoking the only admin token would leave nobody able to administer.
        return Err(ApiError::conflict(
            "A token cannot revoke itself; revoke it with another admin token.",
        ));
    }
    if !state.core.store.tokens.revoke(id, &admin.actor()).await? {
        return Err(ApiError::not_found(format!("No live token has id {id}.")));
    }
    state.core.auth.forget_all();
    Ok(StatusCode::NO_CONTENT)
}
