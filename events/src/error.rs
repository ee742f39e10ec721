use std::fmt;

/// Errors raised by the shared layer: database, bus and decoding failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database error while {context}: {source}")]
    Database {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("bus error: {0}")]
    Bus(String),
    #[error("a backing service is unavailable: {0}")]
    Unavailable(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("could not decode {what}: {detail}")]
    Decode { what: &'static str, detail: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn bus(error: impl fmt::Display) -> Self {
        Error::Bus(error.to_string())
    }

    /// True when the failure is about reaching a service (worth retrying later) rather
    /// than about the request itself.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Database { source, .. } => matches!(
                source,
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
                    | sqlx::Error::Tls(_)
            ),
            Error::Bus(_) | Error::Unavailable(_) => true,
            _ => false,
        }
    }
}

/// Attach a short description of what was being done to a sqlx error.
pub trait DbContext<T> {
    fn context(self, context: &'static str) -> Result<T>;
}

impl<T> DbContext<T> for std::result::Result<T, sqlx::Error> {
    fn context(self, context: &'static str) -> Result<T> {
        self.map_err(|source| Error::Database { context, source })
    }
}
