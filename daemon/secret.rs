//! Secrets: master provider keys and the virtual keys handed to agents.
//!
//! Invariant: a secret's text is reachable only through [`Secret::expose`]; `Debug` prints
//! `***`, and the bytes are zeroed when the value is dropped. Virtual keys are kept only as
//! SHA-256 hashes ([`KeyHash`]) and compared in constant time.

use std::fmt;

use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};

/// Every virtual key starts with this; the `sk-` keeps clients that check for it happy.
pub const VIRTUAL_KEY_PREFIX: &str = "sk-capit-";

/// Random base62 characters after the prefix: 43 of them carry about 256 bits.
const VIRTUAL_KEY_RANDOM_CHARS: usize = 43;

pub const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A secret string (a master key or a freshly minted virtual key).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: String) -> Self {
        Secret(text)
    }

    /// The secret itself: call this only where it leaves for the upstream or, once, for the user.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The secret without surrounding whitespace (as pasted), itself a `Secret`, so that no plain
    /// copy is made on the way.
    pub fn trimmed(&self) -> Secret {
        Secret(self.0.trim().to_string())
    }

    /// What may be shown of a secret: at most a 4-character prefix and the last 4 characters.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A secret is stored as its text, in the 0600 database only (master keys, the provider keys
/// capit makes for grants); nothing else serialises one.
impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        // Zeroes the whole allocation (spare capacity too), in a way the compiler keeps.
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// Shows a 4-character prefix and the last 4 characters of a long secret, less of a short one,
/// so that a person can tell keys apart without the secret being recoverable.
pub fn fingerprint(text: &str) -> String {
    // Walks the text without copying it: only the shown characters are ever copied.
    let count = text.chars().count();
    let tail_from = |n: usize| text.char_indices().nth(count - n).map_or("", |(at, _)| &text[at..]);
    if count >= 16 {
        let head_end = text.char_indices().nth(4).map_or(text.len(), |(at, _)| at);
        format!("{}…{}", &text[..head_end], tail_from(4))
    } else {
        format!("…{}", if count / 4 == 0 { "" } else { tail_from(count / 4) })
    }
}

/// The SHA-256 hash of a virtual key: the only form in which the daemon keeps it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

impl KeyHash {
    pub fn of(key: &str) -> KeyHash {
        let digest = digest::digest(&digest::SHA256, key.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        KeyHash(out)
    }

    /// Constant-time equality, so that a comparison does not leak where two hashes differ.
    pub fn ct_eq(&self, other: &KeyHash) -> bool {
        let mut diff = 0u8;
        for (a, b) in self.0.iter().zip(other.0.iter()) {
            diff |= a ^ b;
        }
        diff == 0
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RandomError;

/// Mints a new virtual key: the prefix and 43 uniformly random base62 characters.
pub fn generate_virtual_key() -> Result<Secret, RandomError> {
    random_token(VIRTUAL_KEY_PREFIX, VIRTUAL_KEY_RANDOM_CHARS, BASE62)
}

/// `prefix` followed by `chars` characters drawn uniformly from `alphabet` (at most 64 symbols).
pub fn random_token(prefix: &str, chars: usize, alphabet: &[u8]) -> Result<Secret, RandomError> {
    let rng = SystemRandom::new();
    let mut key = String::with_capacity(prefix.len() + chars);
    key.push_str(prefix);
    // Rejection sampling: only bytes below the largest multiple of the alphabet's size are used,
    // so each accepted byte maps onto the alphabet uniformly.
    let accept = (256 / alphabet.len()) * alphabet.len();
    let mut buf = [0u8; 64];
    while key.len() < prefix.len() + chars {
        rng.fill(&mut buf).map_err(|_| RandomError)?;
        for &byte in &buf {
            if (byte as usize) < accept && key.len() < prefix.len() + chars {
                key.push(alphabet[byte as usize % alphabet.len()] as char);
            }
        }
    }
    Ok(Secret::new(key))
}

/// True when `text` has the shape of a capit virtual key.
pub fn looks_like_virtual_key(text: &str) -> bool {
    text.strip_prefix(VIRTUAL_KEY_PREFIX).is_some_and(|rest| rest.len() >= 32 && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_keys_have_the_contract_shape_and_differ() {
        let a = generate_virtual_key().unwrap();
        let b = generate_virtual_key().unwrap();
        assert!(looks_like_virtual_key(a.expose()), "{}", a.expose());
        assert_eq!(a.expose().len(), VIRTUAL_KEY_PREFIX.len() + 43);
        assert_ne!(a, b);
    }

    #[test]
    fn fingerprints_hide_the_middle() {
        assert_eq!(fingerprint("sk-proj-abcdefghijklmnopWXYZ"), "sk-p…WXYZ");
        assert_eq!(fingerprint("short-key"), "…ey");
        assert_eq!(fingerprint(""), "…");
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let s = Secret::new("sk-very-secret".into());
        assert_eq!(format!("{s:?}"), "***");
    }

    #[test]
    fn hashes_compare_in_constant_time() {
        let a = KeyHash::of("sk-capit-a");
        assert!(a.ct_eq(&KeyHash::of("sk-capit-a")));
        assert!(!a.ct_eq(&KeyHash::of("sk-capit-b")));
    }
}
