//! Master keys at rest: sealed (ChaCha20-Poly1305) under a 256-bit data key that lives in the
//! OS keyring (Secret Service on Linux, the login Keychain on macOS), one per database. The
//! database then holds only ciphertext, so a backup or a sync of the data dir carries no usable
//! key. Where no keyring can be reached, keys are stored as text in the 0600 database, and
//! `capitctl status` and `key ls` say so.
//!
//! Invariants: a key sealed for one provider opens only as that provider's (the provider name
//! is the AEAD's associated data); the data key and every opened key are zeroed when dropped.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::secret::Secret;

/// Where master keys are kept at rest, as the user chose it (`--key-storage`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyStorage {
    /// The keyring where one is reachable, else the database as text.
    Auto,
    /// The keyring, or capitd does not start.
    Keyring,
    /// The database as text (0600), never the keyring.
    File,
}

impl KeyStorage {
    pub fn parse(text: &str) -> Option<KeyStorage> {
        Some(match text {
            "auto" => KeyStorage::Auto,
            "keyring" => KeyStorage::Keyring,
            "file" => KeyStorage::File,
            _ => return None,
        })
    }
}

/// The name of the keyring this platform has, for messages.
pub const KEYRING_NAME: &str = if cfg!(target_os = "macos") { "the macOS Keychain" } else { "the Secret Service (D-Bus)" };

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("{KEYRING_NAME} cannot be used: {0}")]
    Unavailable(String),
    #[error("the data key in {KEYRING_NAME} is malformed")]
    Malformed,
    #[error("the master key for {0} does not open with the data key in {KEYRING_NAME} (was the keyring entry replaced?)")]
    WrongKey(String),
    #[error("the system random number generator failed")]
    Random,
}

/// A master key sealed for the database, as stored: hex nonce and ciphertext with its tag.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SealedKey {
    pub nonce: String,
    pub ciphertext: String,
}

/// The data key, fetched from the keyring once at start.
pub struct Sealer {
    key: Zeroizing<[u8; 32]>,
}

fn aad(provider: &str) -> Vec<u8> {
    let mut aad = b"capit master key for ".to_vec();
    aad.extend_from_slice(provider.as_bytes());
    aad
}

fn aead(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).expect("a 32-byte key is what ChaCha20-Poly1305 takes"))
}

impl Sealer {
    /// Seals `secret` as `provider`'s master key.
    pub fn seal(&self, provider: &str, secret: &Secret) -> Result<SealedKey, KeyringError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| KeyringError::Random)?;
        let mut buffer = Zeroizing::new(secret.expose().as_bytes().to_vec());
        aead(&self.key)
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad(provider)), &mut *buffer)
            .map_err(|_| KeyringError::Random)?;
        Ok(SealedKey { nonce: hex(&nonce), ciphertext: hex(&buffer) })
    }

    /// Opens `provider`'s sealed master key.
    pub fn open(&self, provider: &str, sealed: &SealedKey) -> Result<Zeroizing<String>, KeyringError> {
        let wrong = || KeyringError::WrongKey(provider.to_string());
        let nonce: [u8; NONCE_LEN] = unhex(&sealed.nonce).and_then(|n| n.try_into().ok()).ok_or_else(wrong)?;
        let mut buffer = unhex(&sealed.ciphertext).ok_or_else(wrong)?;
        let len = aead(&self.key)
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad(provider)), &mut buffer)
            .map_err(|_| wrong())?
            .len();
        buffer.truncate(len);
        // The buffer becomes the secret's own storage: no copy of the text is left behind.
        String::from_utf8(buffer).map(Zeroizing::new).map_err(|e| {
            drop(Zeroizing::new(e.into_bytes()));
            wrong()
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// How master keys are kept at rest in this run.
pub struct KeyProtection {
    /// The data key, when keys are sealed under the keyring.
    pub sealer: Option<Sealer>,
    /// A sentence for `capitctl status`: where keys are, and why there.
    pub detail: String,
}

impl KeyProtection {
    pub fn at_rest(&self) -> &'static str {
        if self.sealer.is_some() { "keyring" } else { "file" }
    }
}

/// The name a management key is sealed under (its associated data), apart from the provider's
/// master key.
pub fn management_seal_name(provider: &str) -> String {
    format!("{provider} (management)")
}

/// Decides at start how master keys are kept, per `storage`: opens the sealed ones in `keys`
/// and `management` (which then hold their text, in memory only), and seals any kept as text
/// when the keyring is to be used, rewriting them in one transaction. A sealed key that cannot
/// be opened stops the start: capitd never runs with keys it cannot use, nor silently forgets
/// them. Blocking.
pub fn protect_at_rest(
    database: &std::path::Path,
    storage: KeyStorage,
    store: &crate::store::Store,
    keys: &mut [(String, crate::store::StoredKey)],
    management: &mut [(String, crate::store::StoredKey)],
) -> Result<KeyProtection, KeyringError> {
    let has_sealed = keys.iter().chain(management.iter()).any(|(_, k)| k.sealed.is_some());
    let fetched = if storage == KeyStorage::File && !has_sealed { Ok(None) } else { sealer(database, storage != KeyStorage::File) };
    let (sealer, why_not) = match fetched {
        Ok(Some(sealer)) => (Some(sealer), String::new()),
        Ok(None) if storage == KeyStorage::File => (None, "--key-storage file".to_string()),
        Ok(None) => (None, format!("{KEYRING_NAME} has no data key for this database")),
        Err(e) if storage == KeyStorage::Auto && !has_sealed => (None, e.to_string()),
        Err(e) if has_sealed => {
            return Err(KeyringError::Unavailable(format!(
                "the master keys in this database are sealed under it, and it cannot be reached ({e}); start capitd in the session that holds the keyring"
            )));
        }
        Err(e) => return Err(e),
    };
    let Some(sealer) = sealer else {
        if has_sealed {
            return Err(KeyringError::Unavailable(format!("the master keys are sealed under it, but {why_not}")));
        }
        let detail = format!("master keys are stored as text in the 0600 database ({why_not})");
        return Ok(KeyProtection { sealer: None, detail });
    };
    let named = |provider: &str, is_management: bool| if is_management { management_seal_name(provider) } else { provider.to_string() };
    for (is_management, list) in [(false, &mut *keys), (true, &mut *management)] {
        for (provider, key) in list.iter_mut() {
            if let Some(sealed) = &key.sealed {
                key.secret = Some(sealer.open(&named(provider, is_management), sealed)?);
            }
        }
    }
    if storage == KeyStorage::File {
        let detail = "master keys are stored as text in the 0600 database (--key-storage file)".to_string();
        return Ok(KeyProtection { sealer: None, detail });
    }
    let mut rewrites = Vec::new();
    for (is_management, list) in [(false, &mut *keys), (true, &mut *management)] {
        for (provider, key) in list.iter_mut().filter(|(_, k)| k.sealed.is_none()) {
            let text = key.secret.clone().unwrap_or_default();
            key.sealed = Some(sealer.seal(&named(provider, is_management), &Secret::new(text.to_string()))?);
            let stored = crate::store::StoredKey { secret: None, sealed: key.sealed.clone(), added_at: key.added_at };
            let provider = provider.clone();
            rewrites.push(if is_management {
                crate::store::WriteOp::PutManagementKey { provider, key: stored }
            } else {
                crate::store::WriteOp::PutKey { provider, key: stored }
            });
        }
    }
    if !rewrites.is_empty() {
        store.apply_now(&rewrites).map_err(|e| KeyringError::Unavailable(format!("sealing the stored keys: {e}")))?;
        tracing::info!(keys = rewrites.len(), "sealed the master keys stored as text under {KEYRING_NAME}");
    }
    let detail = format!("master keys are sealed under a data key in {KEYRING_NAME}");
    Ok(KeyProtection { sealer: Some(sealer), detail })
}

/// The keyring entry's name: one data key per database, so several daemons (tests, users with
/// several homes) never share one.
fn account(database: &std::path::Path) -> String {
    let path = std::fs::canonicalize(database).unwrap_or_else(|_| database.to_path_buf());
    format!("data key for {}", path.display())
}

/// Fetches the data key for `database` from the keyring, creating it there when it has none
/// and `create` is set. Blocking (D-Bus or Keychain round trips, and possibly an unlock prompt).
pub fn sealer(database: &std::path::Path, create: bool) -> Result<Option<Sealer>, KeyringError> {
    let account = account(database);
    let text = match os::get(&account)? {
        Some(text) => text,
        None if !create => return Ok(None),
        None => {
            let mut key = Zeroizing::new([0u8; 32]);
            SystemRandom::new().fill(&mut *key).map_err(|_| KeyringError::Random)?;
            os::set(&account, &Zeroizing::new(hex(&*key)))?;
            // Read back what the keyring kept: a key it did not keep must never seal anything.
            os::get(&account)?.ok_or_else(|| KeyringError::Unavailable("it did not keep the data key written to it".into()))?
        }
    };
    let bytes = Zeroizing::new(unhex(text.trim()).ok_or(KeyringError::Malformed)?);
    let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| KeyringError::Malformed)?;
    Ok(Some(Sealer { key: Zeroizing::new(key) }))
}

#[cfg(target_os = "linux")]
mod os {
    use std::collections::HashMap;

    use dbus_secret_service::{EncryptionType, Error, SecretService};
    use zeroize::Zeroizing;

    use super::KeyringError;

    /// Seconds an unlock prompt may wait for the user before the keyring counts as unavailable.
    const PROMPT_SECONDS: u64 = 60;

    fn unavailable(e: Error) -> KeyringError {
        KeyringError::Unavailable(e.to_string())
    }

    fn attributes(account: &str) -> HashMap<&str, &str> {
        HashMap::from([("application", "capit"), ("capit-account", account)])
    }

    // The "plain" session: the data key crosses the session bus unencrypted, which only the
    // user's own processes can watch, and they can read capitd's memory as well.
    fn connect() -> Result<SecretService, KeyringError> {
        SecretService::connect_with_max_prompt_timeout(EncryptionType::Plain, PROMPT_SECONDS).map_err(unavailable)
    }

    pub fn get(account: &str) -> Result<Option<Zeroizing<String>>, KeyringError> {
        let service = connect()?;
        let found = service.search_items(attributes(account)).map_err(unavailable)?;
        if !found.locked.is_empty() {
            service.unlock_all(&found.locked.iter().collect::<Vec<_>>()).map_err(unavailable)?;
        }
        let Some(item) = found.unlocked.first().or(found.locked.first()) else {
            return Ok(None);
        };
        let secret = Zeroizing::new(item.get_secret().map_err(unavailable)?);
        String::from_utf8(secret.to_vec()).map(|s| Some(Zeroizing::new(s))).map_err(|_| KeyringError::Malformed)
    }

    pub fn set(account: &str, text: &str) -> Result<(), KeyringError> {
        let service = connect()?;
        // The default collection persists (the login keyring); a session collection would
        // forget the data key, and with it every sealed master key, at logout.
        let collection = service.get_default_collection().map_err(|e| match e {
            Error::NoResult => KeyringError::Unavailable("it has no default (login) collection".into()),
            other => unavailable(other),
        })?;
        collection.ensure_unlocked().map_err(unavailable)?;
        let label = format!("capit: {account}");
        collection.create_item(&label, attributes(account), text.as_bytes(), true, "text/plain").map_err(unavailable)?;
        Ok(())
    }
}

#[cfg(target_os = "macos")]
mod os {
    use security_framework::passwords::{get_generic_password, set_generic_password};
    use zeroize::Zeroizing;

    use super::KeyringError;

    const SERVICE: &str = "capit";
    /// errSecItemNotFound.
    const NOT_FOUND: i32 = -25300;

    pub fn get(account: &str) -> Result<Option<Zeroizing<String>>, KeyringError> {
        match get_generic_password(SERVICE, account) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                String::from_utf8(bytes.to_vec()).map(|s| Some(Zeroizing::new(s))).map_err(|_| KeyringError::Malformed)
            }
            Err(e) if e.code() == NOT_FOUND => Ok(None),
            Err(e) => Err(KeyringError::Unavailable(e.to_string())),
        }
    }

    pub fn set(account: &str, text: &str) -> Result<(), KeyringError> {
        set_generic_password(SERVICE, account, text.as_bytes()).map_err(|e| KeyringError::Unavailable(e.to_string()))
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
mod os {
    use zeroize::Zeroizing;

    use super::KeyringError;

    pub fn get(_account: &str) -> Result<Option<Zeroizing<String>>, KeyringError> {
        Err(KeyringError::Unavailable("no keyring is supported on this system".into()))
    }

    pub fn set(_account: &str, _text: &str) -> Result<(), KeyringError> {
        Err(KeyringError::Unavailable("no keyring is supported on this system".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> Sealer {
        Sealer { key: Zeroizing::new([7u8; 32]) }
    }

    #[test]
    fn a_sealed_key_opens_only_as_its_own_provider_and_under_its_own_data_key() {
        let secret = Secret::new("sk-proj-MASTERkey0123456789abcdefWXYZ".into());
        let sealed = sealer().seal("openai", &secret).unwrap();
        assert!(!sealed.ciphertext.contains(&hex(b"MASTERkey")), "no plaintext in the sealed form");
        assert_eq!(sealer().open("openai", &sealed).unwrap().as_str(), secret.expose());
        assert!(matches!(sealer().open("anthropic", &sealed), Err(KeyringError::WrongKey(_))));
        let other = Sealer { key: Zeroizing::new([8u8; 32]) };
        assert!(matches!(other.open("openai", &sealed), Err(KeyringError::WrongKey(_))));
        let mut tampered = sealed.clone();
        tampered.ciphertext.replace_range(0..2, if &sealed.ciphertext[0..2] == "00" { "01" } else { "00" });
        assert!(sealer().open("openai", &tampered).is_err());
        assert_ne!(sealer().seal("openai", &secret).unwrap().nonce, sealed.nonce, "a fresh nonce each time");
    }

    #[test]
    fn hex_round_trips_and_refuses_junk() {
        assert_eq!(unhex(&hex(&[0, 1, 254, 255])).unwrap(), vec![0, 1, 254, 255]);
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
        assert!(unhex("é0").is_none());
    }
}
