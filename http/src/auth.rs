//! Bearer tokens, checked by extractors before anything else of a request is read: a
//! handler that takes [`Admin`], [`Reader`] or [`Ingester`] runs only for a live token
//! with that scope (admin implies the others). Lookups are cached briefly, so that reads
//! at tens of thousands of requests per second do not each cost a query.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;
use moka::future::Cache;

use scholia_events::store::Tokens;
use scholia_events::token::{self, Scope, Token};

use crate::error::ApiError;
use crate::state::Core;

#[derive(Clone)]
pub struct Auth {
    tokens: Arc<dyn Tokens>,
    /// Secret digest → token (or `None` for an unknown secret). Revocation in this
    /// process clears it at once; other processes see it within the time to live.
    cache: Cache<[u8; 32], Option<Arc<Token>>>,
}

impl Auth {
    pub fn new(tokens: Arc<dyn Tokens>) -> Self {
        Auth {
            tokens,
            cache: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(5))
                .build(),
        }
    }

    /// The token of `secret`, if it has `scope`. A cached lookup is shared, not copied.
    pub async fn check(&self, secret: &str, scope: Scope) -> Result<Arc<Token>, ApiError> {
        let digest = token::secret_digest(secret);
        let found = match self.cache.get(&digest).await {
            Some(found) => found,
            None => {
                let tokens = self.tokens.clone();
                let lookup = hex::encode(digest);
                self.cache
                    .try_get_with(digest, async move {
                        tokens.lookup(&lookup).await.map(|t| t.map(Arc::new))
                    })
                    .await
                    .map_err(|e| match Arc::try_unwrap(e) {
                        Ok(e) => ApiError::from(e),
                        Err(shared) => ApiError::from(scholia_events::Error::unavailable(
                            "the database",
                            shared.to_string(),
                        )),
                    })?
            }
        };
        let token = found.ok_or_else(|| {
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

    /// Forget cached lookups (after a revocation).
    pub fn forget_all(&self) {
        self.cache.invalidate_all();
    }
}

/// The bearer secret of a request, or `?token=` where that is allowed.
fn secret(parts: &Parts, allow_query: bool) -> Result<Cow<'_, str>, ApiError> {
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| {
            ApiError::unauthorized("The Authorization header is not readable text.")
        })?;
        return value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(|s| Cow::Borrowed(s.trim()))
            .ok_or_else(|| {
                ApiError::unauthorized("Send the token as 'Authorization: Bearer <token>'.")
            });
    }
    if allow_query
        && let Some(query) = parts.uri.query()
        && let Some(token) = query
            .split('&')
            .find_map(|pair| pair.strip_prefix("token="))
    {
        return Ok(Cow::Owned(percent_decode(token)));
    }
    Err(ApiError::unauthorized(
        "This endpoint needs a token: send 'Authorization: Bearer <token>'. An admin creates one with 'scholia token create'.",
    ))
}

/// Tokens are letters, digits and `_`; anything else in a query value is decoded.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
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

macro_rules! scoped {
    ($(#[$meta:meta])* $name:ident, $scope:expr, $query:expr) => {
        $(#[$meta])*
        pub struct $name(pub Arc<Token>);

        impl<S> FromRequestParts<S> for $name
        where
            Core: FromRef<S>,
            S: Send + Sync,
        {
            type Rejection = ApiError;

            async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
                let core = Core::from_ref(state);
                let secret = secret(parts, $query)?;
                core.auth.check(&secret, $scope).await.map($name)
            }
        }
    };
}

scoped!(
    /// A token with the admin scope.
    Admin,
    Scope::Admin,
    false
);
scoped!(
    /// A token that may read (read or admin).
    Reader,
    Scope::Read,
    false
);
scoped!(
    /// A token that may ingest (ingest or admin).
    Ingester,
    Scope::Ingest,
    false
);
scoped!(
    /// A token that may read, also accepted as `?token=` (websockets cannot set headers
    /// from a browser).
    QueryReader,
    Scope::Read,
    true
);

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn query_tokens_are_percent_decoded() {
        assert_eq!(percent_decode("sch_abc"), "sch_abc");
        assert_eq!(percent_decode("a%5Fb"), "a_b");
        assert_eq!(percent_decode("bad%zz"), "bad%zz");
        assert_eq!(percent_decode("end%"), "end%");
    }
}
