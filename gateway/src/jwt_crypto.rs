//! The cryptography behind `jsonwebtoken`, on ring: the crate's own
//! providers are aws-lc-rs (a C build) or RustCrypto (whose `rsa` carries
//! RUSTSEC-2023-0071 with no fix), while ring is already here for rustls.
//!
//! Verification only of asymmetric signatures: ES256, ES384 (P-256/P-384,
//! fixed-size signatures as JWS uses), RS256/384/512, PS256/384/512 and
//! EdDSA (Ed25519). HMAC is refused: the gateway verifies with public keys
//! from a JWKS file, never with a shared secret. Signing (ES256 and ES384
//! only) exists for tests that mint tokens.

use jsonwebtoken::crypto::{CryptoProvider, JwkUtils, JwtSigner, JwtVerifier};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::jwk::ThumbprintHash;
use jsonwebtoken::signature::{self, Signer, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::signature as sig;

/// Installs the ring provider for this process (again is a no-op).
pub fn install() {
    let _ = PROVIDER.install_default();
}

static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    jwk_utils: JwkUtils {
        extract_rsa_public_key_components: |_| {
            Err(ErrorKind::InvalidRsaKey("private RSA keys are not handled here".into()).into())
        },
        extract_ec_public_key_coordinates: |_, _| Err(ErrorKind::InvalidEcdsaKey.into()),
        compute_digest,
    },
};

fn compute_digest(data: &[u8], hash: ThumbprintHash) -> Vec<u8> {
    let algorithm = match hash {
        ThumbprintHash::SHA256 => &ring::digest::SHA256,
        ThumbprintHash::SHA384 => &ring::digest::SHA384,
        ThumbprintHash::SHA512 => &ring::digest::SHA512,
    };
    ring::digest::digest(algorithm, data).as_ref().to_vec()
}

/// One algorithm's public-key check.
struct RingVerifier {
    algorithm: Algorithm,
    key: DecodingKey,
    check: Check,
}

enum Check {
    /// ECDSA and EdDSA: the key is the raw public point.
    Raw(&'static dyn sig::VerificationAlgorithm),
    Rsa(&'static sig::RsaParameters),
}

fn new_verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    let (family, check) = match algorithm {
        Algorithm::ES256 => (
            AlgorithmFamily::Ec,
            Check::Raw(&sig::ECDSA_P256_SHA256_FIXED),
        ),
        Algorithm::ES384 => (
            AlgorithmFamily::Ec,
            Check::Raw(&sig::ECDSA_P384_SHA384_FIXED),
        ),
        Algorithm::EdDSA => (AlgorithmFamily::Ed, Check::Raw(&sig::ED25519)),
        Algorithm::RS256 => (
            AlgorithmFamily::Rsa,
            Check::Rsa(&sig::RSA_PKCS1_2048_8192_SHA256),
        ),
        Algorithm::RS384 => (
            AlgorithmFamily::Rsa,
            Check::Rsa(&sig::RSA_PKCS1_2048_8192_SHA384),
        ),
        Algorithm::RS512 => (
            AlgorithmFamily::Rsa,
            Check::Rsa(&sig::RSA_PKCS1_2048_8192_SHA512),
        ),
        Algorithm::PS256 => (
            AlgorithmFamily::Rsa,
            Check::Rsa(&sig::RSA_PSS_2048_8192_SHA256),
        ),
        Algorithm::PS384 => (
            AlgorithmFamily::Rsa,
            Check::Rsa(&sig::RSA_PSS_2048_8192_SHA384),
        ),
        Algorithm::PS512 => (
            AlgorithmFamily::Rsa,
            Check::Rsa(&sig::RSA_PSS_2048_8192_SHA512),
        ),
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            return Err(ErrorKind::InvalidAlgorithm.into())
        }
    };
    if key.family() != family {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(Box::new(RingVerifier {
        algorithm: *algorithm,
        key: key.clone(),
        check,
    }))
}

impl Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        let checked = match (&self.check, self.key.kind()) {
            (Check::Raw(algorithm), DecodingKeyKind::SecretOrDer(public)) => {
                sig::UnparsedPublicKey::new(*algorithm, public).verify(msg, signature)
            }
            (Check::Rsa(parameters), DecodingKeyKind::RsaModulusExponent { n, e }) => {
                sig::RsaPublicKeyComponents { n, e }.verify(parameters, msg, signature)
            }
            (Check::Rsa(parameters), DecodingKeyKind::SecretOrDer(der)) => {
                sig::UnparsedPublicKey::new(*parameters, der).verify(msg, signature)
            }
            (Check::Raw(_), DecodingKeyKind::RsaModulusExponent { .. }) => {
                return Err(signature::Error::new())
            }
        };
        checked.map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

/// ES256/ES384 signing from a PKCS#8 key, for tests that mint tokens.
struct RingSigner {
    algorithm: Algorithm,
    pair: sig::EcdsaKeyPair,
}

fn new_signer(algorithm: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    let signing = match algorithm {
        Algorithm::ES256 => &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
        Algorithm::ES384 => &sig::ECDSA_P384_SHA384_FIXED_SIGNING,
        _ => return Err(ErrorKind::InvalidAlgorithm.into()),
    };
    if key.family() != AlgorithmFamily::Ec {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    let rng = ring::rand::SystemRandom::new();
    let pair = sig::EcdsaKeyPair::from_pkcs8(signing, key.inner(), &rng)
        .map_err(|_| Error::from(ErrorKind::InvalidEcdsaKey))?;
    Ok(Box::new(RingSigner {
        algorithm: *algorithm,
        pair,
    }))
}

impl Signer<Vec<u8>> for RingSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let rng = ring::rand::SystemRandom::new();
        self.pair
            .sign(&rng, msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| signature::Error::new())
    }
}

impl JwtSigner for RingSigner {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_is_refused_and_a_key_of_another_family_too() {
        install();
        let secret = DecodingKey::from_secret(b"shared");
        assert!(new_verifier(&Algorithm::HS256, &secret).is_err());
        assert!(new_verifier(&Algorithm::ES256, &secret).is_err());
    }
}
