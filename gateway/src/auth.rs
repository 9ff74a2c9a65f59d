//! Who is calling: an API key from the keys file, or a JWT verified against
//! a local JWKS file, both as `Authorization: Bearer <token>`.
//!
//! The keys file holds no key, only the SHA-256 of each (hex), with the
//! tenant it acts for, its role and its own limits:
//!
//! ```toml
//! [[keys]]
//! id = "acme-backend-1"     # shown in logs; the key itself never is
//! sha256 = "<hex SHA-256 of the key>"
//! tenant = "acme"
//! role = "user"             # user: embeddings and models; read_only: models only
//! rate = { inputs_per_second = 100, burst_inputs = 400 }   # optional
//! ```
//!
//! A presented key is hashed and looked up by its digest, so nothing about
//! a key can be learnt from timing beyond its digest. The file is reloaded
//! when it changes (checked every `reload_interval`) and on SIGHUP; a file
//! that no longer parses keeps the keys loaded before, and says why in the
//! log (a line number, never a key).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::{JwtConfig, Rate};
use crate::error::ApiError;
use crate::{AppState, TenantHandle};

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Embeddings and the model list (and, later, batches).
    User,
    /// The model list only.
    ReadOnly,
}

/// One entry of the keys file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    pub id: String,
    sha256: String,
    pub tenant: String,
    pub role: Role,
    #[serde(default)]
    pub rate: Option<Rate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<KeyEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid keys file: {message}")]
    Parse { path: PathBuf, message: String },
}

/// Digest of a key -> its entry.
type KeyMap = HashMap<[u8; 32], Arc<KeyEntry>>;

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn parse_hex(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Reads and checks a keys file.
pub fn read_keys(path: &Path) -> Result<KeyMap, KeysError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let parse = |message: String| KeysError::Parse {
        path: path.to_path_buf(),
        message,
    };
    // toml's messages quote the offending line, which may hold a digest:
    // say where, not what.
    let file: KeysFile = toml::from_str(&text).map_err(|e| {
        parse(match e.span() {
            Some(span) => format!(
                "error at line {}",
                text[..span.start].matches('\n').count() + 1
            ),
            None => "it does not parse".into(),
        })
    })?;
    let mut map = KeyMap::new();
    for entry in file.keys {
        let Some(hash) = parse_hex(&entry.sha256) else {
            return Err(parse(format!(
                "key {:?}: sha256 must be 64 hex digits",
                crate::error::shown(&entry.id)
            )));
        };
        if map.insert(hash, Arc::new(entry.clone())).is_some() {
            return Err(parse(format!(
                "key {:?}: the same digest appears twice",
                crate::error::shown(&entry.id)
            )));
        }
    }
    Ok(map)
}

/// The loaded keys and JWKS, swapped whole on reload.
#[derive(Clone, Default)]
pub struct Credentials {
    keys: Arc<RwLock<Arc<KeyMap>>>,
    jwks: Arc<RwLock<Option<Arc<JwkSet>>>>,
}

impl Credentials {
    /// Reads `path` and replaces the keys; on error the old keys stay.
    pub fn reload_keys(&self, path: &Path) -> Result<usize, KeysError> {
        let map = read_keys(path)?;
        let count = map.len();
        *self.keys.write().expect("keys lock") = Arc::new(map);
        Ok(count)
    }

    pub fn reload_jwks(&self, path: &Path) -> Result<usize, KeysError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let set: JwkSet = serde_json::from_str(&text).map_err(|e| KeysError::Parse {
            path: path.to_path_buf(),
            message: format!("not a JWKS document (line {})", e.line()),
        })?;
        let count = set.keys.len();
        *self.jwks.write().expect("jwks lock") = Some(Arc::new(set));
        Ok(count)
    }

    fn key(&self, presented: &str) -> Option<Arc<KeyEntry>> {
        let keys = Arc::clone(&self.keys.read().expect("keys lock"));
        keys.get(&digest(presented)).cloned()
    }

    fn jwks(&self) -> Option<Arc<JwkSet>> {
        self.jwks.read().expect("jwks lock").clone()
    }
}

/// Watches the keys and JWKS files: reloads each when its modification time
/// or size changes. SIGHUP calls [`reload_all`] directly.
pub async fn watch(
    credentials: Credentials,
    keys: Option<PathBuf>,
    jwks: Option<PathBuf>,
    every: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let stamp = |path: &Option<PathBuf>| -> Option<(SystemTime, u64)> {
        let meta = std::fs::metadata(path.as_ref()?).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    };
    let (mut keys_seen, mut jwks_seen) = (stamp(&keys), stamp(&jwks));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let (keys_now, jwks_now) = (stamp(&keys), stamp(&jwks));
        if keys_now != keys_seen {
            keys_seen = keys_now;
            reload_one(&credentials, keys.as_deref(), None);
        }
        if jwks_now != jwks_seen {
            jwks_seen = jwks_now;
            reload_one(&credentials, None, jwks.as_deref());
        }
    }
}

/// Reloads both files (SIGHUP), logging the outcome.
pub fn reload_all(credentials: &Credentials, keys: Option<&Path>, jwks: Option<&Path>) {
    reload_one(credentials, keys, jwks);
}

fn reload_one(credentials: &Credentials, keys: Option<&Path>, jwks: Option<&Path>) {
    if let Some(path) = keys {
        match credentials.reload_keys(path) {
            Ok(count) => tracing::info!(keys = count, file = %path.display(), "API keys loaded"),
            Err(err) => {
                tracing::error!(error = %err, "API keys not reloaded; the previous keys stay")
            }
        }
    }
    if let Some(path) = jwks {
        match credentials.reload_jwks(path) {
            Ok(count) => tracing::info!(keys = count, file = %path.display(), "JWKS loaded"),
            Err(err) => tracing::error!(error = %err, "JWKS not reloaded; the previous one stays"),
        }
    }
}

/// An authenticated caller: whom it acts for and what it may do. Handlers
/// take it as an extractor; a request without valid credentials never
/// reaches them (401), nor one for a tenant this gateway holds no NATS
/// identity for (403).
#[derive(Clone)]
pub struct Caller {
    /// The tenant's handle: its `Client` and its limits.
    pub tenant: Arc<TenantHandle>,
    /// The key's `id` from the keys file, or `jwt:<sub>`; for logs and
    /// per-key limits, never the secret.
    pub key_id: String,
    pub role: Role,
    /// The key's own cost limit, if it has one (JWT callers have none: the
    /// tenant's applies).
    pub rate: Option<Rate>,
}

impl Caller {
    /// Refuses a caller whose role does not allow `what`.
    pub fn require_user(&self, what: &str) -> Result<(), ApiError> {
        match self.role {
            Role::User => Ok(()),
            Role::ReadOnly => Err(ApiError::forbidden(format!(
                "This key is read-only: it may not {what}"
            ))),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        let jwt = state.jwt.as_ref().filter(|_| looks_like_jwt(token));
        let (tenant, key_id, role, rate) = if let Some(jwt) = jwt {
            let claims = verify_jwt(token, jwt, &state.credentials)?;
            (claims.tenant, claims.key_id, claims.role, None)
        } else {
            let entry = state
                .credentials
                .key(token)
                .ok_or_else(|| ApiError::unauthorized("Incorrect API key provided"))?;
            (
                entry.tenant.clone(),
                entry.id.clone(),
                entry.role,
                entry.rate,
            )
        };
        let Some(handle) = state.tenants.get(&tenant) else {
            tracing::warn!(key = %jetinfer_schemas::Untrusted(&key_id), tenant = %jetinfer_schemas::Untrusted(&tenant), "caller's tenant has no NATS identity on this gateway");
            return Err(ApiError::forbidden(
                "This key's tenant is not served by this gateway",
            ));
        };
        Ok(Caller {
            tenant: Arc::clone(handle),
            key_id,
            role,
            rate,
        })
    }
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let missing = || {
        ApiError::unauthorized(
            "You didn't provide an API key: send it as 'Authorization: Bearer <key>'",
        )
    };
    let value = parts
        .headers
        .get(header::AUTHORIZATION)
        .ok_or_else(missing)?
        .to_str()
        .map_err(|_| missing())?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(missing)?
        .trim();
    if token.is_empty() {
        return Err(missing());
    }
    Ok(token)
}

/// Three base64url parts, the first a JSON object: a JWT, not an API key.
fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.split('.').count() == 3
}

struct JwtCaller {
    tenant: String,
    key_id: String,
    role: Role,
}

/// Verifies signature (a key of the JWKS, chosen by `kid`, with the
/// algorithm that key declares), `iss`, `aud`, `exp` (and `nbf`), then reads
/// the tenant and role claims.
fn verify_jwt(
    token: &str,
    config: &JwtConfig,
    credentials: &Credentials,
) -> Result<JwtCaller, ApiError> {
    let refused = |why: &str| ApiError::unauthorized(format!("Invalid bearer token: {why}"));
    let header = jsonwebtoken::decode_header(token).map_err(|_| refused("malformed"))?;
    let jwks = credentials
        .jwks()
        .ok_or_else(|| refused("no signing keys are loaded"))?;
    let jwk = match &header.kid {
        Some(kid) => jwks.find(kid),
        None if jwks.keys.len() == 1 => jwks.keys.first(),
        None => None,
    }
    .ok_or_else(|| refused("unknown signing key"))?;
    // The key's own algorithm, never the token's choice alone: no
    // algorithm confusion (an HMAC token "signed" with a public key).
    let algorithm = jwk
        .common
        .key_algorithm
        .as_ref()
        .and_then(|a| a.to_string().parse::<jsonwebtoken::Algorithm>().ok())
        .ok_or_else(|| refused("the signing key declares no algorithm"))?;
    if header.alg != algorithm {
        return Err(refused("algorithm does not match the signing key"));
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|_| refused("unusable signing key"))?;
    let mut validation = Validation::new(algorithm);
    validation.set_issuer(&[&config.issuer]);
    validation.set_audience(&[&config.audience]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    validation.validate_nbf = true;
    validation.leeway = config.leeway_secs;
    let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
        token,
        &key,
        &validation,
    )
    .map_err(|e| {
        use jsonwebtoken::errors::ErrorKind;
        refused(match e.kind() {
            ErrorKind::ExpiredSignature => "expired",
            ErrorKind::InvalidAudience => "wrong audience",
            ErrorKind::InvalidIssuer => "wrong issuer",
            ErrorKind::InvalidSignature => "bad signature",
            ErrorKind::ImmatureSignature => "not valid yet",
            ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
            _ => "not valid",
        })
    })?;
    let claims = data.claims;
    let tenant = claims
        .get(&config.tenant_claim)
        .and_then(|v| v.as_str())
        .ok_or_else(|| refused("no tenant claim"))?
        .to_string();
    let role = match &config.role_claim {
        Some(claim) => match claims.get(claim).and_then(|v| v.as_str()) {
            None | Some("user") => Role::User,
            Some("read_only") => Role::ReadOnly,
            Some(_) => return Err(ApiError::forbidden("The token's role is not known")),
        },
        None => Role::User,
    };
    let sub = claims.get("sub").and_then(|v| v.as_str()).unwrap_or("-");
    Ok(JwtCaller {
        tenant,
        key_id: format!("jwt:{}", crate::error::shown(sub)),
        role,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keys_file_maps_digests_and_its_errors_show_no_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let hash: String = digest("sk-test")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        std::fs::write(
            &path,
            format!(
                "[[keys]]\nid = \"k1\"\nsha256 = \"{hash}\"\ntenant = \"acme\"\nrole = \"user\"\n"
            ),
        )
        .unwrap();
        let keys = read_keys(&path).unwrap();
        assert_eq!(keys.get(&digest("sk-test")).unwrap().tenant, "acme");
        assert!(!keys.contains_key(&digest("sk-other")));

        std::fs::write(
            &path,
            format!("[[keys]]\nid = \"k1\"\nsha256 = \"{hash}\"\ntenant = 3\n"),
        )
        .unwrap();
        let err = read_keys(&path).unwrap_err().to_string();
        assert!(err.contains("line"), "{err}");
        assert!(!err.contains(&hash), "{err}");
    }

    #[test]
    fn only_three_part_tokens_are_taken_for_jwts() {
        assert!(looks_like_jwt("eyJhbGciOi.eyJzdWIi.c2ln"));
        assert!(!looks_like_jwt("sk-abc.def"));
    }
}
