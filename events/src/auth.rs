//! Bearer tokens: scopes, source patterns, and their storage (only a SHA-256 of each
//! secret is kept).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::db::Database;
use crate::error::{DbContext, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Ingest,
    Read,
    Admin,
}

impl Scope {
    /// Whether a token of this scope may do what `needed` requires (admin implies all).
    pub fn allows(self, needed: Scope) -> bool {
        self == Scope::Admin || self == needed
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ingest" => Ok(Scope::Ingest),
            "read" => Ok(Scope::Read),
            "admin" => Ok(Scope::Admin),
            other => Err(format!(
                "scope must be ingest, read or admin, not {other:?}"
            )),
        }
    }
}

/// A token as listed: everything but its secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Token {
    pub id: Uuid,
    pub scope: Scope,
    /// Source patterns an ingest token may write (`generator-*`); empty means any.
    pub sources: Vec<String>,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

impl Token {
    /// Who this token is, as written in the event log.
    pub fn actor(&self) -> String {
        format!("token:{} ({})", self.id, self.name)
    }

    /// Whether this token may write records from `source`.
    pub fn may_write_source(&self, source: &str) -> bool {
        self.scope == Scope::Admin
            || self.sources.is_empty()
            || self
                .sources
                .iter()
                .any(|pattern| glob_match(pattern, source))
    }
}

/// `*` matches any run of characters, `?` any one; everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn new_secret() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let body: String = (0..40)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("sch_{body}")
}

type TokenRow = (Uuid, String, String, String, DateTime<Utc>);

fn from_row((id, scope, sources, name, created_at): TokenRow) -> Token {
    Token {
        id,
        scope: scope.parse().unwrap_or(Scope::Read),
        sources: serde_json::from_str(&sources).unwrap_or_default(),
        name,
        created_at,
    }
}

/// Create a token; returns it with its secret, which is never stored.
pub async fn create(
    db: &Database,
    scope: Scope,
    sources: Vec<String>,
    name: &str,
) -> Result<(Token, String)> {
    let secret = new_secret();
    let token = insert(db, scope, sources, name, &secret).await?;
    Ok((token, secret))
}

/// Store a token for a secret chosen elsewhere (the bootstrap admin token); if a live
/// token with that secret exists, return it.
pub async fn ensure(db: &Database, scope: Scope, name: &str, secret: &str) -> Result<Token> {
    if let Some(token) = lookup(db, secret).await? {
        return Ok(token);
    }
    insert(db, scope, Vec::new(), name, secret).await
}

async fn insert(
    db: &Database,
    scope: Scope,
    sources: Vec<String>,
    name: &str,
    secret: &str,
) -> Result<Token> {
    let token = Token {
        id: Uuid::now_v7(),
        scope,
        sources,
        name: name.to_string(),
        created_at: Utc::now(),
    };
    let sql = "INSERT INTO tokens (id, secret_hash, scope, sources, name, created_at) VALUES ($1, $2, $3, $4, $5, $6)";
    let sources = serde_json::to_string(&token.sources).expect("strings serialize");
    let hash = hash_secret(secret);
    match db {
        Database::Sqlite(d) => sqlx::query(sql)
            .bind(token.id)
            .bind(&hash)
            .bind(scope.as_str())
            .bind(&sources)
            .bind(name)
            .bind(token.created_at)
            .execute(&d.pool)
            .await
            .map(|_| ()),
        Database::Postgres(pg) => sqlx::query(sql)
            .bind(token.id)
            .bind(&hash)
            .bind(scope.as_str())
            .bind(&sources)
            .bind(name)
            .bind(token.created_at)
            .execute(&pg.pool)
            .await
            .map(|_| ()),
    }
    .context("storing a token")?;
    Ok(token)
}

/// The live token with this secret, if any.
pub async fn lookup(db: &Database, secret: &str) -> Result<Option<Token>> {
    let sql = "SELECT id, scope, sources, name, created_at FROM tokens WHERE secret_hash = $1 AND revoked_at IS NULL";
    let hash = hash_secret(secret);
    let row: Option<TokenRow> = match db {
        Database::Sqlite(d) => {
            sqlx::query_as(sql)
                .bind(&hash)
                .fetch_optional(&d.pool)
                .await
        }
        Database::Postgres(pg) => {
            sqlx::query_as(sql)
                .bind(&hash)
                .fetch_optional(&pg.pool)
                .await
        }
    }
    .context("looking up a token")?;
    Ok(row.map(from_row))
}

pub async fn list(db: &Database) -> Result<Vec<Token>> {
    let sql = "SELECT id, scope, sources, name, created_at FROM tokens WHERE revoked_at IS NULL ORDER BY created_at";
    let rows: Vec<TokenRow> = match db {
        Database::Sqlite(d) => sqlx::query_as(sql).fetch_all(&d.pool).await,
        Database::Postgres(pg) => sqlx::query_as(sql).fetch_all(&pg.pool).await,
    }
    .context("listing tokens")?;
    Ok(rows.into_iter().map(from_row).collect())
}

/// Revoke a token; false when there was no live token with that id.
pub async fn revoke(db: &Database, id: Uuid) -> Result<bool> {
    let sql = "UPDATE tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL";
    let done = match db {
        Database::Sqlite(d) => sqlx::query(sql)
            .bind(Utc::now())
            .bind(id)
            .execute(&d.pool)
            .await
            .map(|r| r.rows_affected()),
        Database::Postgres(pg) => sqlx::query(sql)
            .bind(Utc::now())
            .bind(id)
            .execute(&pg.pool)
            .await
            .map(|r| r.rows_affected()),
    }
    .context("revoking a token")?;
    Ok(done > 0)
}

/// How many live tokens exist.
pub async fn count(db: &Database) -> Result<i64> {
    let sql = "SELECT COUNT(*) FROM tokens WHERE revoked_at IS NULL";
    match db {
        Database::Sqlite(d) => sqlx::query_scalar(sql).fetch_one(&d.pool).await,
        Database::Postgres(pg) => sqlx::query_scalar(sql).fetch_one(&pg.pool).await,
    }
    .context("counting tokens")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_implies_every_scope_and_others_only_their_own() {
        assert!(Scope::Admin.allows(Scope::Ingest));
        assert!(Scope::Admin.allows(Scope::Read));
        assert!(Scope::Read.allows(Scope::Read));
        assert!(!Scope::Read.allows(Scope::Ingest));
        assert!(!Scope::Ingest.allows(Scope::Admin));
    }

    #[test]
    fn source_patterns_match_with_stars() {
        assert!(glob_match("generator-*", "generator-10"));
        assert!(!glob_match("generator-*", "meter-1"));
        assert!(glob_match("*-1?", "meter-10"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
    }

    #[test]
    fn a_secret_is_stored_only_as_its_hash() {
        let secret = new_secret();
        assert!(secret.starts_with("sch_"));
        assert_eq!(hash_secret(&secret).len(), 64);
        assert_ne!(hash_secret(&secret), secret);
    }
}
