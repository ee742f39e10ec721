//! sqlx errors, classified where they are raised: a lost or restarting database is
//! `Unavailable` (transient: callers answer 503 and retry), everything else `Internal`.

use scholia_events::Error;

/// SQLSTATE classes and codes that mean "the database is not there right now".
fn transient_sqlstate(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources (too many connections, disk full)
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" // admin shutdown, crash shutdown, cannot connect now
                | "40001" | "40P01" // serialization failure, deadlock: retry the transaction
                | "55P03" // lock not available
        )
}

/// SQLite primary result codes that mean "try again": busy, locked, I/O, full.
fn transient_sqlite(code: &str) -> bool {
    code.parse::<i32>()
        .is_ok_and(|c| matches!(c & 0xff, 5 | 6 | 10 | 13 | 14))
}

pub(crate) fn classify(context: &'static str, error: sqlx::Error) -> Error {
    let transient = match &error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(e) => e
            .code()
            .is_some_and(|code| transient_sqlstate(&code) || transient_sqlite(&code)),
        _ => false,
    };
    if transient {
        Error::unavailable("the database", format!("{context}: {error}"))
    } else {
        Error::internal(context, error)
    }
}

/// Whether a write failed on a unique key (another writer stored the same key first).
pub(crate) fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.is_unique_violation())
}

/// Attach what was being done to a sqlx error, and classify it.
pub(crate) trait Ctx<T> {
    fn ctx(self, context: &'static str) -> Result<T, Error>;
}

impl<T> Ctx<T> for Result<T, sqlx::Error> {
    fn ctx(self, context: &'static str) -> Result<T, Error> {
        self.map_err(|e| classify(context, e))
    }
}

/// A value stored as text that does not read back.
pub(crate) fn corrupt(context: &'static str, detail: impl std::fmt::Display) -> Error {
    Error::internal(context, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_failures_are_transient_and_mistakes_are_not() {
        assert!(transient_sqlstate("08006"));
        assert!(transient_sqlstate("57P01"));
        assert!(!transient_sqlstate("23505"), "unique violation");
        assert!(!transient_sqlstate("42601"), "syntax error");
        assert!(transient_sqlite("5"), "SQLITE_BUSY");
        assert!(transient_sqlite("517"), "SQLITE_BUSY_SNAPSHOT");
        assert!(!transient_sqlite("2067"), "SQLITE_CONSTRAINT_UNIQUE");
        assert!(classify("x", sqlx::Error::PoolTimedOut).is_transient());
        assert!(!classify("x", sqlx::Error::RowNotFound).is_transient());
    }
}
