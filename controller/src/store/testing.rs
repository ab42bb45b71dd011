//! Tests only: every store test runs against both engines. A test is an
//! `async fn(Store)`; [`store_tests!`] makes a module of the same name with
//! a `sqlite` and a `postgres` test calling it, e.g.
//! `store::nodes::tests::renewals_keep_one_cert::postgres`.

// OwnServer is for the end-to-end tests and benchmarks.
#[allow(dead_code)]
#[path = "test_postgres.rs"]
pub(crate) mod test_postgres;

use super::{PostgresUrl, Store};

/// The URL of a fresh database of the test PostgreSQL server; `None` when
/// `SLIPWAY_TEST_NO_POSTGRES=1` skips PostgreSQL (the test then passes
/// with a note). Panics, failing the test, when the server cannot start.
pub(crate) async fn postgres_url() -> Option<PostgresUrl> {
    if test_postgres::skipped() {
        eprintln!("{}=1: PostgreSQL variant skipped", test_postgres::SKIP_ENV);
        return None;
    }
    let url = tokio::task::spawn_blocking(test_postgres::database_url)
        .await
        .expect("database_url panicked")
        .unwrap_or_else(|e| panic!("test PostgreSQL: {e}"));
    Some(PostgresUrl::parse(&url).expect("test database URL"))
}

/// A store on a fresh database of the test PostgreSQL server, as
/// [`postgres_url`].
pub(crate) async fn postgres_store() -> Option<Store> {
    let url = postgres_url().await?;
    Some(
        Store::open_postgres(&url)
            .await
            .expect("opening the test PostgreSQL store"),
    )
}

/// For each `name`, a module `name` with the tests `sqlite` and `postgres`
/// running `async fn name(store: Store)` on a fresh store of that engine.
macro_rules! store_tests {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                let dir = tempfile::tempdir().unwrap();
                let store = $crate::store::Store::open(dir.path()).await.unwrap();
                super::$name(store).await;
            }

            #[tokio::test]
            async fn postgres() {
                if let Some(store) = $crate::store::testing::postgres_store().await {
                    super::$name(store).await;
                }
            }
        }
    )*};
}
pub(crate) use store_tests;
