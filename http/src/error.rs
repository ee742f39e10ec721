//! One error type for every endpoint, rendered as `application/problem+json` (RFC 9457)
//! with a stable `code` and a `detail` that tells the caller what to do. [`Problem`] is the
//! one table from a kind of error to its status, code and retry advice. The cause of a
//! 5xx never reaches the client; it travels in the response's extensions to the logging
//! middleware ([`crate::log_failures`]), which logs it once.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use scholia_events::partition::parse_instant;
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;

/// What went wrong, as a client can act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    RequestTimeout,
    Conflict,
    TooLarge,
    UnsupportedMediaType,
    Invalid,
    TooManyRequests,
    /// This process is at its limit; retry after the delay.
    Overloaded,
    /// A backing service (database, bus) is unreachable; retry after the delay.
    Unavailable,
    Internal,
}

impl Problem {
    /// The one table: status, stable code, and the `Retry-After` seconds, if any.
    pub fn describe(self) -> (StatusCode, &'static str, Option<u64>) {
        match self {
            Problem::BadRequest => (StatusCode::BAD_REQUEST, "bad_request", None),
            Problem::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", None),
            Problem::Forbidden => (StatusCode::FORBIDDEN, "forbidden", None),
            Problem::NotFound => (StatusCode::NOT_FOUND, "not_found", None),
            Problem::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout", None),
            Problem::Conflict => (StatusCode::CONFLICT, "conflict", None),
            Problem::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too_large", None),
            Problem::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                None,
            ),
            Problem::Invalid => (StatusCode::UNPROCESSABLE_ENTITY, "invalid", None),
            Problem::TooManyRequests => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_requests", Some(1))
            }
            Problem::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded", Some(1)),
            Problem::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", Some(2)),
            Problem::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal", None),
        }
    }
}

/// An error answered to a client.
#[derive(Debug)]
pub struct ApiError {
    pub problem: Problem,
    pub detail: String,
    /// What really happened, for the log only (5xx).
    cause: Option<String>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(problem: Problem, detail: impl Into<String>) -> Self {
        ApiError {
            problem,
            detail: detail.into(),
            cause: None,
        }
    }
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(Problem::BadRequest, detail)
    }
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(Problem::Unauthorized, detail)
    }
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(Problem::Forbidden, detail)
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(Problem::NotFound, detail)
    }
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(Problem::Conflict, detail)
    }
    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(Problem::Invalid, detail)
    }

    /// An unexpected failure: the client learns only that it happened.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        ApiError {
            problem: Problem::Internal,
            detail: "The server failed to handle this request; the cause is in its log. Retrying may help.".into(),
            cause: Some(cause.to_string()),
        }
    }
}

/// Parse `from` and `to` (both required) of a half-open range. A bound that is missing or
/// is not a date is malformed (400); a date outside the accepted years, or a range that is
/// empty, is well-formed but wrong (422).
pub fn parse_range(
    from: Option<&str>,
    to: Option<&str>,
) -> ApiResult<(DateTime<Utc>, DateTime<Utc>)> {
    let from = from.ok_or_else(|| {
        ApiError::bad_request("Give the range start as from=YYYY-MM-DD (or an RFC 3339 time).")
    })?;
    let to = to.ok_or_else(|| {
        ApiError::bad_request(
            "Give the range end as to=YYYY-MM-DD (or an RFC 3339 time); ranges are half-open.",
        )
    })?;
    let from = range_bound(from)?;
    let to = range_bound(to)?;
    if to <= from {
        return Err(ApiError::invalid(
            "The range is empty: \"to\" must come after \"from\" (ranges are half-open).",
        ));
    }
    Ok((from, to))
}

fn range_bound(text: &str) -> ApiResult<DateTime<Utc>> {
    parse_instant(text).map_err(|e| {
        let well_formed = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").is_ok()
            || DateTime::parse_from_rfc3339(text).is_ok();
        if well_formed {
            ApiError::invalid(sentence(&e))
        } else {
            ApiError::bad_request(sentence(&e))
        }
    })
}

/// A sentence of an error message: capitalized, with a full stop.
pub fn sentence(text: &str) -> String {
    let mut chars = text.chars();
    let mut out: String = chars
        .next()
        .map(|c| c.to_uppercase().collect())
        .unwrap_or_default();
    out.push_str(chars.as_str());
    if !out.ends_with(['.', '?', '!']) {
        out.push('.');
    }
    out
}

impl From<scholia_events::Error> for ApiError {
    fn from(error: scholia_events::Error) -> Self {
        use scholia_events::Error as E;
        match error {
            E::Unavailable { what, detail } => ApiError {
                problem: Problem::Unavailable,
                detail: format!(
                    "{} is unreachable right now; nothing was changed. Retry shortly.",
                    sentence(what).trim_end_matches('.')
                ),
                cause: Some(detail),
            },
            E::Invalid(detail) => ApiError::invalid(sentence(&detail)),
            E::NotFound(detail) => ApiError::not_found(sentence(&detail)),
            E::Conflict(detail) => ApiError::conflict(sentence(&detail)),
            error @ E::Internal { .. } => ApiError::internal(error),
        }
    }
}

/// The body of every error response (RFC 9457).
#[derive(Debug, Serialize, ToSchema)]
pub struct ProblemBody {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    #[schema(format = "uri")]
    pub kind: String,
    /// The status' reason phrase.
    pub title: String,
    /// The HTTP status.
    #[schema(minimum = 400, maximum = 599)]
    pub status: u16,
    /// A stable machine-readable code: `bad_request`, `unauthorized`, `invalid`, …
    #[schema(schema_with = crate::openapi::problem_code)]
    pub code: String,
    /// What happened and what to do, in a sentence or two.
    pub detail: String,
}

/// The cause of a 5xx, for [`crate::log_failures`].
#[derive(Debug, Clone)]
pub(crate) struct Cause(pub(crate) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, retry_after) = self.problem.describe();
        let body = ProblemBody {
            kind: format!("https://scholia.dev/problems/{code}"),
            title: status.canonical_reason().unwrap_or("Error").to_string(),
            status: status.as_u16(),
            code: code.to_string(),
            detail: self.detail,
        };
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::PAYLOAD_TOO_LARGE || status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body was not read: the connection cannot carry another request.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(seconds) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(cause) = self.cause {
            response.extensions_mut().insert(Cause(cause));
        }
        response
    }
}

/// `Json` whose rejections come back as problems with a useful detail.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct AppJson<T>(pub T);

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                Problem::UnsupportedMediaType,
                "Send this body as JSON with the header Content-Type: application/json.",
            ),
            JsonRejection::JsonSyntaxError(e) => {
                ApiError::bad_request(format!("The body is not valid JSON: {}", e.body_text()))
            }
            JsonRejection::JsonDataError(e) => ApiError::invalid(format!(
                "The JSON does not have the expected shape: {}",
                e.body_text()
            )),
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::new(
                    Problem::TooLarge,
                    "The body is larger than this endpoint accepts (2 MiB); send a smaller one.",
                )
            }
            JsonRejection::BytesRejection(e) => {
                ApiError::bad_request(format!("The body could not be read: {}", e.body_text()))
            }
            other => ApiError::bad_request(other.body_text()),
        }
    }
}

impl<T: Serialize> IntoResponse for AppJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `Query` whose rejections come back as problems.
pub struct AppQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for AppQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    /// A well-formed query is read directly; only a rejected one goes through axum's
    /// `Query`, which tracks the path to the bad field for its message (an allocation per
    /// parameter, a few percent of a cached read's time).
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        match serde_urlencoded::from_str(query) {
            Ok(value) => Ok(AppQuery(value)),
            Err(_) => axum::extract::Query::try_from_uri(&parts.uri)
                .map(|axum::extract::Query(value)| AppQuery(value))
                .map_err(ApiError::from),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::bad_request(format!(
            "The query string is not right: {}",
            rejection.body_text()
        ))
    }
}

/// `Path` whose rejections come back as problems.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct AppPath<T>(pub T);

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::bad_request(format!("The path is not right: {}", rejection.body_text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unavailable_store_is_a_503_with_retry_after_and_no_cause_in_the_body() {
        let error: ApiError =
            scholia_events::Error::unavailable("the database", "connection refused").into();
        let response = error.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert!(response.extensions().get::<Cause>().is_some());
    }

    #[test]
    fn details_are_sentences() {
        assert_eq!(
            sentence("no analysis is named \"x\""),
            "No analysis is named \"x\"."
        );
        assert_eq!(sentence("Done."), "Done.");
    }
}
