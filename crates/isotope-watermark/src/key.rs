//! Watermark keys and the keyed PRF built on them.
//!
//! The PRF is keyed BLAKE3 (a reviewed keyed hash and XOF), with a domain-separation
//! label per use so that values derived for one scheme never coincide with another's.
//! Per-window PRF outputs seed ChaCha8 keystreams ([`crate::prf`]) when a value per
//! vocabulary entry is needed: one keyed hash per window, not one per token.

use zeroize::{Zeroize, ZeroizeOnDrop};

/// Key-file and key-format errors, worded for the user who has to fix the file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// The file holds no `secret` / hex key line.
    #[error("no watermark key found (expected a line `secret = <64 hex digits>`)")]
    Missing,
    /// The secret is not 64 hexadecimal digits.
    #[error("watermark key must be 64 hexadecimal digits (32 bytes), got {0} characters")]
    BadLength(usize),
    /// Not hexadecimal.
    #[error("watermark key is not hexadecimal")]
    NotHex,
    /// `key_id` in the file does not match the secret (edited or mixed-up file).
    #[error("key_id {stated} does not match the secret (its id is {actual})")]
    IdMismatch {
        /// What the file says.
        stated: String,
        /// What the secret derives.
        actual: String,
    },
    /// The operating system's random source failed.
    #[error("cannot read the system random source: {0}")]
    Random(String),
}

/// A 32-byte watermark secret. Never printed: `Debug` shows the key id only, and the
/// bytes are wiped when dropped.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct WatermarkKey {
    secret: [u8; 32],
    #[zeroize(skip)]
    id: String,
}

impl std::fmt::Debug for WatermarkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatermarkKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl PartialEq for WatermarkKey {
    fn eq(&self, other: &Self) -> bool {
        // Constant-time comparison through BLAKE3's hash equality.
        blake3::Hash::from(self.secret) == blake3::Hash::from(other.secret)
    }
}

impl Eq for WatermarkKey {}

impl WatermarkKey {
    /// A key from its 32 secret bytes.
    pub fn from_bytes(secret: [u8; 32]) -> Self {
        let id = key_id(&secret);
        Self { secret, id }
    }

    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Self, KeyError> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self::from_bytes(secret))
    }

    /// Parse 64 hex digits.
    pub fn from_hex(hex: &str) -> Result<Self, KeyError> {
        let hex = hex.trim();
        if hex.len() != 64 {
            return Err(KeyError::BadLength(hex.len()));
        }
        let mut secret = [0u8; 32];
        hex::decode_to_slice(hex, &mut secret).map_err(|_| KeyError::NotHex)?;
        Ok(Self::from_bytes(secret))
    }

    /// Parse a key file: either the format [`Self::to_file_string`] writes
    /// (`key_id = …`, `secret = …`, `#` comments), or a bare line of 64 hex digits.
    pub fn parse_file(text: &str) -> Result<Self, KeyError> {
        let mut stated_id = None;
        let mut secret = None;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once('=') {
                Some((k, v)) => {
                    let v = v.trim().trim_matches('"');
                    match k.trim() {
                        "key_id" => stated_id = Some(v.to_owned()),
                        "secret" => secret = Some(v.to_owned()),
                        _ => {}
                    }
                }
                None if secret.is_none() => secret = Some(line.to_owned()),
                None => {}
            }
        }
        let key = Self::from_hex(&secret.ok_or(KeyError::Missing)?)?;
        if let Some(stated) = stated_id {
            if stated != key.id {
                return Err(KeyError::IdMismatch {
                    stated,
                    actual: key.id.clone(),
                });
            }
        }
        Ok(key)
    }

    /// The key-file text: a comment, the key id and the secret in hex.
    pub fn to_file_string(&self) -> String {
        format!(
            "# isotope watermark key: keep it secret (file mode 0600)\nkey_id = {}\nsecret = {}\n",
            self.id,
            hex::encode(self.secret)
        )
    }

    /// Public identifier derived from the secret (`wk_` + 16 hex digits). Safe to log.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A commitment to the key (BLAKE3 of a domain-separated derivation) that a third
    /// party can later check against a revealed key; reveals nothing about it.
    pub fn commitment(&self) -> String {
        blake3::derive_key("isotope 2026 watermark key commitment", &self.secret)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Keyed PRF: 32 bytes from `label` and the token ids in `tokens`.
    pub(crate) fn prf(&self, label: &[u8], tokens: &[u32]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.secret);
        h.update(&(label.len() as u32).to_le_bytes());
        h.update(label);
        h.update(&(tokens.len() as u32).to_le_bytes());
        for t in tokens {
            h.update(&t.to_le_bytes());
        }
        *h.finalize().as_bytes()
    }
}

fn key_id(secret: &[u8; 32]) -> String {
    let d = blake3::derive_key("isotope 2026 watermark key id", secret);
    format!("wk_{}", hex::encode(&d[..8]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trip_and_bare_hex() {
        let k = WatermarkKey::from_bytes([7; 32]);
        let text = k.to_file_string();
        assert_eq!(WatermarkKey::parse_file(&text).unwrap(), k);
        assert_eq!(
            WatermarkKey::parse_file(&hex::encode([7u8; 32])).unwrap(),
            k
        );
        assert!(k.id().starts_with("wk_") && k.id().len() == 19);
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let k = WatermarkKey::from_bytes([0xab; 32]);
        let dbg = format!("{k:?}");
        assert!(!dbg.contains("abab"), "{dbg}");
        assert!(dbg.contains(k.id()));
    }

    #[test]
    fn bad_files_are_clear_errors() {
        assert_eq!(
            WatermarkKey::parse_file("# nothing\n"),
            Err(KeyError::Missing)
        );
        assert_eq!(WatermarkKey::parse_file("abc"), Err(KeyError::BadLength(3)));
        assert_eq!(
            WatermarkKey::parse_file(&"zz".repeat(32)),
            Err(KeyError::NotHex)
        );
        let k = WatermarkKey::from_bytes([1; 32]);
        let tampered = k.to_file_string().replace(k.id(), "wk_0000000000000000");
        assert!(matches!(
            WatermarkKey::parse_file(&tampered),
            Err(KeyError::IdMismatch { .. })
        ));
    }

    #[test]
    fn generated_keys_differ_and_prf_is_domain_separated() {
        let a = WatermarkKey::generate().unwrap();
        let b = WatermarkKey::generate().unwrap();
        assert_ne!(a, b);
        assert_ne!(a.prf(b"x", &[1, 2]), a.prf(b"y", &[1, 2]));
        assert_ne!(a.prf(b"x", &[1, 2]), a.prf(b"x", &[2, 1]));
        assert_ne!(a.prf(b"x", &[1, 2]), b.prf(b"x", &[1, 2]));
        assert_eq!(a.prf(b"x", &[1, 2]), a.prf(b"x", &[1, 2]));
    }
}
