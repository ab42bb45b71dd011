//! Artifacts kept in the database (`artifact_chunks`, `stored_artifacts`):
//! content-addressed, in chunks, for controller replicas that share no
//! directory. Only bytes and counts live here; what the bytes must hash to
//! is checked by their reader (`crate::artifacts`), never trusted.

use sqlx::Row as _;

use super::{Store, StoreError};

/// A complete artifact as its row records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredArtifact {
    /// Bytes in all.
    pub size: i64,
    /// Chunks, numbered from 0.
    pub chunks: i64,
}

impl Store {
    /// Writes chunk `idx` of artifact `kind`/`sha256`. Writing it again
    /// (another replica uploading the same artifact at once, or a retry
    /// after a cut-short upload) replaces it with the same bytes.
    pub async fn put_artifact_chunk(
        &self,
        kind: &str,
        sha256: &str,
        idx: i64,
        data: &[u8],
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO artifact_chunks (kind, sha256, idx, data) VALUES ($1, $2, $3, $4)
             ON CONFLICT (kind, sha256, idx) DO UPDATE SET data = excluded.data",
        )
        .bind(kind)
        .bind(sha256)
        .bind(idx)
        .bind(data.to_vec())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Makes artifact `kind`/`sha256` visible once its chunks `0..chunks`
    /// are all written and hold `size` bytes in all (checked here, in the
    /// transaction that writes the row). A row already there (the same
    /// artifact stored by another replica) is kept.
    pub async fn finish_artifact(
        &self,
        kind: &str,
        sha256: &str,
        size: i64,
        chunks: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(LENGTH(data)), 0) AS BIGINT) AS bytes
             FROM artifact_chunks WHERE kind = $1 AND sha256 = $2 AND idx < $3",
        )
        .bind(kind)
        .bind(sha256)
        .bind(chunks)
        .fetch_one(&mut *tx)
        .await?;
        let found_chunks: i64 = row.try_get("n")?;
        let found_bytes: i64 = row.try_get("bytes")?;
        if found_chunks != chunks || found_bytes != size {
            return Err(StoreError::ArtifactIncomplete {
                kind: kind.to_owned(),
                sha256: sha256.to_owned(),
                chunks,
                size,
                found_chunks,
                found_bytes,
            });
        }
        sqlx::query(
            "INSERT INTO stored_artifacts (kind, sha256, size, chunks, created_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (kind, sha256) DO NOTHING",
        )
        .bind(kind)
        .bind(sha256)
        .bind(size)
        .bind(chunks)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The complete artifact `kind`/`sha256`, if stored.
    pub async fn stored_artifact(
        &self,
        kind: &str,
        sha256: &str,
    ) -> Result<Option<StoredArtifact>, StoreError> {
        let row = sqlx::query(
            "SELECT size, chunks FROM stored_artifacts WHERE kind = $1 AND sha256 = $2",
        )
        .bind(kind)
        .bind(sha256)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(StoredArtifact {
                size: row.try_get("size")?,
                chunks: row.try_get("chunks")?,
            })
        })
        .transpose()
    }

    /// Chunk `idx` of artifact `kind`/`sha256`, if there is one.
    pub async fn artifact_chunk(
        &self,
        kind: &str,
        sha256: &str,
        idx: i64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT data FROM artifact_chunks WHERE kind = $1 AND sha256 = $2 AND idx = $3",
        )
        .bind(kind)
        .bind(sha256)
        .bind(idx)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Drops artifact `kind`/`sha256`, row and chunks (one found corrupt:
    /// the next upload stores it afresh). False if it had no row.
    pub async fn delete_artifact(&self, kind: &str, sha256: &str) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let done = sqlx::query("DELETE FROM stored_artifacts WHERE kind = $1 AND sha256 = $2")
            .bind(kind)
            .bind(sha256)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM artifact_chunks WHERE kind = $1 AND sha256 = $2")
            .bind(kind)
            .bind(sha256)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// The pool, for tests that damage the tables on purpose.
    #[cfg(test)]
    pub(crate) fn pool_for_tests(&self) -> &sqlx::AnyPool {
        &self.pool
    }
}

#[cfg(test)]
mod tests {
    use crate::store::{Store, StoreError, StoredArtifact};

    crate::store::testing::store_tests!(
        chunks_round_trip_and_the_row_checks_them,
        bytes_of_every_value_survive
    );

    async fn chunks_round_trip_and_the_row_checks_them(store: Store) {
        let sha = "a".repeat(64);
        assert_eq!(
            store.stored_artifact("artifacts", &sha).await.unwrap(),
            None
        );
        store
            .put_artifact_chunk("artifacts", &sha, 0, b"hello ")
            .await
            .unwrap();
        // One chunk of two: no row, and the error says what is missing.
        let err = store
            .finish_artifact("artifacts", &sha, 11, 2, 100)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::ArtifactIncomplete {
                    found_chunks: 1,
                    found_bytes: 6,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            store.stored_artifact("artifacts", &sha).await.unwrap(),
            None
        );
        store
            .put_artifact_chunk("artifacts", &sha, 1, b"world")
            .await
            .unwrap();
        // The wrong total size is refused too.
        assert!(store
            .finish_artifact("artifacts", &sha, 12, 2, 100)
            .await
            .is_err());
        store
            .finish_artifact("artifacts", &sha, 11, 2, 100)
            .await
            .unwrap();
        // Finishing again (a second replica) keeps the row.
        store
            .finish_artifact("artifacts", &sha, 11, 2, 200)
            .await
            .unwrap();
        assert_eq!(
            store.stored_artifact("artifacts", &sha).await.unwrap(),
            Some(StoredArtifact {
                size: 11,
                chunks: 2
            })
        );
        // The stores are apart: not an agent binary.
        assert_eq!(
            store.stored_artifact("agent-binaries", &sha).await.unwrap(),
            None
        );
        assert_eq!(
            store.artifact_chunk("artifacts", &sha, 1).await.unwrap(),
            Some(b"world".to_vec())
        );
        assert_eq!(
            store.artifact_chunk("artifacts", &sha, 2).await.unwrap(),
            None
        );
        assert!(store.delete_artifact("artifacts", &sha).await.unwrap());
        assert_eq!(
            store.stored_artifact("artifacts", &sha).await.unwrap(),
            None
        );
        assert_eq!(
            store.artifact_chunk("artifacts", &sha, 0).await.unwrap(),
            None
        );
        assert!(!store.delete_artifact("artifacts", &sha).await.unwrap());
    }

    async fn bytes_of_every_value_survive(store: Store) {
        // NUL, invalid UTF-8 and high bytes: BYTEA/BLOB, not text.
        let data: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        let sha = "b".repeat(64);
        store
            .put_artifact_chunk("artifacts", &sha, 0, &data)
            .await
            .unwrap();
        assert_eq!(
            store.artifact_chunk("artifacts", &sha, 0).await.unwrap(),
            Some(data)
        );
    }
}
