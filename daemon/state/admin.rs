//! Control-plane changes: master keys, providers, prices and grants. Each is committed to the
//! store before memory shows it, serialised by the state's admin mutex.

use super::*;

/// What an import or update of prices did.
#[derive(Debug)]
pub struct PriceUpdate {
    pub imported: usize,
    /// Entries of other modes or without token prices.
    pub skipped: usize,
    /// Every model whose effective price moved, by name.
    pub changes: Vec<PriceChange>,
}

impl State {
    // ---- master keys ----

    /// Says how master keys are kept at rest from now on (set once, at start).
    pub fn set_key_protection(&self, protection: crate::keyring::KeyProtection) {
        let _ = self.key_protection.set(protection);
    }

    /// Where new master keys go at rest: `("keyring" | "file", a sentence saying why)`.
    pub fn key_storage(&self) -> (&'static str, String) {
        match self.key_protection.get() {
            Some(protection) => (protection.at_rest(), protection.detail.clone()),
            None => ("file", "master keys are stored as text in the 0600 database".into()),
        }
    }

    /// A provider key (or another secret kept like one) as it is stored: sealed under the
    /// keyring's data key when there is one.
    pub(crate) fn stored_key(&self, name: &str, secret: &Secret, added_at: i64) -> Result<StoredKey, StateError> {
        match self.key_protection.get().and_then(|p| p.sealer.as_ref()) {
            Some(sealer) => Ok(StoredKey {
                secret: None,
                sealed: Some(sealer.seal(name, secret).map_err(|e| StateError::Invalid(e.to_string()))?),
                added_at,
            }),
            None => Ok(StoredKey { secret: Some(zeroize::Zeroizing::new(secret.expose().to_string())), sealed: None, added_at }),
        }
    }

    /// Opens a secret stored by [`stored_key`](Self::stored_key) under `name`.
    pub(crate) fn open_stored(&self, name: &str, stored: &StoredKey) -> Result<Secret, StateError> {
        if let Some(text) = &stored.secret {
            return Ok(Secret::new(text.to_string()));
        }
        let (Some(sealed), Some(sealer)) = (&stored.sealed, self.key_protection.get().and_then(|p| p.sealer.as_ref())) else {
            return Err(StateError::Invalid(format!("{name} is sealed under the keyring, which this run cannot use")));
        };
        let text = sealer.open(name, sealed).map_err(|e| StateError::Invalid(e.to_string()))?;
        Ok(Secret::new(text.to_string()))
    }

    pub async fn add_key(&self, provider: &str, secret: Secret) -> Result<(String, i64), StateError> {
        let secret = provider_key_text(&secret)?;
        let _admin = self.admin.lock().await;
        if !self.read().providers.contains_key(provider) {
            return Err(StateError::UnknownProvider(provider.to_string()));
        }
        let added_at = self.clock.now_seconds();
        let stored = self.stored_key(provider, &secret, added_at)?;
        let sealed = stored.sealed.is_some();
        self.store.write(WriteOp::PutKey { provider: provider.to_string(), key: stored }).await?;
        let fingerprint = secret.fingerprint();
        let key = MasterKey { secret: Arc::new(secret), added_at, sealed };
        self.write().keys.insert(provider.to_string(), key);
        Ok((fingerprint, added_at))
    }

    pub async fn remove_key(&self, provider: &str) -> Result<(), StateError> {
        let _admin = self.admin.lock().await;
        if !self.read().keys.contains_key(provider) {
            return Err(StateError::NoKey(provider.to_string()));
        }
        self.store.write(WriteOp::DeleteKey { provider: provider.to_string() }).await?;
        self.write().keys.remove(provider);
        Ok(())
    }

    /// (provider, fingerprint, added_at, sealed in the keyring) of every stored key.
    pub fn list_keys(&self) -> Vec<(String, String, i64, bool)> {
        self.read().keys.iter().map(|(p, k)| (p.clone(), k.secret.fingerprint(), k.added_at, k.sealed)).collect()
    }

    // ---- providers ----

    pub fn list_providers(&self) -> Vec<(Provider, bool)> {
        let registry = self.read();
        registry.providers.values().map(|p| (p.clone(), registry.keys.contains_key(&p.name))).collect()
    }

    pub fn provider(&self, name: &str) -> Option<Provider> {
        self.read().providers.get(name).cloned()
    }

    pub async fn set_provider(&self, name: &str, base_url: Option<&str>, price_zero: Option<bool>) -> Result<Provider, StateError> {
        let _admin = self.admin.lock().await;
        let mut provider = self.provider(name).ok_or_else(|| StateError::UnknownProvider(name.to_string()))?;
        if let Some(url) = base_url {
            provider.base_url = providers::normalize_base_url(url)?;
        }
        if let Some(zero) = price_zero {
            provider.price_zero = zero;
        }
        self.store.write(WriteOp::PutProvider(provider.clone())).await?;
        self.write().providers.insert(name.to_string(), provider.clone());
        Ok(provider)
    }

    pub async fn add_provider(&self, name: &str, kind: &str, base_url: &str, price_zero: bool) -> Result<Provider, StateError> {
        providers::validate_name(name)?;
        let kind = match ProviderKind::parse(kind) {
            Some(ProviderKind::OpenAiCompatible) => ProviderKind::OpenAiCompatible,
            _ => return Err(ProviderError::BadKind(kind.to_string()).into()),
        };
        let base_url = providers::normalize_base_url(base_url)?;
        let _admin = self.admin.lock().await;
        if self.read().providers.contains_key(name) {
            return Err(StateError::ProviderExists(name.to_string()));
        }
        let provider = Provider { name: name.to_string(), kind, base_url, price_zero };
        self.store.write(WriteOp::PutProvider(provider.clone())).await?;
        self.write().providers.insert(name.to_string(), provider.clone());
        Ok(provider)
    }

    // ---- prices ----

    /// Every priced model with the layer its price comes from and, above the built-in rows,
    /// where and when it was set.
    pub fn list_prices(&self) -> Vec<(String, Price, PriceSource, Option<Provenance>)> {
        self.read().prices.entries().into_iter().map(|r| (r.model.to_string(), r.price.clone(), r.source, r.origin.cloned())).collect()
    }

    /// Where the fetched price list came from, if there is one.
    pub fn price_list_origin(&self) -> Option<Provenance> {
        self.read().prices.list_origin().cloned()
    }

    /// The price of `model` (shared: handed to each request and settlement without a copy).
    pub fn price(&self, model: &str) -> Option<Arc<Price>> {
        self.read().prices.lookup(model).map(|(_, price)| price.clone())
    }

    pub async fn set_price(&self, model: &str, price: Price) -> Result<Price, StateError> {
        crate::pricing::validate_model_name(model)?;
        price.validate()?;
        let origin = Provenance { source: "price set".into(), at: self.clock.now_seconds() };
        let _admin = self.admin.lock().await;
        self.store.write(WriteOp::PutPrice { model: model.to_string(), price: price.clone(), origin: origin.clone() }).await?;
        self.write().prices.set_override(model.to_string(), price.clone(), origin);
        Ok(price)
    }

    /// Imports a LiteLLM price file as the user's own prices: every row or none.
    pub async fn import_prices(&self, litellm_json: &str, source: &str) -> Result<PriceUpdate, StateError> {
        let (prices, skipped) = crate::pricing::litellm::parse(litellm_json)?;
        let origin = Provenance { source: format!("import {source}"), at: self.clock.now_seconds() };
        let _admin = self.admin.lock().await;
        let (before, mut after) = {
            let registry = self.read();
            (registry.prices.clone(), registry.prices.clone())
        };
        for (model, price) in &prices {
            after.set_override(model.clone(), price.clone(), origin.clone());
        }
        let changes = before.changes(&after);
        let imported = prices.len();
        self.store.write(WriteOp::PutPrices { prices, origin }).await?;
        self.write().prices = after;
        Ok(PriceUpdate { imported, skipped, changes })
    }

    /// Puts a fetched LiteLLM price list in place of the previous one: every row or none. The
    /// user's own prices stay on top of it.
    pub async fn update_prices(&self, litellm_json: &str, source: &str) -> Result<PriceUpdate, StateError> {
        let (prices, skipped) = crate::pricing::litellm::parse(litellm_json)?;
        let origin = Provenance { source: source.to_string(), at: self.clock.now_seconds() };
        let _admin = self.admin.lock().await;
        let (before, mut after) = {
            let registry = self.read();
            (registry.prices.clone(), registry.prices.clone())
        };
        after.replace_list(prices.iter().cloned().collect(), Some(origin.clone()));
        let changes = before.changes(&after);
        let imported = prices.len();
        self.store.write(WriteOp::ReplacePriceList { prices, origin }).await?;
        self.write().prices = after;
        Ok(PriceUpdate { imported, skipped, changes })
    }

    // ---- grants ----

    /// Checks a new grant as [`create_grant`](Self::create_grant) will, without making it: for
    /// callers that must do something first (make the provider's key) only for a valid grant.
    /// Returns the id the grant will get and its models, cleaned.
    pub fn check_new_grant(&self, spec: &GrantSpec) -> Result<(GrantId, Vec<String>), StateError> {
        self.check_grant(spec, false)
    }

    /// Checks a grant meant to replace the active one of its name, without making it.
    pub fn check_replacement(&self, spec: &GrantSpec) -> Result<(), StateError> {
        self.check_grant(spec, true).map(|_| ())
    }

    /// As `check_new_grant`; with `replace`, an active grant of the same name is no obstacle.
    pub(super) fn check_grant(&self, spec: &GrantSpec, replace: bool) -> Result<(GrantId, Vec<String>), StateError> {
        crate::grants::validate_name(&spec.name)?;
        let now = self.clock.now_seconds();
        if spec.expires_at.is_some_and(|at| at <= now) {
            return Err(GrantError::ExpiryInPast.into());
        }
        let models: Vec<String> = spec.models.iter().map(|m| m.trim().to_string()).filter(|m| !m.is_empty()).collect();
        for model in &models {
            crate::pricing::validate_model_name(model)?;
        }
        if spec.note.len() > 1000 || spec.created_by.len() > 200 {
            return Err(StateError::Invalid("the note must be at most 1000 bytes".into()));
        }
        let registry = self.read();
        if !registry.providers.contains_key(&spec.provider) {
            return Err(StateError::UnknownProvider(spec.provider.clone()));
        }
        if registry.by_name.contains_key(&spec.name) && !replace {
            return Err(StateError::GrantExists(spec.name.clone()));
        }
        Ok((GrantId(registry.next_grant_id), models))
    }

    /// Mints a grant and its virtual key; the key is returned once and only its hash is kept.
    pub async fn create_grant(&self, spec: GrantSpec) -> Result<(GrantView, Secret), StateError> {
        self.mint(spec, false).await.map(|(view, key, _)| (view, key))
    }

    /// Like `create_grant`, but an active grant of the same name is revoked in the same write,
    /// once the new one has passed every check: a bad cap, period or model changes nothing.
    /// Returns the grant replaced, if there was one.
    pub async fn replace_grant(&self, spec: GrantSpec) -> Result<(GrantView, Secret, Option<GrantView>), StateError> {
        self.mint(spec, true).await
    }

    pub(super) async fn mint(&self, spec: GrantSpec, replace: bool) -> Result<(GrantView, Secret, Option<GrantView>), StateError> {
        let now = self.clock.now_seconds();
        let _admin = self.admin.lock().await;
        let (id, models) = self.check_grant(&spec, replace)?;
        let key = secret::generate_virtual_key()?;
        let old = if replace { self.active_slot(&spec.name).ok() } else { None };
        let grant = Grant {
            id,
            name: spec.name,
            provider: spec.provider,
            cap: spec.cap,
            period: spec.period,
            expires_at: spec.expires_at,
            models,
            key_hash: KeyHash::of(key.expose()),
            created_at: now,
            created_by: spec.created_by,
            note: spec.note,
            revoked_at: None,
            limits: spec.limits,
            installs: Vec::new(),
            apis: spec.apis,
            provider_key: spec.provider_key.map(Box::new),
            direct: spec.direct,
            alerts: match spec.alerts {
                Some(alerts) => crate::grants::validate_alerts(&alerts)?,
                None => crate::grants::DEFAULT_ALERTS.to_vec(),
            },
            team: spec.team,
        };
        let revoked = old.as_ref().map(|slot| Grant { revoked_at: Some(now), ..slot.grant() });
        match &revoked {
            Some(revoked) => self.store.write(WriteOp::PutGrants(vec![revoked.clone(), grant.clone()])).await?,
            None => self.store.write(WriteOp::PutGrant(grant.clone())).await?,
        }
        let window = local_window(grant.period, now);
        let view = GrantView {
            state: grant.state(now, Decimal::ZERO),
            spent: Decimal::ZERO,
            reserved: Decimal::ZERO,
            window,
            grant: grant.clone(),
            refusals: BTreeMap::new(),
            lease: Decimal::ZERO,
        };
        let mut registry = self.write();
        if let (Some(slot), Some(revoked)) = (&old, revoked) {
            registry.by_hash.remove(&revoked.key_hash);
            registry.by_name.remove(&revoked.name);
            slot.lock().grant = revoked;
        }
        registry.next_grant_id = id.0 + 1;
        registry.by_hash.insert(grant.key_hash, id);
        registry.by_name.insert(grant.name.clone(), id);
        let slot = GrantSlot::new(grant, window, Decimal::ZERO, Counts::default(), BTreeMap::new(), &self.store);
        registry.grants.insert(id, Arc::new(slot));
        drop(registry);
        let replaced = old.map(|slot| self.grant_view(&slot));
        Ok((view, key, replaced))
    }

    pub fn list_grants(&self, include_revoked: bool) -> Vec<GrantView> {
        let now = self.clock.now_seconds();
        let slots: Vec<Arc<GrantSlot>> = self.read().grants.values().cloned().collect();
        slots.iter().map(|slot| slot.view(now, &self.store)).filter(|view| include_revoked || view.state != GrantState::Revoked).collect()
    }

    /// The grant by name: the active one, or else the most recent revoked one.
    pub fn find_grant(&self, name: &str) -> Option<Arc<GrantSlot>> {
        let registry = self.read();
        if let Some(id) = registry.by_name.get(name) {
            return registry.grants.get(id).cloned();
        }
        registry.grants.values().rev().find(|slot| slot.name() == name).cloned()
    }

    pub fn grant_view(&self, slot: &GrantSlot) -> GrantView {
        slot.view(self.clock.now_seconds(), &self.store)
    }

    /// The grant as [`update_grant`](Self::update_grant) would leave it, without changing it.
    pub fn preview_update(&self, name: &str, update: &GrantUpdate) -> Result<Grant, StateError> {
        let slot = self.active_slot(name)?;
        apply_update(slot.grant(), update.clone(), self.clock.now_seconds())
    }

    /// Changes a grant's limits in place; its key, spend and ledger stay.
    pub async fn update_grant(&self, name: &str, update: GrantUpdate) -> Result<GrantView, StateError> {
        let now = self.clock.now_seconds();
        let _admin = self.admin.lock().await;
        let slot = self.active_slot(name)?;
        let grant = apply_update(slot.grant(), update, now)?;
        self.store.write(WriteOp::PutGrant(grant.clone())).await?;
        {
            let mut live = slot.lock();
            let period_changed = live.grant.period != grant.period;
            live.grant = grant;
            if period_changed {
                // The new period's window and its spend so far, from the ledger's totals.
                live.window = Window { start: 0, end: Some(0) };
                live.roll(now, slot.id, &self.store);
            }
        }
        self.events.spend_changed(&slot.standing(), self.clock.now_millis());
        Ok(self.grant_view(&slot))
    }

    /// Mints a new key for a grant; the old key stops working at once. Spend and limits stay.
    pub async fn rotate_grant(&self, name: &str) -> Result<(GrantView, Secret), StateError> {
        self.rotate_grant_with(name, None).await
    }

    /// As [`rotate_grant`](Self::rotate_grant), replacing the grant's provider key in the same
    /// write when one is given.
    pub async fn rotate_grant_with(
        &self,
        name: &str,
        provider_key: Option<crate::backstop::ProviderKey>,
    ) -> Result<(GrantView, Secret), StateError> {
        let _admin = self.admin.lock().await;
        let slot = self.active_slot(name)?;
        let key = secret::generate_virtual_key()?;
        let mut grant = slot.grant();
        let old_hash = grant.key_hash;
        grant.key_hash = KeyHash::of(key.expose());
        if let Some(key) = provider_key {
            grant.provider_key = Some(Box::new(key));
        }
        self.store.write(WriteOp::PutGrant(grant.clone())).await?;
        {
            let mut registry = self.write();
            registry.by_hash.remove(&old_hash);
            registry.by_hash.insert(grant.key_hash, slot.id);
        }
        slot.lock().grant = grant;
        Ok((self.grant_view(&slot), key))
    }

    /// Remembers (or, when empty, forgets) the files capitctl changed for a grant.
    pub async fn record_install(&self, name: &str, installs: Vec<crate::grants::InstallRecord>) -> Result<(), StateError> {
        let _admin = self.admin.lock().await;
        let slot = self.active_slot(name)?;
        let mut grant = slot.grant();
        grant.installs = installs;
        self.store.write(WriteOp::PutGrant(grant.clone())).await?;
        slot.lock().grant = grant;
        Ok(())
    }

    pub(super) fn active_slot(&self, name: &str) -> Result<Arc<GrantSlot>, StateError> {
        let registry = self.read();
        let id = registry.by_name.get(name).ok_or_else(|| StateError::UnknownGrant(name.to_string()))?;
        registry.grants.get(id).cloned().ok_or_else(|| StateError::UnknownGrant(name.to_string()))
    }

    /// Kills a grant's key at once. The record and its ledger stay.
    pub async fn revoke_grant(&self, name: &str) -> Result<GrantView, StateError> {
        let _admin = self.admin.lock().await;
        let slot = self.active_slot(name)?;
        let mut revoked = slot.grant();
        revoked.revoked_at = Some(self.clock.now_seconds());
        self.store.write(WriteOp::PutGrant(revoked.clone())).await?;
        {
            let mut registry = self.write();
            registry.by_hash.remove(&revoked.key_hash);
            registry.by_name.remove(&revoked.name);
        }
        slot.lock().grant = revoked;
        Ok(self.grant_view(&slot))
    }
}

/// A change to a grant: `None` leaves a field as it is. For the limits, `Some(0)` removes one.
#[derive(Clone, Debug, Default)]
pub struct GrantUpdate {
    pub cap: Option<Decimal>,
    pub period: Option<Period>,
    /// `Some(None)` removes the expiry.
    pub expires_at: Option<Option<i64>>,
    pub models: Option<Vec<String>>,
    pub note: Option<String>,
    pub max_requests: Option<u64>,
    pub max_tokens: Option<u64>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub concurrency: Option<u64>,
    pub fit: Option<bool>,
    /// `Some(empty)` removes the scope.
    pub apis: Option<Vec<Api>>,
    /// A new provider key (replacing the old one on the provider's side is the caller's part).
    pub provider_key: Option<crate::backstop::ProviderKey>,
    /// New alert thresholds in percent of the cap; empty turns alerts off.
    pub alerts: Option<Vec<u32>>,
}

/// A grant with `update` applied, checked.
fn apply_update(mut grant: Grant, update: GrantUpdate, now: i64) -> Result<Grant, StateError> {
    if let Some(cap) = update.cap {
        grant.cap = cap;
    }
    if let Some(period) = update.period {
        grant.period = period;
    }
    if let Some(expires_at) = update.expires_at {
        if expires_at.is_some_and(|at| at <= now) {
            return Err(GrantError::ExpiryInPast.into());
        }
        grant.expires_at = expires_at;
    }
    if let Some(models) = update.models {
        for model in &models {
            crate::pricing::validate_model_name(model)?;
        }
        grant.models = models;
    }
    if let Some(note) = update.note {
        grant.note = note;
    }
    let l = &mut grant.limits;
    for (slot_value, new) in [
        (&mut l.max_requests, update.max_requests),
        (&mut l.max_tokens, update.max_tokens),
        (&mut l.rpm, update.rpm),
        (&mut l.tpm, update.tpm),
        (&mut l.concurrency, update.concurrency),
    ] {
        if let Some(new) = new {
            *slot_value = (new > 0).then_some(new);
        }
    }
    if let Some(fit) = update.fit {
        grant.limits.fit = fit;
    }
    if let Some(apis) = update.apis {
        grant.apis = apis;
    }
    if let Some(key) = update.provider_key {
        grant.provider_key = Some(Box::new(key));
    }
    if let Some(alerts) = update.alerts {
        grant.alerts = crate::grants::validate_alerts(&alerts)?;
    }
    Ok(grant)
}

/// What a new grant is made of, as the control API hands it over (validated by `create_grant`).
#[derive(Clone, Debug)]
pub struct GrantSpec {
    pub name: String,
    pub provider: String,
    pub cap: Decimal,
    pub period: Period,
    pub expires_at: Option<i64>,
    pub models: Vec<String>,
    pub note: String,
    pub created_by: String,
    pub limits: Limits,
    pub apis: Vec<Api>,
    /// The provider's own capped key for the grant, made before the grant is.
    pub provider_key: Option<crate::backstop::ProviderKey>,
    /// The agent gets `provider_key` itself (no proxy).
    pub direct: bool,
    /// Alert thresholds in percent of the cap; `None` for the default (80 and 100).
    pub alerts: Option<Vec<u32>>,
    /// The team pool the grant also draws on; the caller has checked this daemon is a member.
    pub team: Option<String>,
}

/// A provider key's text, checked: one token, and not a capit key.
/// The key as pasted, trimmed and checked; itself a `Secret`, so no plain copy is made.
pub(super) fn provider_key_text(secret: &Secret) -> Result<Secret, StateError> {
    let secret = secret.trimmed();
    let text = secret.expose();
    if text.is_empty() || text.len() > 4096 || text.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(StateError::Invalid("the key is empty or has spaces or control characters".into()));
    }
    if secret::looks_like_virtual_key(text) {
        return Err(StateError::Invalid("that is a capit virtual key, not the provider's own key".into()));
    }
    Ok(secret)
}
#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn a_grant_is_replaced_only_by_one_that_passes_every_check_and_prices_persist() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let clock = Clock::default();
        let (state, dir) = temp_state(clock.clone());
        let (_, old_key) = runtime.block_on(state.create_grant(grant_spec(Period::Month, None))).unwrap();
        let past = GrantSpec { expires_at: Some(clock.now_seconds() - 1), ..grant_spec(Period::Month, None) };
        assert!(runtime.block_on(state.replace_grant(past)).is_err());
        let bad_model = GrantSpec { models: vec!["a model".into()], ..grant_spec(Period::Month, None) };
        assert!(runtime.block_on(state.replace_grant(bad_model)).is_err());
        assert!(state.authenticate(Some(old_key.expose()), "openai").is_ok(), "a refused replacement changes nothing");
        assert!(matches!(runtime.block_on(state.create_grant(grant_spec(Period::Month, None))), Err(StateError::GrantExists(_))));
        let (new, new_key, replaced) = runtime.block_on(state.replace_grant(grant_spec(Period::Week, None))).unwrap();
        assert_eq!(replaced.unwrap().state, GrantState::Revoked);
        assert!(state.authenticate(Some(old_key.expose()), "openai").is_err());
        assert!(state.authenticate(Some(new_key.expose()), "openai").is_ok());

        let list = r#"{"listed-model": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06, "mode": "chat"}}"#;
        let done = runtime.block_on(state.update_prices(list, "http://prices.example/list.json")).unwrap();
        assert_eq!((done.imported, done.changes.len()), (1, 1));
        runtime.block_on(state.set_price("gpt-5", (*state.price("gpt-5").unwrap()).clone())).unwrap();
        state.store().close();
        drop(state);
        let (store, snapshot) = Store::open(&dir.join("capit.redb")).unwrap();
        let state = State::with_clock(store, snapshot, dir.clone(), clock).unwrap();
        let names: Vec<(String, GrantState)> = state.list_grants(true).into_iter().map(|v| (v.grant.name, v.state)).collect();
        assert_eq!(names, [("g".to_string(), GrantState::Revoked), ("g".to_string(), GrantState::Active)]);
        assert_eq!(state.find_grant("g").unwrap().id, new.grant.id);
        let rows = state.list_prices();
        let row = |m: &str| rows.iter().find(|r| r.0 == m).cloned().unwrap();
        assert_eq!(
            (row("listed-model").2, row("listed-model").3.unwrap().source),
            (PriceSource::List, "http://prices.example/list.json".to_string())
        );
        assert_eq!((row("gpt-5").2, row("gpt-5").3.unwrap().source), (PriceSource::Override, "price set".to_string()));
        assert_eq!(state.price_list_origin().unwrap().source, "http://prices.example/list.json");
        state.store().close();
        drop(state);
        let _ = std::fs::remove_dir_all(dir);
    }
}
