//! Authentication of requests by bearer token, with a short-lived cache so that reads
//! at tens of thousands of requests per second do not each cost a database query.

use std::time::Duration;

use axum::http::{HeaderMap, header};
use moka::future::Cache;
use scholia_events::Database;
use scholia_events::auth::{self, Scope, Token};

use crate::problem::ApiError;

#[derive(Clone)]
pub struct Authenticator {
    db: Database,
    /// Secret hash → token (or `None` for an unknown secret). Revocation in this process
    /// clears it at once; other processes see it within the time to live.
    cache: Cache<String, Option<Token>>,
}

impl Authenticator {
    pub fn new(db: Database) -> Self {
        Authenticator {
            db,
            cache: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(5))
                .build(),
        }
    }

    /// The token presented in `Authorization: Bearer …` (or `query_token`, for
    /// websockets), if it has `scope`.
    pub async fn require(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
        scope: Scope,
    ) -> Result<Token, ApiError> {
        let secret = match headers.get(header::AUTHORIZATION) {
            Some(value) => {
                let value = value.to_str().map_err(|_| {
                    ApiError::unauthorized("The Authorization header is not readable text.")
                })?;
                value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
                    .ok_or_else(|| {
                        ApiError::unauthorized("Send the token as 'Authorization: Bearer <token>'.")
                    })?
                    .trim()
                    .to_string()
            }
            None => match query_token {
                Some(token) => token.to_string(),
                None => {
                    return Err(ApiError::unauthorized(
                        "This endpoint needs a token: send 'Authorization: Bearer <token>'. An admin creates one with 'scholia token create'.",
                    ));
                }
            },
        };
        let hash = auth::hash_secret(&secret);
        let db = self.db.clone();
        let token = self
            .cache
            .try_get_with(hash, async move { auth::lookup(&db, &secret).await })
            .await
            .map_err(|e| {
                if e.is_unavailable() {
                    ApiError::from(scholia_events::Error::Unavailable(e.to_string()))
                } else {
                    ApiError::internal(e)
                }
            })?;
        let token = token.ok_or_else(|| {
            ApiError::unauthorized(
                "This token is unknown or was revoked; ask an admin for a new one.",
            )
        })?;
        if !token.scope.allows(scope) {
            return Err(ApiError::forbidden(format!(
                "This token has the {} scope; this endpoint needs {scope}{}.",
                token.scope,
                if scope == Scope::Admin {
                    ""
                } else {
                    " (or admin)"
                }
            )));
        }
        Ok(token)
    }

    pub fn forget_all(&self) {
        self.cache.invalidate_all();
    }
}
