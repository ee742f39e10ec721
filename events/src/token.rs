//! Bearer tokens: scopes, source patterns and secrets. Stores keep only a SHA-256 of
//! each secret.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Token {
    pub id: Uuid,
    pub scope: Scope,
    /// Source patterns an ingest token may write (`generator-*`); empty means any.
    pub sources: Vec<String>,
    pub name: String,
    #[schema(value_type = String, format = DateTime)]
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

/// What the database keeps of a secret: its SHA-256, in hex.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(secret_digest(secret))
}

/// A secret's SHA-256 (what [`hash_secret`] writes in hex).
pub fn secret_digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// A new random secret, `sch_` and 40 letters and digits.
pub fn new_secret() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let body: String = (0..40)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("sch_{body}")
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
