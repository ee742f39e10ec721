//! What every part of the OpenAPI document shares: the security schemes, the problem
//! responses (added to every operation in one place, [`add_problems`], from what the
//! operation reads: its token, parameters and body), the schema of a range bound, and the
//! document of the endpoints every process serves ([`common`]).

use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{AnyOfBuilder, KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, HeaderBuilder, OpenApi, Ref, RefOr, Required, ResponseBuilder, Schema,
};
use utoipa::{OpenApi as _, PartialSchema, ToSchema};

use crate::error::{Problem, ProblemBody};

/// The security scheme of `Authorization: Bearer <token>`.
pub const BEARER: &str = "bearer";
/// The security scheme of `?token=`, which only the websocket accepts.
pub const QUERY_TOKEN: &str = "query_token";
/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The security schemes operations name.
pub fn security_schemes() -> Vec<(&'static str, SecurityScheme)> {
    vec![
        (
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token's secret: `Authorization: Bearer <token>`. Scopes are ingest, read and admin (admin implies the others); `SCHOLIA_ADMIN_TOKEN` bootstraps an admin token, and admins create others with `POST /v1/tokens`.",
                    ))
                    .build(),
            ),
        ),
        (
            QUERY_TOKEN,
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "token",
                "A token's secret as `?token=`, for browsers' websockets, which cannot set headers.",
            ))),
        ),
    ]
}

/// A bound of a half-open range: a UTC day (`2024-05-05`, meaning its midnight) or an RFC
/// 3339 time, from year 1 to 9999.
pub fn instant() -> Schema {
    AnyOfBuilder::new()
        .description(Some(
            "A UTC date (YYYY-MM-DD, its midnight) or an RFC 3339 time, from 0001-01-01 to 9999-12-31.",
        ))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Date))),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))),
        )
        .examples(["2024-05-05"])
        .into()
}

/// A required query parameter that is a range bound ([`instant`]).
pub fn instant_parameter(name: &str, description: &str) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Query)
        .required(Required::True)
        .description(Some(description))
        .schema(Some(instant()))
        .build()
}

/// The stable codes of [`Problem`], in the order of its table.
const PROBLEMS: [Problem; 13] = [
    Problem::BadRequest,
    Problem::Unauthorized,
    Problem::Forbidden,
    Problem::NotFound,
    Problem::RequestTimeout,
    Problem::Conflict,
    Problem::TooLarge,
    Problem::UnsupportedMediaType,
    Problem::Invalid,
    Problem::TooManyRequests,
    Problem::Overloaded,
    Problem::Unavailable,
    Problem::Internal,
];

/// Does not compile when a kind of problem is missing from [`PROBLEMS`]: add it there too.
const _: fn(Problem) = |problem| match problem {
    Problem::BadRequest
    | Problem::Unauthorized
    | Problem::Forbidden
    | Problem::NotFound
    | Problem::RequestTimeout
    | Problem::Conflict
    | Problem::TooLarge
    | Problem::UnsupportedMediaType
    | Problem::Invalid
    | Problem::TooManyRequests
    | Problem::Overloaded
    | Problem::Unavailable
    | Problem::Internal => {}
};

/// The schema of [`ProblemBody::code`]: one of the codes of the table.
pub(crate) fn problem_code() -> Schema {
    let codes: Vec<&str> = PROBLEMS.iter().map(|p| p.describe().1).collect();
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(codes))
        .description(Some("A stable machine-readable code."))
        .into()
}

/// An error response of the document: its component name, the problem (whose status and
/// retry advice come from [`Problem::describe`]), and what it means.
struct ProblemResponse {
    name: &'static str,
    problem: Problem,
    description: &'static str,
}

impl ProblemResponse {
    fn status(&self) -> String {
        self.problem.describe().0.as_u16().to_string()
    }
}

const fn problem(
    name: &'static str,
    problem: Problem,
    description: &'static str,
) -> ProblemResponse {
    ProblemResponse {
        name,
        problem,
        description,
    }
}

const BAD_REQUEST: ProblemResponse = problem(
    "BadRequest",
    Problem::BadRequest,
    "Malformed: a parameter or the body cannot be read as the operation documents it; `detail` names what.",
);
const UNAUTHORIZED: ProblemResponse = problem(
    "Unauthorized",
    Problem::Unauthorized,
    "No token was sent, or it is unknown or revoked.",
);
const FORBIDDEN: ProblemResponse = problem(
    "Forbidden",
    Problem::Forbidden,
    "The token does not have the scope this operation needs (or may not write this source).",
);
const NOT_FOUND: ProblemResponse = problem(
    "NotFound",
    Problem::NotFound,
    "What the request names does not exist.",
);
const CONFLICT: ProblemResponse = problem(
    "Conflict",
    Problem::Conflict,
    "The change conflicts with what is stored (a built-in analysis, an immutable record, a changed state).",
);
const TOO_LARGE: ProblemResponse = problem(
    "TooLarge",
    Problem::TooLarge,
    "The body is larger than the server accepts; split it.",
);
const UNSUPPORTED_MEDIA_TYPE: ProblemResponse = problem(
    "UnsupportedMediaType",
    Problem::UnsupportedMediaType,
    "The body's Content-Type (or Content-Encoding) is not one the operation reads.",
);
const INVALID: ProblemResponse = problem(
    "Invalid",
    Problem::Invalid,
    "Well-formed, but its meaning is wrong: a value out of range, SQL that does not compile, a cron that does not parse, an empty range; `detail` says what.",
);
const INTERNAL: ProblemResponse = problem(
    "Internal",
    Problem::Internal,
    "The server failed; the cause is in its log, never in the body.",
);
const UNAVAILABLE: ProblemResponse = problem(
    "Unavailable",
    Problem::Unavailable,
    "The database or the bus is unreachable, or the server is at its limit (`overloaded`); retry after `Retry-After` seconds.",
);

const ALL_RESPONSES: [&ProblemResponse; 10] = [
    &BAD_REQUEST,
    &UNAUTHORIZED,
    &FORBIDDEN,
    &NOT_FOUND,
    &CONFLICT,
    &TOO_LARGE,
    &UNSUPPORTED_MEDIA_TYPE,
    &INVALID,
    &INTERNAL,
    &UNAVAILABLE,
];

fn response_component(problem: &ProblemResponse) -> utoipa::openapi::Response {
    let content = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name(ProblemBody::name())))
        .build();
    let mut response = ResponseBuilder::new()
        .description(problem.description)
        .content(PROBLEM_JSON, content);
    if problem.problem.describe().2.is_some() {
        response = response.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(1)),
                ))
                .description(Some("Seconds to wait before retrying."))
                .build(),
        );
    }
    response.build()
}

/// Add the problem responses every operation can give, each as `application/problem+json`
/// with [`ProblemBody`], deciding from the operation itself: 400 when it reads parameters
/// or a body; 401, 403 and 503 (with `Retry-After`) when it needs a token, which is looked
/// up in the database; 404 when it names something by path or body; 409 when it writes;
/// 413, 415 and 422 when it reads a body (422 also for parameters); 500 always. Responses
/// an operation documents itself are kept.
pub fn add_problems(doc: &mut OpenApi) {
    let components = doc.components.get_or_insert_with(Default::default);
    components
        .schemas
        .insert(ProblemBody::name().into_owned(), ProblemBody::schema());
    for problem in ALL_RESPONSES {
        components.responses.insert(
            problem.name.to_string(),
            RefOr::T(response_component(problem)),
        );
    }
    for item in doc.paths.paths.values_mut() {
        let operations = [
            (&mut item.get, false),
            (&mut item.head, false),
            (&mut item.options, false),
            (&mut item.put, true),
            (&mut item.post, true),
            (&mut item.patch, true),
            (&mut item.delete, true),
        ];
        for (operation, writes) in operations {
            if let Some(operation) = operation {
                add_operation_problems(operation, writes);
            }
        }
    }
}

fn add_operation_problems(operation: &mut Operation, writes: bool) {
    let parameters: Vec<ParameterIn> = operation
        .parameters
        .iter()
        .flatten()
        .filter_map(|p| match p {
            RefOr::T(p) => Some(p.parameter_in.clone()),
            RefOr::Ref(_) => None,
        })
        .collect();
    let has_body = operation.request_body.is_some();
    let has_parameters = !parameters.is_empty();
    let by_path = parameters.contains(&ParameterIn::Path);
    let secured = operation.security.as_ref().is_some_and(|s| !s.is_empty());

    let mut wanted: Vec<&ProblemResponse> = Vec::new();
    if has_parameters || has_body {
        wanted.extend([&BAD_REQUEST, &INVALID]);
    }
    if secured {
        wanted.extend([&UNAUTHORIZED, &FORBIDDEN, &UNAVAILABLE]);
    }
    if by_path || has_body {
        wanted.push(&NOT_FOUND);
    }
    if writes {
        wanted.push(&CONFLICT);
    }
    if has_body {
        wanted.extend([&TOO_LARGE, &UNSUPPORTED_MEDIA_TYPE]);
    }
    wanted.push(&INTERNAL);
    for problem in wanted {
        operation
            .responses
            .responses
            .entry(problem.status())
            .or_insert_with(|| RefOr::Ref(Ref::from_response_name(problem.name)));
    }
}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        crate::common::healthz,
        crate::common::readyz,
        crate::common::metrics,
        crate::common::openapi
    ),
    tags((name = "operations", description = "Liveness, readiness, metrics and this document; every process serves them, whatever its roles."))
)]
struct Common;

/// The document of the endpoints every process serves.
pub fn common() -> OpenApi {
    Common::openapi()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_gets_the_problems_it_can_give_and_keeps_its_own() {
        let mut doc = common();
        add_problems(&mut doc);
        let json = serde_json::to_value(&doc).unwrap();
        let readyz = &json["paths"]["/readyz"]["get"]["responses"];
        assert!(
            readyz["503"]["content"]["application/json"].is_object(),
            "{readyz}"
        );
        assert_eq!(
            readyz["500"]["$ref"], "#/components/responses/Internal",
            "{readyz}"
        );
        assert!(readyz.get("401").is_none(), "{readyz}");
        let unavailable = &json["components"]["responses"]["Unavailable"];
        assert!(
            unavailable["headers"]["Retry-After"].is_object(),
            "{unavailable}"
        );
    }
}
