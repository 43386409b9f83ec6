//! The state's part in provider-side caps and access requests: management keys, each grant's
//! provider key, and the lookups the proxy needs for them. The calls to the provider are
//! `backstop::service`'s; what is here changes memory and the store, committing first.

use std::sync::Arc;

use super::{GrantSlot, MasterKey, State, StateError, Upstream, provider_key_text};
use crate::backstop::ProviderKey;
use crate::grants::GrantId;
use crate::keyring::management_seal_name;
use crate::providers::ProviderKind;
use crate::secret::{KeyHash, Secret};
use crate::store::WriteOp;

impl State {
    /// Sets how access requests are bounded and announced (at start, before serving).
    pub fn with_access(mut self, config: crate::access::AccessConfig) -> State {
        self.access = crate::access::AccessRequests::new(config);
        self
    }

    pub fn access(&self) -> &crate::access::AccessRequests {
        &self.access
    }

    /// This database's random id, which names the provider keys it makes.
    pub fn installation_id(&self) -> &str {
        &self.installation_id
    }

    /// Stores the key that manages `provider`'s keys (OpenRouter's management key); the caller
    /// has checked it with the provider.
    pub async fn add_management_key(&self, provider: &str, secret: &Secret) -> Result<(String, i64), StateError> {
        let secret = provider_key_text(secret)?;
        let _admin = self.admin.lock().await;
        match self.read().providers.get(provider) {
            None => return Err(StateError::UnknownProvider(provider.to_string())),
            Some(p) if p.kind != ProviderKind::OpenRouter => {
                return Err(StateError::Invalid(format!("only OpenRouter has management keys; {provider:?} is of kind {}", p.kind)));
            }
            Some(_) => {}
        }
        let added_at = self.clock.now_seconds();
        // Sealed like a master key, under its own name so neither opens as the other.
        let stored = self.stored_key(&management_seal_name(provider), &secret, added_at)?;
        let sealed = stored.sealed.is_some();
        self.store.write(WriteOp::PutManagementKey { provider: provider.to_string(), key: stored }).await?;
        let fingerprint = secret.fingerprint();
        self.write().management_keys.insert(provider.to_string(), MasterKey { secret: Arc::new(secret), added_at, sealed });
        Ok((fingerprint, added_at))
    }

    /// Forgets a management key, unless grants still hold keys only it can change or delete.
    pub async fn remove_management_key(&self, provider: &str) -> Result<(), StateError> {
        let _admin = self.admin.lock().await;
        if !self.read().management_keys.contains_key(provider) {
            return Err(StateError::Invalid(format!("no management key is stored for {provider:?}")));
        }
        let holding: Vec<String> = self
            .all_slots()
            .iter()
            .filter_map(|slot| {
                let live = slot.lock();
                (live.grant.provider == provider && live.grant.provider_key.is_some()).then(|| live.grant.name.clone())
            })
            .collect();
        if !holding.is_empty() {
            return Err(StateError::Invalid(format!(
                "grants {} hold {provider} keys that only the management key can change or delete; revoke them first",
                holding.join(", ")
            )));
        }
        self.store.write(WriteOp::DeleteManagementKey { provider: provider.to_string() }).await?;
        self.write().management_keys.remove(provider);
        Ok(())
    }

    pub fn management_key(&self, provider: &str) -> Option<Arc<Secret>> {
        self.read().management_keys.get(provider).map(|k| k.secret.clone())
    }

    /// (provider, fingerprint, added_at, sealed in the keyring) of every stored management key.
    pub fn list_management_keys(&self) -> Vec<(String, String, i64, bool)> {
        self.read().management_keys.iter().map(|(p, k)| (p.clone(), k.secret.fingerprint(), k.added_at, k.sealed)).collect()
    }

    /// Every grant, revoked ones included.
    pub fn all_slots(&self) -> Vec<Arc<GrantSlot>> {
        self.read().grants.values().cloned().collect()
    }

    pub fn slot(&self, id: GrantId) -> Option<Arc<GrantSlot>> {
        self.read().grants.get(&id).cloned()
    }

    /// The provider and the key to forward a grant's request with: the grant's own provider key
    /// when it has one, else the provider's master key.
    pub fn upstream_for(&self, slot: &GrantSlot, provider: &str) -> Result<Upstream, StateError> {
        let own = slot.lock().grant.provider_key.as_ref().map(|k| Arc::new(k.secret.clone()));
        match own {
            Some(key) => {
                let provider = self.provider(provider).ok_or_else(|| StateError::UnknownProvider(provider.to_string()))?;
                Ok(Upstream { provider, key })
            }
            None => self.upstream(provider),
        }
    }

    /// The live grant a presented virtual key belongs to, whatever its provider.
    pub fn find_by_key(&self, presented: &str) -> Option<Arc<GrantSlot>> {
        let hash = KeyHash::of(presented);
        let registry = self.read();
        let slot = registry.grants.get(registry.by_hash.get(&hash)?)?;
        slot.lock().grant.key_hash.ct_eq(&hash).then(|| slot.clone())
    }

    /// Replaces (or, with `None`, forgets) a grant's provider key, revoked grants included: the
    /// record of what is still to be deleted on the provider's side goes with it.
    pub async fn set_provider_key(&self, id: GrantId, key: Option<ProviderKey>) -> Result<(), StateError> {
        let _admin = self.admin.lock().await;
        let slot = self.slot(id).ok_or_else(|| StateError::UnknownGrant(format!("#{}", id.0)))?;
        let mut grant = slot.grant();
        grant.provider_key = key.map(Box::new);
        self.store.write(WriteOp::PutGrant(grant.clone())).await?;
        slot.lock().grant = grant;
        Ok(())
    }
}
