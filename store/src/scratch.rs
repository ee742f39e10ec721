//! Scratch databases for the store's own tests: a SQLite file in a folder of its own, or
//! a PostgreSQL database of its own on the test server (`SCHOLIA_TEST_DATABASE_URL`).

use std::path::PathBuf;

use sqlx::PgPool;
use uuid::Uuid;

/// A database that exists until [`Scratch::remove`].
pub(crate) struct Scratch {
    pub(crate) url: String,
    place: Place,
}

enum Place {
    Folder(PathBuf),
    Server { admin: PgPool, name: String },
}

impl Scratch {
    pub(crate) fn sqlite() -> Scratch {
        let dir = std::env::temp_dir().join(format!("scholia-store-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("creating a test directory");
        Scratch {
            url: format!("sqlite://{}", dir.join("s.db").display()),
            place: Place::Folder(dir),
        }
    }

    /// A new database on the test server; None (saying so) when no server is set, and a
    /// panic when `SCHOLIA_REQUIRE_SERVICES` says there must be one.
    pub(crate) async fn postgres() -> Option<Scratch> {
        let server = match std::env::var("SCHOLIA_TEST_DATABASE_URL") {
            Ok(url) => url,
            Err(_) if std::env::var_os("SCHOLIA_REQUIRE_SERVICES").is_some() => {
                panic!("set SCHOLIA_TEST_DATABASE_URL (SCHOLIA_REQUIRE_SERVICES is set)")
            }
            Err(_) => {
                eprintln!("\n*** DID NOT RUN: set SCHOLIA_TEST_DATABASE_URL ***\n");
                return None;
            }
        };
        let name = format!("scholia_store_{}", Uuid::new_v4().simple());
        let admin = PgPool::connect(&server)
            .await
            .expect("connecting to the server");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("creating the test database");
        let url = format!("{}/{name}", server.rsplit_once('/').expect("a URL").0);
        Some(Scratch {
            url,
            place: Place::Server { admin, name },
        })
    }

    /// Remove the database (close its pools first).
    pub(crate) async fn remove(self) {
        match self.place {
            Place::Folder(dir) => {
                std::fs::remove_dir_all(&dir).ok();
            }
            Place::Server { admin, name } => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE {name} WITH (FORCE)"
                )))
                .execute(&admin)
                .await
                .expect("dropping the test database");
            }
        }
    }
}
