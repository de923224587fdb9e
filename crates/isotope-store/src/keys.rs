//! API-key tokens and their at-rest form.
//!
//! A token is `isk_<id>_<secret>`: `id` is 12 lowercase base32 characters (the key
//! id is `ik_<id>`, so it can be parsed back out for a primary-key lookup) and
//! `secret` is 32 random bytes in hex. At rest only HMAC-SHA256(pepper, secret) is
//! stored. The secret has 256 bits of entropy, so a fast keyed hash is enough — a
//! slow password hash would cost every request and buy nothing — and the pepper
//! (kept in the `settings` table, or supplied by the operator) means a stolen
//! `api_keys` table alone cannot even confirm a guessed token.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::error::{Result, StoreError};

/// Prefix of every user-facing token.
pub const TOKEN_PREFIX: &str = "isk_";
/// Prefix of every key id.
pub const KEY_ID_PREFIX: &str = "ik_";
const ID_LEN: usize = 12;
const SECRET_LEN: usize = 32;
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// 32 bytes that key the HMAC of every API-key secret.
pub(crate) type Pepper = Zeroizing<[u8; 32]>;

pub(crate) fn random_bytes<const N: usize>() -> Result<Zeroizing<[u8; N]>> {
    let mut buf = Zeroizing::new([0u8; N]);
    getrandom::fill(buf.as_mut())
        .map_err(|e| StoreError::InvalidInput(format!("the OS random source failed: {e}")))?;
    Ok(buf)
}

/// A new token and the parts the store keeps.
pub(crate) struct GeneratedKey {
    pub key_id: String,
    pub token: String,
    pub secret_hash: String,
}

pub(crate) fn generate(pepper: &[u8; 32]) -> Result<GeneratedKey> {
    let id_bytes = random_bytes::<ID_LEN>()?;
    // 256 is a multiple of 32, so `b % 32` is uniform.
    let id: String = id_bytes
        .iter()
        .map(|b| BASE32[usize::from(b % 32)] as char)
        .collect();
    let secret = random_bytes::<SECRET_LEN>()?;
    Ok(GeneratedKey {
        key_id: format!("{KEY_ID_PREFIX}{id}"),
        token: format!("{TOKEN_PREFIX}{id}_{}", hex::encode(secret.as_ref())),
        secret_hash: hex::encode(hash_secret(pepper, secret.as_ref())),
    })
}

/// A token split into the key id to look up and the secret to verify.
pub(crate) struct ParsedToken {
    pub key_id: String,
    pub secret: Zeroizing<Vec<u8>>,
}

/// `None` for anything that is not shaped like a token. The shape is public, so
/// rejecting early leaks nothing.
pub(crate) fn parse(token: &str) -> Option<ParsedToken> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret_hex) = rest.split_once('_')?;
    if id.len() != ID_LEN || !id.bytes().all(|b| BASE32.contains(&b)) {
        return None;
    }
    if secret_hex.len() != 2 * SECRET_LEN {
        return None;
    }
    let secret = Zeroizing::new(hex::decode(secret_hex).ok()?);
    Some(ParsedToken {
        key_id: format!("{KEY_ID_PREFIX}{id}"),
        secret,
    })
}

fn hash_secret(pepper: &[u8; 32], secret: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(pepper).expect("HMAC accepts any key length");
    mac.update(secret);
    mac.finalize().into_bytes().into()
}

/// Whether `secret` hashes to `stored_hex`, in time independent of where they
/// differ. A malformed stored hash never matches but costs the same work.
pub(crate) fn verify(pepper: &[u8; 32], secret: &[u8], stored_hex: &str) -> bool {
    let computed = hash_secret(pepper, secret);
    let mut stored = [0u8; 32];
    let well_formed = hex::decode_to_slice(stored_hex, &mut stored).is_ok();
    bool::from(computed.ct_eq(&stored)) && well_formed
}

/// Stand-in hash compared against when the key id is unknown, so that path does
/// the same HMAC and comparison as a known key.
pub(crate) const DUMMY_HASH: &str =
    "0000000000000000000000000000000000000000000000000000000000000000";

pub(crate) fn pepper_from_hex(hex_str: &str) -> Result<Pepper> {
    let mut pepper = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(hex_str.trim(), pepper.as_mut()).map_err(|_| {
        StoreError::Corrupt("the stored API-key pepper is not 64 hex characters".into())
    })?;
    Ok(pepper)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip() {
        let pepper = [7u8; 32];
        let key = generate(&pepper).unwrap();
        assert!(key.key_id.starts_with("ik_") && key.key_id.len() == 15);
        assert!(key.token.starts_with("isk_") && key.token.len() == 4 + 12 + 1 + 64);
        let parsed = parse(&key.token).unwrap();
        assert_eq!(parsed.key_id, key.key_id);
        assert!(verify(&pepper, &parsed.secret, &key.secret_hash));
        assert!(!verify(&[8u8; 32], &parsed.secret, &key.secret_hash));
        assert!(!verify(&pepper, &parsed.secret, DUMMY_HASH));
        assert!(!verify(&pepper, &parsed.secret, "not hex"));
    }

    #[test]
    fn malformed_tokens_do_not_parse() {
        let good = generate(&[1u8; 32]).unwrap().token;
        for bad in [
            "",
            "isk_",
            "sk-abc",
            &good[..good.len() - 1],
            &format!("{good}0"),
            &good.replace("isk_", "isx_"),
            &format!("isk_ABCDEFGHIJKL_{}", "0".repeat(64)),
            &format!("isk_abcdefghijk1_{}", "0".repeat(64)),
            &format!("isk_abcdefghijkl_{}", "g".repeat(64)),
        ] {
            assert!(parse(bad).is_none(), "{bad:?} parsed");
        }
    }
}
