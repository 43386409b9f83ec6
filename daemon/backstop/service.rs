//! Keeps each grant's provider key in step with the grant: made with the grant, changed with
//! its cap, period and expiry, replaced on rotation, deleted on revoke; and checked periodically
//! against the provider (its usage against capit's ledger, its limit against the grant's cap).
//!
//! Order, so that nothing is half-done: a provider key is made before the grant that holds it
//! (and deleted again if the grant cannot be written); a change is made on the provider's side
//! before capit commits it (and undone there if the commit fails); a revoked grant's key dies in
//! capit at once, and on the provider's side as soon as the provider answers (a revoked grant
//! keeps its key's record only while that deletion is pending, retried by [`Backstop::sync`]).
//! A direct grant's key is deleted on the provider's side first, since the agent holds it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rust_decimal::Decimal;

use super::openrouter::{ManagementApi, ManagementError, NewKey, RemoteKey};
use super::{Drift, KeyOwner, KeyUsage, ProviderKey, carry_over, drift, key_name, key_owner, reset_of, utc_window};
use crate::grants::{Grant, GrantId, GrantState, Period};
use crate::providers::{Provider, ProviderKind};
use crate::proxy::outbound::Outbound;
use crate::secret::Secret;
use crate::state::{GrantSpec, GrantUpdate, GrantView, State, StateError};

#[derive(Debug, thiserror::Error)]
pub enum BackstopError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Provider(#[from] ManagementError),
    #[error("{0}")]
    Invalid(String),
}

/// One grant's provider key, compared with the ledger at the last check.
#[derive(Clone, Debug)]
pub struct DriftRow {
    pub grant: String,
    pub provider: String,
    pub drift: Drift,
    /// The ledger is summed from the key's creation (Unix ms), as the provider's usage counts.
    pub since_ms: i64,
}

/// What the last periodic check found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub checked_at: Option<i64>,
    pub errors: Vec<String>,
    pub drift: Vec<DriftRow>,
}

/// The provider's figures for one grant's key, and when they were read.
#[derive(Clone, Debug)]
pub struct Observed {
    pub usage: KeyUsage,
    pub at: i64,
}

pub struct Backstop {
    state: Arc<State>,
    outbound: Outbound,
    /// Serialises grant creation and every change to provider keys.
    lock: tokio::sync::Mutex<()>,
    report: Mutex<Report>,
    observed: Mutex<HashMap<GrantId, Observed>>,
}

/// A row of `key ls --remote`.
#[derive(Clone, Debug)]
pub struct RemoteRow {
    pub key: RemoteKey,
    /// The grant holding it, if any.
    pub grant: Option<String>,
    /// `grant`, `pending-delete`, `unknown` (this capit's name, no grant) or `other-capit`.
    pub status: &'static str,
}

impl Backstop {
    pub fn new(state: Arc<State>, outbound: Outbound) -> Backstop {
        Backstop {
            state,
            outbound,
            lock: tokio::sync::Mutex::new(()),
            report: Mutex::new(Report::default()),
            observed: Mutex::new(HashMap::new()),
        }
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    fn api<'a>(&'a self, provider: &'a Provider) -> ManagementApi<'a> {
        ManagementApi { outbound: &self.outbound, base_url: &provider.base_url }
    }

    fn now(&self) -> i64 {
        self.state.clock().now_seconds()
    }

    fn provider(&self, name: &str) -> Result<Provider, BackstopError> {
        self.state.provider(name).ok_or_else(|| StateError::UnknownProvider(name.to_string()).into())
    }

    fn management_key(&self, provider: &str) -> Result<Arc<Secret>, BackstopError> {
        self.state.management_key(provider).ok_or_else(|| {
            BackstopError::Invalid(format!(
                "no {provider} management key is stored, and this grant's {provider} key needs it; add it with: capitctl key add {provider} --management"
            ))
        })
    }

    pub fn report(&self) -> Report {
        self.report.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn observed(&self, grant: GrantId) -> Option<Observed> {
        self.observed.lock().unwrap_or_else(|p| p.into_inner()).get(&grant).cloned()
    }

    fn remember(&self, grant: GrantId, usage: KeyUsage) {
        let at = self.now();
        self.observed.lock().unwrap_or_else(|p| p.into_inner()).insert(grant, Observed { usage, at });
    }

    /// Checks a management key with the provider, then stores it; then gives every live grant of
    /// that provider without a provider key one. Returns the fingerprint, when it was added, how
    /// many grants got a key and what failed.
    pub async fn add_management_key(&self, provider: &str, secret: Secret) -> Result<(String, i64, usize, Vec<String>), BackstopError> {
        let p = self.provider(provider)?;
        if p.kind != ProviderKind::OpenRouter {
            return Err(BackstopError::Invalid(format!("only OpenRouter has management keys; {provider:?} is of kind {}", p.kind)));
        }
        let current = self.api(&p).current(&secret).await?;
        if !current.is_management_key {
            return Err(BackstopError::Invalid(format!(
                "OpenRouter says that is an ordinary API key, not a management key; make one at https://openrouter.ai/settings/management-keys (for the master key use: capitctl key add {provider})"
            )));
        }
        let _lock = self.lock.lock().await;
        let (fingerprint, added_at) = self.state.add_management_key(provider, &secret).await?;
        tracing::info!(provider, key = %fingerprint, "management key stored");
        let mut done = 0;
        let mut failed = Vec::new();
        let now = self.now();
        for view in self.state.list_grants(false) {
            let g = &view.grant;
            if g.provider != provider || g.provider_key.is_some() || g.expires_at.is_some_and(|at| at <= now) {
                continue;
            }
            // A key made now starts at zero: what the grant spent in this window counts against it.
            let carried_until = reset_of(g.period).and_then(|period| utc_window(period, now).end);
            match self.make_key(&p, g.id, &g.name, g.cap, g.period, g.expires_at, view.spent, carried_until).await {
                Ok(key) => {
                    let hash = key.hash.clone();
                    if let Err(e) = self.state.set_provider_key(g.id, Some(key)).await {
                        self.delete_quietly(&p, &hash).await;
                        failed.push(format!("{}: {e}", g.name));
                    } else {
                        done += 1;
                    }
                }
                Err(e) => failed.push(format!("{}: {e}", g.name)),
            }
        }
        Ok((fingerprint, added_at, done, failed))
    }

    /// Makes a provider key for grant `id` whose window already has `carried` spent.
    #[allow(clippy::too_many_arguments)]
    async fn make_key(
        &self,
        provider: &Provider,
        id: GrantId,
        grant: &str,
        cap: Decimal,
        period: Period,
        expires_at: Option<i64>,
        carried: Decimal,
        carried_until: Option<i64>,
    ) -> Result<ProviderKey, BackstopError> {
        let management = self.management_key(&provider.name)?;
        let mut key = ProviderKey {
            hash: String::new(),
            name: key_name(grant, id, self.state.installation_id()),
            secret: Secret::new(String::new()),
            limit: Decimal::ZERO,
            reset: reset_of(period),
            expires_at,
            created_at_ms: self.state.clock().now_millis(),
            carried,
            carried_until,
            retired: Vec::new(),
        };
        key.limit = key.desired_limit(cap, self.now());
        let new = NewKey { name: key.name.clone(), limit: key.limit, reset: key.reset, expires_at };
        let created = self.api(provider).create(&management, &new).await?;
        key.hash = created.key.hash;
        key.secret = created.secret;
        tracing::info!(grant, provider = %provider.name, key = %key.secret.fingerprint(), limit = %key.limit, "provider key made");
        Ok(key)
    }

    /// Deletes a key on the provider's side, logging a failure (the caller has kept a record of
    /// it, or it was never handed out).
    async fn delete_quietly(&self, provider: &Provider, hash: &str) -> bool {
        let Some(management) = self.state.management_key(&provider.name) else { return false };
        match self.api(provider).delete(&management, hash).await {
            Ok(()) => {
                tracing::info!(provider = %provider.name, "provider key deleted");
                true
            }
            Err(e) => {
                tracing::warn!(provider = %provider.name, error = %e, "deleting a provider key failed; it is retried");
                false
            }
        }
    }

    /// Makes a grant; an OpenRouter grant, when a management key is stored, gets its own capped
    /// OpenRouter key first. Returns the grant and the key to hand out: the virtual key, or for a
    /// direct grant the provider key itself.
    pub async fn create_grant(&self, spec: GrantSpec) -> Result<(GrantView, Secret), BackstopError> {
        let provider = self.provider(&spec.provider)?;
        let backstopped = provider.kind == ProviderKind::OpenRouter && self.state.management_key(&provider.name).is_some();
        if spec.direct {
            if provider.kind != ProviderKind::OpenRouter {
                return Err(BackstopError::Invalid(format!(
                    "--direct needs an OpenRouter grant (--provider openrouter): only OpenRouter caps a key itself; {:?} is of kind {}",
                    provider.name, provider.kind
                )));
            }
            self.management_key(&provider.name)?;
            refuse_unenforceable(&spec.models, &spec.apis, &spec.limits)?;
        }
        if !backstopped && !spec.direct {
            return Ok(self.state.create_grant(spec).await?);
        }
        let _lock = self.lock.lock().await;
        // The id only names the key (grants are told apart by the key's hash): a plain grant made
        // meanwhile can at worst leave a key named after a neighbouring id.
        let (id, _) = self.state.check_new_grant(&spec)?;
        let key = self.make_key(&provider, id, &spec.name, spec.cap, spec.period, spec.expires_at, Decimal::ZERO, None).await?;
        let hash = key.hash.clone();
        let secret = key.secret.clone();
        let direct = spec.direct;
        match self.state.create_grant(GrantSpec { provider_key: Some(key), ..spec }).await {
            Ok((view, virtual_key)) => Ok((view, if direct { secret } else { virtual_key })),
            Err(e) => {
                self.delete_quietly(&provider, &hash).await;
                Err(e.into())
            }
        }
    }

    /// Makes a grant in place of the active one of the same name (granting an agent again), once
    /// the new one has passed every check, so that a typo changes nothing. Without a provider key
    /// on either side, the old grant is revoked in the same write that makes the new one; with
    /// one, the steps on the provider's side come after the checks: the old grant is revoked
    /// (its key deleted), then the new one made. Returns the new grant, its key, and the old one.
    pub async fn replace_grant(&self, spec: GrantSpec) -> Result<(GrantView, Secret, Option<GrantView>), BackstopError> {
        let provider = self.provider(&spec.provider)?;
        let old = self.state.find_grant(&spec.name).map(|s| s.grant()).filter(|g| g.revoked_at.is_none());
        let backstopped = provider.kind == ProviderKind::OpenRouter && self.state.management_key(&provider.name).is_some();
        if !backstopped && !spec.direct && old.as_ref().is_none_or(|g| g.provider_key.is_none()) {
            return Ok(self.state.replace_grant(spec).await?);
        }
        self.state.check_replacement(&spec)?;
        let replaced = match &old {
            Some(g) => Some(self.revoke_grant(&g.name).await?.0),
            None => None,
        };
        let (view, key) = self.create_grant(spec).await?;
        Ok((view, key, replaced))
    }

    /// Changes a grant; its provider key follows: a new cap or period is set on the provider's
    /// side, a new expiry means a new key (OpenRouter cannot change a key's expiry). Returns the
    /// grant and, for a direct grant whose key was replaced, the new key.
    pub async fn update_grant(&self, name: &str, mut update: GrantUpdate) -> Result<(GrantView, Option<Secret>), BackstopError> {
        if !self.holds_key(name) {
            return Ok((self.state.update_grant(name, update).await?, None));
        }
        let _lock = self.lock.lock().await;
        let after = self.state.preview_update(name, &update)?;
        let before = self.state.find_grant(name).map(|s| s.grant()).ok_or_else(|| StateError::UnknownGrant(name.to_string()))?;
        let Some(key) = before.provider_key.as_deref().cloned() else {
            return Ok((self.state.update_grant(name, update).await?, None));
        };
        if before.direct && (update.models.is_some() || update.apis.is_some() || limits_touched(&update)) {
            return Err(BackstopError::Invalid(format!(
                "grant {name:?} is direct: only OpenRouter's limit caps it, and capit cannot enforce models, APIs or count and rate limits on it"
            )));
        }
        let provider = self.provider(&before.provider)?;
        let management = self.management_key(&provider.name)?;
        let now = self.now();
        if after.expires_at != before.expires_at {
            let replaced = self.replacement(&provider, &before, &after, &key).await?;
            update.provider_key = Some(replaced.clone());
            let view = match self.state.update_grant(name, update).await {
                Ok(view) => view,
                Err(e) => {
                    self.delete_quietly(&provider, &replaced.hash).await;
                    return Err(e.into());
                }
            };
            self.retire(&provider, before.id, &replaced).await;
            let view = self.state.find_grant(name).map_or(view, |slot| self.state.grant_view(&slot));
            return Ok((view, before.direct.then(|| replaced.secret.clone())));
        }
        if after.cap != before.cap || after.period != before.period {
            let mut changed = key.clone();
            if after.period != before.period {
                // What was carried belonged to the old period's window.
                changed.carried = Decimal::ZERO;
                changed.carried_until = None;
            }
            changed.reset = reset_of(after.period);
            changed.limit = changed.desired_limit(after.cap, now);
            self.api(&provider).set_limit(&management, &key.hash, changed.limit, changed.reset).await?;
            update.provider_key = Some(changed);
            return match self.state.update_grant(name, update).await {
                Ok(view) => Ok((view, None)),
                Err(e) => {
                    if let Err(undo) = self.api(&provider).set_limit(&management, &key.hash, key.limit, key.reset).await {
                        tracing::error!(grant = name, error = %undo, "the provider key's old limit could not be put back; the next check restores it");
                    }
                    Err(e.into())
                }
            };
        }
        Ok((self.state.update_grant(name, update).await?, None))
    }

    /// A new provider key to replace `key` for `after`, counting what `key` spent in this window.
    async fn replacement(
        &self,
        provider: &Provider,
        before: &Grant,
        after: &Grant,
        key: &ProviderKey,
    ) -> Result<ProviderKey, BackstopError> {
        let now = self.now();
        if after.expires_at.is_some_and(|at| at <= now) {
            return Err(BackstopError::Invalid(format!(
                "grant {:?} has expired; give it a new expiry first (capitctl set {} --expires 30d)",
                after.name, after.name
            )));
        }
        let old = self.api(provider).current(&key.secret).await?;
        let (carried, until) = if after.period == before.period {
            carry_over(key, old.figures.in_window(before.period), after.period, now)
        } else {
            (Decimal::ZERO, None)
        };
        let mut new = self.make_key(provider, before.id, &before.name, after.cap, after.period, after.expires_at, carried, until).await?;
        new.retired = key.retired.iter().cloned().chain(std::iter::once(key.hash.clone())).collect();
        Ok(new)
    }

    /// Deletes the keys `key` replaced, and forgets those the provider confirmed.
    async fn retire(&self, provider: &Provider, id: GrantId, key: &ProviderKey) {
        let mut left = Vec::new();
        for hash in &key.retired {
            if !self.delete_quietly(provider, hash).await {
                left.push(hash.clone());
            }
        }
        if left.len() != key.retired.len() {
            let mut kept = key.clone();
            kept.retired = left;
            if let Err(e) = self.state.set_provider_key(id, Some(kept)).await {
                tracing::warn!(error = %e, "recording deleted provider keys failed; the next check deletes them again");
            }
        }
    }

    /// A new virtual key, and a new provider key when the grant has one. Returns the grant and
    /// the key to hand out (the provider key itself for a direct grant).
    pub async fn rotate_grant(&self, name: &str) -> Result<(GrantView, Secret), BackstopError> {
        if !self.holds_key(name) {
            return Ok(self.state.rotate_grant(name).await?);
        }
        let _lock = self.lock.lock().await;
        let grant = self.state.find_grant(name).map(|s| s.grant()).filter(|g| g.revoked_at.is_none());
        let Some(key) = grant.as_ref().and_then(|g| g.provider_key.as_deref().cloned()) else {
            return Ok(self.state.rotate_grant(name).await?);
        };
        let grant = grant.expect("a provider key was found on it");
        let provider = self.provider(&grant.provider)?;
        self.management_key(&provider.name)?;
        let new = self.replacement(&provider, &grant, &grant, &key).await?;
        let (view, virtual_key) = match self.state.rotate_grant_with(name, Some(new.clone())).await {
            Ok(done) => done,
            Err(e) => {
                self.delete_quietly(&provider, &new.hash).await;
                return Err(e.into());
            }
        };
        self.retire(&provider, grant.id, &new).await;
        let view = self.state.find_grant(name).map_or(view, |slot| self.state.grant_view(&slot));
        Ok((view, if grant.direct { new.secret } else { virtual_key }))
    }

    /// Revokes a grant and deletes its provider key. Returns the grant and, when the provider
    /// could not be reached for a proxied grant's key, a note that the deletion is retried.
    pub async fn revoke_grant(&self, name: &str) -> Result<(GrantView, Option<String>), BackstopError> {
        let grant = self.state.find_grant(name).map(|s| s.grant()).filter(|g| g.revoked_at.is_none());
        let Some(grant) = grant.filter(|g| g.provider_key.is_some()) else {
            return Ok((self.state.revoke_grant(name).await?, None));
        };
        let provider = self.provider(&grant.provider)?;
        if !grant.direct {
            // The key dies in capit at once, before waiting for anything on the provider's side.
            let view = self.state.revoke_grant(name).await?;
            let _lock = self.lock.lock().await;
            let Some(key) = self.state.slot(grant.id).and_then(|s| s.grant().provider_key) else { return Ok((view, None)) };
            let mut deleted = true;
            for hash in key.retired.iter().chain(std::iter::once(&key.hash)) {
                deleted &= self.delete_quietly(&provider, hash).await;
            }
            if deleted {
                self.state.set_provider_key(grant.id, None).await?;
                return Ok((view, None));
            }
            let note = format!(
                "its {} key could not be deleted on {}'s side yet (capit no longer uses it); capitd retries",
                provider.name, provider.name
            );
            return Ok((view, Some(note)));
        }
        let _lock = self.lock.lock().await;
        let Some(key) = self.state.slot(grant.id).and_then(|s| s.grant().provider_key) else {
            return Ok((self.state.revoke_grant(name).await?, None));
        };
        // The agent holds the key: it must die on the provider's side before capit says so.
        let management = self.management_key(&provider.name)?;
        for hash in key.retired.iter().chain(std::iter::once(&key.hash)) {
            self.api(&provider).delete(&management, hash).await.map_err(|e| {
                BackstopError::Invalid(format!(
                    "OpenRouter did not delete grant {name:?}'s key, so it still works; nothing was changed ({e})"
                ))
            })?;
        }
        let view = self.state.revoke_grant(name).await?;
        self.state.set_provider_key(grant.id, None).await?;
        Ok((view, None))
    }

    /// Whether the live grant `name` holds a provider key (changes to it then involve the provider).
    fn holds_key(&self, name: &str) -> bool {
        self.state.find_grant(name).map(|s| s.grant()).is_some_and(|g| g.revoked_at.is_none() && g.provider_key.is_some())
    }

    /// What the provider says of a grant's key now (falling back to the last reading when it
    /// cannot be reached).
    pub async fn refresh(&self, grant: &Grant) -> Option<Observed> {
        let key = grant.provider_key.as_ref()?;
        let provider = self.state.provider(&grant.provider)?;
        match self.api(&provider).current(&key.secret).await {
            Ok(current) => self.remember(grant.id, current.figures),
            Err(e) => tracing::warn!(grant = %grant.name, error = %e, "reading the provider key's usage failed"),
        }
        self.observed(grant.id)
    }

    /// A direct grant as listings show it: spend from the provider's figures, in the provider's
    /// (UTC) window.
    pub async fn direct_view(&self, mut view: GrantView) -> (GrantView, Option<Observed>) {
        let now = self.now();
        // A listing waits a little for the provider, then shows the last figures it has.
        let observed = match tokio::time::timeout(std::time::Duration::from_secs(5), self.refresh(&view.grant)).await {
            Ok(observed) => observed,
            Err(_) => self.observed(view.grant.id),
        };
        if let (Some(seen), Some(key)) = (&observed, &view.grant.provider_key) {
            view.spent = key.carried_at(now) + seen.usage.in_window(view.grant.period);
        }
        view.window = utc_window(view.grant.period, now);
        if view.state != GrantState::Revoked {
            view.state = view.grant.state(now, view.spent);
        }
        (view, observed)
    }

    /// The provider's keys, each matched with the grant holding it.
    pub async fn list_remote(&self, provider: &str) -> Result<(Vec<RemoteRow>, usize), BackstopError> {
        let p = self.provider(provider)?;
        let management = self.state.management_key(provider).ok_or_else(|| {
            BackstopError::Invalid(format!(
                "no {provider} management key is stored; add one with: capitctl key add {provider} --management"
            ))
        })?;
        let keys = self.api(&p).list(&management).await?;
        let mut holders: HashMap<String, (String, bool)> = HashMap::new();
        for slot in self.state.all_slots() {
            let g = slot.grant();
            if let Some(key) = &g.provider_key {
                holders.insert(key.hash.clone(), (g.name.clone(), g.revoked_at.is_none()));
                for hash in &key.retired {
                    holders.insert(hash.clone(), (g.name.clone(), false));
                }
            }
        }
        let mut rows = Vec::new();
        let mut others = 0;
        for key in keys {
            let row = match (holders.get(&key.hash), key_owner(&key.name, self.state.installation_id())) {
                (Some((grant, true)), _) => RemoteRow { grant: Some(grant.clone()), status: "grant", key },
                (Some((grant, false)), _) => RemoteRow { grant: Some(grant.clone()), status: "pending-delete", key },
                (None, KeyOwner::Ours(_)) => RemoteRow { grant: None, status: "unknown", key },
                (None, KeyOwner::OtherCapit(_)) => RemoteRow { grant: None, status: "other-capit", key },
                (None, KeyOwner::NotCapit) => {
                    others += 1;
                    continue;
                }
            };
            rows.push(row);
        }
        Ok((rows, others))
    }

    /// One round of checks over every grant holding a provider key: deletions still pending are
    /// retried, each live key's limit is set back to what its grant says if it differs, and its
    /// usage is compared with the ledger.
    pub async fn sync(&self) {
        let slots: Vec<_> = self.state.all_slots().into_iter().filter(|s| s.grant().provider_key.is_some()).collect();
        if slots.is_empty() {
            return;
        }
        let mut errors = Vec::new();
        let mut rows = Vec::new();
        for slot in slots {
            let _lock = self.lock.lock().await;
            let grant = slot.grant();
            match self.check(&grant).await {
                Ok(Some(row)) => rows.push(row),
                Ok(None) => {}
                Err(e) => errors.push(format!("grant {:?}: {e}", grant.name)),
            }
        }
        for e in &errors {
            tracing::warn!(error = %e, "checking provider keys");
        }
        for row in rows.iter().filter(|r| r.drift.drifted) {
            tracing::warn!(grant = %row.grant, provider_usage = %row.drift.provider, ledger = %row.drift.ledger, "the provider's usage of a grant's key differs from the ledger");
        }
        *self.report.lock().unwrap_or_else(|p| p.into_inner()) = Report { checked_at: Some(self.now()), errors, drift: rows };
    }

    async fn check(&self, grant: &Grant) -> Result<Option<DriftRow>, BackstopError> {
        let Some(key) = grant.provider_key.as_deref().cloned() else { return Ok(None) };
        let provider = self.provider(&grant.provider)?;
        let management = self.management_key(&provider.name)?;
        let api = self.api(&provider);
        if grant.revoked_at.is_some() {
            for hash in key.retired.iter().chain(std::iter::once(&key.hash)) {
                api.delete(&management, hash).await?;
            }
            self.state.set_provider_key(grant.id, None).await?;
            tracing::info!(grant = %grant.name, "a revoked grant's provider key is deleted");
            return Ok(None);
        }
        self.retire(&provider, grant.id, &key).await;
        let now = self.now();
        if grant.expires_at.is_some_and(|at| at <= now) {
            return Ok(None);
        }
        let current = api.current(&key.secret).await?;
        self.remember(grant.id, current.figures.clone());
        let desired = key.desired_limit(grant.cap, now);
        if current.figures.limit != Some(desired) || current.figures.reset != key.reset || key.limit != desired {
            api.set_limit(&management, &key.hash, desired, key.reset).await?;
            if let Some(mut kept) = self.state.slot(grant.id).and_then(|s| s.grant().provider_key) {
                kept.limit = desired;
                self.state.set_provider_key(grant.id, Some(*kept)).await?;
            }
            tracing::info!(grant = %grant.name, limit = %desired, "the provider key's limit is set to the grant's");
        }
        if grant.direct {
            return Ok(None);
        }
        let ledger: Decimal = self.state.usage(Some(grant.id), key.created_at_ms).await?.iter().map(|e| e.cost).sum();
        Ok(Some(DriftRow {
            grant: grant.name.clone(),
            provider: provider.name.clone(),
            drift: drift(current.figures.usage, ledger),
            since_ms: key.created_at_ms,
        }))
    }

    /// Runs [`sync`](Self::sync) every `interval` until `stop`.
    pub async fn run(self: Arc<Self>, interval: std::time::Duration, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => self.sync().await,
            }
        }
    }
}

fn limits_touched(update: &GrantUpdate) -> bool {
    [update.max_requests, update.max_tokens, update.rpm, update.tpm, update.concurrency].iter().any(|l| l.is_some_and(|n| n > 0))
        || update.fit == Some(true)
}

/// A direct grant cannot carry what only the proxy can enforce.
fn refuse_unenforceable(models: &[String], apis: &[crate::grants::Api], limits: &crate::grants::Limits) -> Result<(), BackstopError> {
    if !models.is_empty() || !apis.is_empty() || *limits != crate::grants::Limits::default() {
        return Err(BackstopError::Invalid(
            "a direct grant is capped by OpenRouter's limit alone: capit never sees its requests, so it cannot hold it to models, APIs or count and rate limits".into(),
        ));
    }
    Ok(())
}
