//! The Batch API's storage, in the tenant's own account (its producers make
//! both when missing, as they make the results stream and the bulk bucket):
//! the `JETINFER_FILES` object store holds uploaded input files and the
//! output and error files runs write, one object per file named
//! `<tenant>/<file id>`; the `JETINFER_BATCHES` key-value bucket holds one
//! record per batch (`<tenant>.<batch id>`, the OpenAI Batch object as JSON),
//! updated by compare-and-set. The tenant in every name keeps tenants apart
//! even where they share an account; in the shipped configuration the
//! account already does.

use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store};

use crate::provision::{is_not_found, ProvisionError};
use crate::subjects::{check_token, SubjectError, Tenant};

/// Object store of Batch API files.
pub const FILES_BUCKET: &str = "JETINFER_FILES";
/// Key-value bucket of batch records.
pub const BATCHES_BUCKET: &str = "JETINFER_BATCHES";
/// Largest batch record (the Batch object: metadata of at most 16 pairs of
/// 64 + 512 characters, and a bounded list of validation errors).
const MAX_RECORD_BYTES: i32 = 64 * 1024;
/// Checks that `id` can name a file or batch: a single key and subject
/// token (1 to 64 of `[A-Za-z0-9_-]`).
pub fn check_id(what: &'static str, id: &str) -> Result<(), SubjectError> {
    check_token(what, id)
}

/// `<tenant>/<file id>`: a file's object name.
pub fn file_object(tenant: &Tenant, id: &str) -> Result<String, SubjectError> {
    check_id("file id", id)?;
    Ok(format!("{tenant}/{id}"))
}

/// `<tenant>.<batch id>`: a batch record's key.
pub fn batch_key(tenant: &Tenant, id: &str) -> Result<String, SubjectError> {
    check_id("batch id", id)?;
    Ok(format!("{tenant}.{id}"))
}

/// The batch id of a record key of `tenant`, or `None` for another's key.
pub fn parse_batch_key<'a>(tenant: &Tenant, key: &'a str) -> Option<&'a str> {
    key.strip_prefix(tenant.as_str())?.strip_prefix('.')
}

/// The files object store, made with `max_bytes` (0: bounded only by the
/// account) and `replicas` when this account has none.
pub async fn ensure_files(
    js: &jetstream::Context,
    max_bytes: i64,
    replicas: usize,
) -> Result<object_store::ObjectStore, ProvisionError> {
    let failed = |source: Box<dyn std::error::Error + Send + Sync>| ProvisionError::Stream {
        name: FILES_BUCKET.to_string(),
        source,
    };
    match js.get_stream(format!("OBJ_{FILES_BUCKET}")).await {
        Ok(_) => {}
        Err(err) if is_not_found(&err) => {
            js.create_object_store(object_store::Config {
                bucket: FILES_BUCKET.to_string(),
                description: Some("jetinfer Batch API files".into()),
                max_bytes: if max_bytes > 0 { max_bytes } else { -1 },
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| failed(e.into()))?;
        }
        Err(err) => return Err(failed(err.into())),
    }
    js.get_object_store(FILES_BUCKET)
        .await
        .map_err(|e| failed(e.into()))
}

/// The batch records bucket, made with `max_age` (records age out after it;
/// zero keeps them) and `replicas` when this account has none.
pub async fn ensure_records(
    js: &jetstream::Context,
    max_age: Duration,
    replicas: usize,
) -> Result<kv::Store, ProvisionError> {
    let failed = |source: Box<dyn std::error::Error + Send + Sync>| ProvisionError::Stream {
        name: BATCHES_BUCKET.to_string(),
        source,
    };
    match js.get_stream(format!("KV_{BATCHES_BUCKET}")).await {
        Ok(_) => {}
        Err(err) if is_not_found(&err) => {
            js.create_key_value(kv::Config {
                bucket: BATCHES_BUCKET.to_string(),
                description: "jetinfer Batch API batches".to_string(),
                history: 1,
                max_age,
                max_value_size: MAX_RECORD_BYTES,
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| failed(e.into()))?;
        }
        Err(err) => return Err(failed(err.into())),
    }
    js.get_key_value(BATCHES_BUCKET)
        .await
        .map_err(|e| failed(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_single_tokens_and_keys_belong_to_their_tenant() {
        let acme = Tenant::new("acme").unwrap();
        assert_eq!(batch_key(&acme, "batch_01J").unwrap(), "acme.batch_01J");
        assert_eq!(file_object(&acme, "file-01J").unwrap(), "acme/file-01J");
        for bad in ["", "a.b", "a b", "a/b", "*", ">", &"x".repeat(65)] {
            assert!(check_id("file id", bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_batch_key(&acme, "acme.batch_1"), Some("batch_1"));
        assert_eq!(parse_batch_key(&acme, "acmex.batch_1"), None);
        assert_eq!(parse_batch_key(&acme, "globex.batch_1"), None);
    }
}
