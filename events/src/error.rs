//! The one error type of the shared layer, classified where it is raised: what a caller
//! should do about an error follows from its variant, never from its text.

/// Errors raised by stores, buses and the shared vocabulary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A backing service (the database, the bus) cannot be reached or is restarting.
    /// Transient: the same request may succeed shortly.
    #[error("{what} is unavailable ({detail})")]
    Unavailable { what: &'static str, detail: String },
    /// The request, definition or value is not acceptable. Retrying will not help.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The request contradicts what is stored (an existing name, a finished invalidation).
    #[error("{0}")]
    Conflict(String),
    /// Something that should not fail did: a bug, stored data that does not decode, a
    /// reply nobody expected. Retrying will not help either.
    #[error("{context}: {detail}")]
    Internal {
        context: &'static str,
        detail: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn unavailable(what: &'static str, detail: impl std::fmt::Display) -> Self {
        Error::Unavailable {
            what,
            detail: detail.to_string(),
        }
    }

    pub fn internal(context: &'static str, detail: impl std::fmt::Display) -> Self {
        Error::Internal {
            context,
            detail: detail.to_string(),
        }
    }

    /// True when retrying later may succeed: the failure was about reaching a service,
    /// not about the request.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }
}
