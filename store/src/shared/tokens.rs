//! Tokens, kept as SHA-256 hashes of their secrets.

use async_trait::async_trait;
use chrono::Utc;
use uuid::Uuid;

use scholia_events::store::{Bootstrap, Tokens};
use scholia_events::token::{Scope, Token};
use scholia_events::{NewEvent, Result};

use super::{Backend, Db, WriteTx};
use crate::error::{Ctx, corrupt};
use crate::time::Timestamp;

type TokenRow = (Uuid, String, String, String, Timestamp);

const COLUMNS: &str = "id, scope, sources, name, created_at";

fn token((id, scope, sources, name, created_at): TokenRow) -> Result<Token> {
    Ok(Token {
        id,
        scope: scope.parse().map_err(|e| corrupt("reading a token", e))?,
        sources: serde_json::from_str(&sources).map_err(|e| corrupt("reading a token", e))?,
        name,
        created_at: created_at.into(),
    })
}

async fn insert(
    tx: &mut WriteTx,
    scope: Scope,
    sources: Vec<String>,
    name: &str,
    secret_hash: &str,
) -> Result<Token> {
    let token = Token {
        id: Uuid::now_v7(),
        scope,
        sources,
        name: name.to_string(),
        created_at: Utc::now(),
    };
    sqlx::query::<Db>(
        "INSERT INTO tokens (id, secret_hash, scope, sources, name, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(token.id)
    .bind(secret_hash)
    .bind(scope.as_str())
    .bind(serde_json::to_string(&token.sources).expect("strings serialize"))
    .bind(name)
    .bind(Timestamp(token.created_at))
    .execute(tx.conn())
    .await
    .ctx("storing a token")?;
    Ok(token)
}

fn created_event(actor: &str, token: &Token) -> NewEvent {
    NewEvent::admin(
        actor,
        "token.created",
        token.id.to_string(),
        serde_json::json!({"scope": token.scope, "sources": token.sources, "name": token.name}),
    )
}

impl Backend {
    /// What is stored of a bootstrap secret, if anything.
    async fn bootstrapped(&self, secret_hash: &str) -> Result<Option<Bootstrap>> {
        let row: Option<(Uuid, String, String, String, Timestamp, Option<Timestamp>)> =
            sqlx::query_as::<Db, _>(
                "SELECT id, scope, sources, name, created_at, revoked_at FROM tokens WHERE secret_hash = $1",
            )
            .bind(secret_hash)
            .fetch_optional(&self.pool)
            .await
            .ctx("looking up the bootstrap token")?;
        match row {
            None => Ok(None),
            Some((.., Some(_))) => Ok(Some(Bootstrap::Revoked)),
            Some((id, scope, sources, name, created_at, None)) => Ok(Some(Bootstrap::Existing(
                token((id, scope, sources, name, created_at))?,
            ))),
        }
    }
}

#[async_trait]
impl Tokens for Backend {
    async fn create(
        &self,
        scope: Scope,
        sources: Vec<String>,
        name: &str,
        secret_hash: &str,
        actor: Option<&str>,
    ) -> Result<Token> {
        let mut tx = self.write().await?;
        let token = insert(&mut tx, scope, sources, name, secret_hash).await?;
        let actor = actor.unwrap_or("scholia");
        super::log::append(&mut tx, vec![created_event(actor, &token)]).await?;
        tx.commit().await?;
        Ok(token)
    }

    async fn bootstrap(&self, scope: Scope, name: &str, secret_hash: &str) -> Result<Bootstrap> {
        // Look first without the log lock: a process starting while others work (or while
        // the lock is busy) need not wait for it when the token exists, as it usually does.
        if let Some(found) = self.bootstrapped(secret_hash).await? {
            return Ok(found);
        }
        let mut tx = self.write().await?;
        let token = match insert(&mut tx, scope, Vec::new(), name, secret_hash).await {
            Ok(token) => token,
            Err(error) => {
                drop(tx);
                // Another process may have stored it meanwhile.
                return self.bootstrapped(secret_hash).await?.ok_or(error);
            }
        };
        super::log::append(&mut tx, vec![created_event("scholia", &token)]).await?;
        tx.commit().await?;
        Ok(Bootstrap::Created(token))
    }

    async fn lookup(&self, secret_hash: &str) -> Result<Option<Token>> {
        let row: Option<TokenRow> = sqlx::query_as::<Db, TokenRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM tokens WHERE secret_hash = $1 AND revoked_at IS NULL"
        )))
        .bind(secret_hash)
        .fetch_optional(&self.pool)
        .await
        .ctx("looking up a token")?;
        row.map(token).transpose()
    }

    async fn list(&self) -> Result<Vec<Token>> {
        let rows: Vec<TokenRow> = sqlx::query_as::<Db, TokenRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM tokens WHERE revoked_at IS NULL ORDER BY created_at"
        )))
        .fetch_all(&self.pool)
        .await
        .ctx("listing tokens")?;
        rows.into_iter().map(token).collect()
    }

    async fn revoke(&self, id: Uuid, actor: &str) -> Result<bool> {
        let mut tx = self.write().await?;
        let done = sqlx::query::<Db>(
            "UPDATE tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(Timestamp(Utc::now()))
        .bind(id)
        .execute(tx.conn())
        .await
        .ctx("revoking a token")?
        .rows_affected();
        if done == 0 {
            return Ok(false);
        }
        super::log::commit_audited(
            tx,
            NewEvent::admin(
                actor,
                "token.revoked",
                id.to_string(),
                serde_json::Value::Null,
            ),
        )
        .await?;
        Ok(true)
    }

    async fn count(&self) -> Result<i64> {
        sqlx::query_scalar::<Db, i64>("SELECT COUNT(*) FROM tokens WHERE revoked_at IS NULL")
            .fetch_one(&self.pool)
            .await
            .ctx("counting tokens")
    }
}
