//! Bearer tokens (HS256 JWT) and signed download links, both keyed by `JWT_SECRET`.

use std::time::{SystemTime, UNIX_EPOCH};

use bson::oid::ObjectId;
use hmac::{Hmac, Mac};
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Scope needed to start exports.
pub const SCOPE_EXPORT: &str = "contacts:export";
/// Scope needed to start deletes.
pub const SCOPE_DELETE: &str = "contacts:delete";
/// Scope needed to read jobs.
pub const SCOPE_READ: &str = "jobs:read";
/// Hard deletes (erasures that keep nothing to restore).
pub const SCOPE_PURGE: &str = "contacts:purge";

/// How long a signed download link stays valid.
pub const LINK_TTL_SECS: i64 = 15 * 60;

/// Token claims of the contract.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Organisation id (24-hex).
    pub org: String,
    /// Expiry (seconds since the epoch).
    pub exp: i64,
    /// Space-separated scopes.
    #[serde(default)]
    pub scope: String,
}

/// A verified caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Their organisation.
    pub org: ObjectId,
    /// Their user id, when it is an ObjectId.
    pub user: Option<ObjectId>,
    /// When the token expires (seconds since the epoch).
    pub exp: i64,
    scopes: Vec<String>,
}

impl Caller {
    /// True when the token carries `scope`.
    pub fn has(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No bearer token.
    #[error("missing bearer token")]
    Missing,
    /// Bad signature, expired, malformed, or a bad `org` claim.
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Signs and verifies tokens and links.
#[derive(Clone)]
pub struct Keys {
    secret: Vec<u8>,
    public_url: String,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("public_url", &self.public_url)
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// Keys from the secret; links point at `public_url`.
    pub fn new(secret: &str, public_url: &str) -> Keys {
        Keys {
            secret: secret.as_bytes().to_vec(),
            public_url: public_url.trim_end_matches('/').to_string(),
        }
    }

    /// Verifies a bearer token.
    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // jsonwebtoken accepts tokens up to 60 s past `exp` by default; an
        // expired token is a bad token (401), to the second.
        validation.leeway = 0;
        let data = decode::<Claims>(token, &DecodingKey::from_secret(&self.secret), &validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let org = ObjectId::parse_str(&data.claims.org)
            .map_err(|_| AuthError::Invalid("org claim is not a 24-hex id".into()))?;
        Ok(Caller {
            org,
            user: ObjectId::parse_str(&data.claims.sub).ok(),
            exp: data.claims.exp,
            scopes: data
                .claims
                .scope
                .split_whitespace()
                .map(String::from)
                .collect(),
        })
    }

    /// Mints a token (dev command, CLI, tests).
    pub fn mint(
        &self,
        user: &str,
        org: &str,
        scope: &str,
        ttl_secs: i64,
    ) -> anyhow::Result<String> {
        let claims = Claims {
            sub: user.to_string(),
            org: org.to_string(),
            exp: now_secs() + ttl_secs,
            scope: scope.to_string(),
        };
        Ok(encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&self.secret),
        )?)
    }

    /// A download link for a job's file, valid 15 minutes: `(url, expires_at_unix)`.
    pub fn download_link(&self, job_id: &str) -> (String, i64) {
        let expires = now_secs() + LINK_TTL_SECS;
        let sig = self.link_signature(job_id, expires);
        (
            format!(
                "{}/api/exports/{job_id}/download?expires={expires}&signature={sig}",
                self.public_url
            ),
            expires,
        )
    }

    /// Checks a link's signature and expiry.
    pub fn check_link(&self, job_id: &str, expires: i64, signature: &str) -> bool {
        if expires < now_secs() {
            return false;
        }
        let Ok(given) = hex::decode(signature) else {
            return false;
        };
        let mut mac = self.mac();
        mac.update(format!("download:{job_id}:{expires}").as_bytes());
        mac.verify_slice(&given).is_ok()
    }

    fn link_signature(&self, job_id: &str, expires: i64) -> String {
        let mut mac = self.mac();
        mac.update(format!("download:{job_id}:{expires}").as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length, so this cannot fail.
        <Hmac<Sha256> as Mac>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("hmac accepts any key length"))
    }
}

/// Seconds since the epoch.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_tampering() {
        let keys = Keys::new("s3cret", "http://x");
        let org = ObjectId::new().to_hex();
        let t = keys
            .mint(
                &ObjectId::new().to_hex(),
                &org,
                "jobs:read contacts:export",
                60,
            )
            .unwrap();
        let c = keys.verify(&t).unwrap();
        assert_eq!(c.org.to_hex(), org);
        assert!(c.has(SCOPE_READ) && c.has(SCOPE_EXPORT) && !c.has(SCOPE_DELETE));
        assert!(Keys::new("other", "http://x").verify(&t).is_err());
        let expired = keys.mint("u", &org, "jobs:read", -120).unwrap();
        assert!(keys.verify(&expired).is_err());
        // No grace period: a token that expired seconds ago is refused.
        let just_expired = keys.mint("u", &org, "jobs:read", -2).unwrap();
        assert!(keys.verify(&just_expired).is_err());
    }

    #[test]
    fn links_verify_only_for_their_job_and_time() {
        let keys = Keys::new("s3cret", "http://h:1/");
        let (url, exp) = keys.download_link("job-1");
        assert!(url.starts_with("http://h:1/api/exports/job-1/download?expires="));
        let sig = url.rsplit("signature=").next().unwrap();
        assert!(keys.check_link("job-1", exp, sig));
        assert!(!keys.check_link("job-2", exp, sig));
        assert!(!keys.check_link("job-1", exp + 1, sig));
        assert!(!keys.check_link("job-1", now_secs() - 1, sig));
    }
}
