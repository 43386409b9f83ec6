//! The control API: a tonic service on a Unix socket that only the daemon's own user can reach.
//! The only module that knows the protobuf types; it converts them to domain values at once.

mod access;
mod convert;
mod team;
mod watch;

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::audit::{Actor, Change};
use crate::backstop::service::{Backstop, BackstopError};
use crate::grants::{Period, money, parse_cap};
use crate::ledger::Totals;
use crate::proto::v1 as pb;
use crate::proto::v1::control_server::Control;
use crate::secret::Secret;
use crate::state::{GrantSpec, State};
use convert::status_from;

pub use crate::proto::v1::control_server::ControlServer;

pub struct ControlService {
    state: Arc<State>,
    backstop: Arc<Backstop>,
    teams: Arc<crate::team::service::Teams>,
}

/// A failure of a change that involves the provider's keys, as a status.
fn backstop_status(error: BackstopError) -> Status {
    match error {
        BackstopError::State(e) => status_from(e),
        BackstopError::Provider(e) => Status::unavailable(e.to_string()),
        BackstopError::Invalid(message) => Status::failed_precondition(message),
    }
}

impl ControlService {
    pub fn new(backstop: Arc<Backstop>, teams: Arc<crate::team::service::Teams>) -> ControlService {
        ControlService { state: backstop.state().clone(), backstop, teams }
    }

    /// The base URL a grant's key is used with: the proxy's, or for a direct grant the
    /// provider's own.
    fn grant_base_url(&self, grant: &crate::grants::Grant) -> String {
        match self.state.provider(&grant.provider) {
            Some(p) if grant.direct => format!("{}{}", p.base_url, p.kind.client_base_suffix()),
            _ => self.base_url(&grant.provider),
        }
    }

    /// Writes a change that has succeeded to the audit log; the caller's reply waits for it.
    async fn record(&self, actor: &Actor, change: Change) -> Result<(), Status> {
        self.state.audit(actor, change).await.map(drop).map_err(|e| {
            tracing::error!(error = %e, "writing the audit log failed");
            Status::internal("the change was made, but writing it to the audit log failed; capitd's log has the details")
        })
    }

    fn base_url(&self, provider: &str) -> String {
        let suffix = self.state.provider(provider).map_or("", |p| p.kind.client_base_suffix());
        match self.state.listen_addr() {
            Some(addr) => format!("http://{addr}/{provider}{suffix}"),
            None => format!("http://127.0.0.1:8787/{provider}{suffix}"),
        }
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn get_status(&self, _: Request<pb::GetStatusRequest>) -> Result<Response<pb::GetStatusResponse>, Status> {
        let (active, total, keys, providers) = self.state.counts();
        let report = self.backstop.report();
        // Status answers during a ledger outage too: that is when it is needed most.
        let store = self.state.store().clone();
        let ledger_entries = match store.write(crate::store::WriteOp::Barrier).await {
            Ok(()) => tokio::task::spawn_blocking(move || store.ledger_len())
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| status_from(e.into()))?,
            Err(_) => 0,
        };
        let health = self.state.store().health();
        let (key_storage, key_storage_detail) = self.state.key_storage();
        Ok(Response::new(pb::GetStatusResponse {
            key_storage: key_storage.to_string(),
            key_storage_detail,
            store_writable: health.failing_since_ms.is_none(),
            store_error: health.error.clone(),
            store_failing_since: health.failing_since_ms.map_or(0, |ms| ms.div_euclid(1000)),
            store_waiting_writes: health.waiting_writes as u64,
            store_outages_recovered: health.outages_recovered,
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.state.uptime_seconds(),
            listen_addr: self.state.listen_addr().map(|a| a.to_string()).unwrap_or_default(),
            home: self.state.home().display().to_string(),
            grants_active: active as u32,
            grants_total: total as u32,
            keys: keys as u32,
            providers: providers as u32,
            ledger_entries,
            drift: report
                .drift
                .iter()
                .map(|row| pb::KeyDrift {
                    grant: row.grant.clone(),
                    provider: row.provider.clone(),
                    provider_usage: convert::decimal_string(row.drift.provider),
                    ledger: convert::decimal_string(row.drift.ledger),
                    difference: convert::decimal_string(row.drift.difference),
                    drifted: row.drift.drifted,
                    since: row.since_ms.div_euclid(1000),
                })
                .collect(),
            keys_checked_at: report.checked_at.unwrap_or(0),
            key_check_errors: report.errors,
            access_requests: self.state.access().count_pending(self.state.clock().now_seconds()) as u32,
            watchers: self.state.events().watchers() as u32,
        }))
    }

    async fn add_key(&self, request: Request<pb::AddKeyRequest>) -> Result<Response<pb::AddKeyResponse>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        let secret = Secret::new(req.secret);
        if req.management {
            let (fingerprint, added_at, backstopped, not_backstopped) =
                self.backstop.add_management_key(&req.provider, secret).await.map_err(backstop_status)?;
            let detail = format!("management key {fingerprint} stored; {backstopped} grants now have a provider-side key");
            self.record(&actor, Change::new("key.add", &req.provider, detail)).await?;
            return Ok(Response::new(pb::AddKeyResponse {
                key: Some(pb::KeyInfo {
                    provider: req.provider,
                    fingerprint,
                    added_at,
                    management: true,
                    at_rest: self.state.key_storage().0.to_string(),
                }),
                backstopped: backstopped as u32,
                not_backstopped,
            }));
        }
        let (fingerprint, added_at) = self.state.add_key(&req.provider, secret).await.map_err(status_from)?;
        self.record(&actor, Change::new("key.add", &req.provider, format!("master key {fingerprint} stored"))).await?;
        let at_rest = self.state.key_storage().0.to_string();
        Ok(Response::new(pb::AddKeyResponse {
            key: Some(pb::KeyInfo { provider: req.provider, fingerprint, added_at, management: false, at_rest }),
            ..Default::default()
        }))
    }

    async fn list_keys(&self, _: Request<pb::ListKeysRequest>) -> Result<Response<pb::ListKeysResponse>, Status> {
        let master = self.state.list_keys().into_iter().map(|k| (k, false));
        let management = self.state.list_management_keys().into_iter().map(|k| (k, true));
        let keys = master
            .chain(management)
            .map(|((provider, fingerprint, added_at, sealed), management)| pb::KeyInfo {
                provider,
                fingerprint,
                added_at,
                management,
                at_rest: if sealed { "keyring" } else { "file" }.to_string(),
            })
            .collect();
        Ok(Response::new(pb::ListKeysResponse { keys }))
    }

    async fn remove_key(&self, request: Request<pb::RemoveKeyRequest>) -> Result<Response<pb::RemoveKeyResponse>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        let what = if req.management {
            self.state.remove_management_key(&req.provider).await.map_err(status_from)?;
            "management key removed"
        } else {
            self.state.remove_key(&req.provider).await.map_err(status_from)?;
            "master key removed"
        };
        self.record(&actor, Change::new("key.remove", &req.provider, what)).await?;
        Ok(Response::new(pb::RemoveKeyResponse {}))
    }

    async fn list_providers(&self, _: Request<pb::ListProvidersRequest>) -> Result<Response<pb::ListProvidersResponse>, Status> {
        let providers = self
            .state
            .list_providers()
            .iter()
            .map(|(p, has_key)| pb::Provider {
                has_management_key: self.state.management_key(&p.name).is_some(),
                ..convert::provider(p, *has_key)
            })
            .collect();
        Ok(Response::new(pb::ListProvidersResponse { providers }))
    }

    async fn set_provider(&self, request: Request<pb::SetProviderRequest>) -> Result<Response<pb::SetProviderResponse>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        let p = self.state.set_provider(&req.name, req.base_url.as_deref(), req.price_zero).await.map_err(status_from)?;
        let mut changed = Vec::new();
        if req.base_url.is_some() {
            changed.push(format!("base URL {}", p.base_url));
        }
        if let Some(zero) = req.price_zero {
            changed.push(format!("priced at zero: {zero}"));
        }
        self.record(&actor, Change::new("provider.set", &p.name, changed.join("; "))).await?;
        let has_key = self.state.list_keys().iter().any(|(name, ..)| *name == p.name);
        Ok(Response::new(pb::SetProviderResponse { provider: Some(convert::provider(&p, has_key)) }))
    }

    async fn add_provider(&self, request: Request<pb::AddProviderRequest>) -> Result<Response<pb::AddProviderResponse>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        let p = self.state.add_provider(&req.name, &req.kind, &req.base_url, req.price_zero).await.map_err(status_from)?;
        let detail = format!("{} at {}{}", p.kind.as_str(), p.base_url, if p.price_zero { ", priced at zero" } else { "" });
        self.record(&actor, Change::new("provider.add", &p.name, detail)).await?;
        Ok(Response::new(pb::AddProviderResponse { provider: Some(convert::provider(&p, false)) }))
    }

    async fn list_prices(&self, _: Request<pb::ListPricesRequest>) -> Result<Response<pb::ListPricesResponse>, Status> {
        let prices = self.state.list_prices().iter().map(|(m, p, s, o)| convert::price(m, p, *s, o.as_ref())).collect();
        Ok(Response::new(pb::ListPricesResponse { prices }))
    }

    async fn set_price(&self, request: Request<pb::SetPriceRequest>) -> Result<Response<pb::SetPriceResponse>, Status> {
        let actor = actor(&request);
        let wire = request.into_inner().price.ok_or_else(|| Status::invalid_argument("a price is required"))?;
        let price = convert::price_from(&wire)?;
        let price = self.state.set_price(&wire.model, price).await.map_err(status_from)?;
        self.record(&actor, Change::new("price.set", &wire.model, convert::price_summary(&price))).await?;
        let origin = self.state.list_prices().into_iter().find(|row| row.0 == wire.model).and_then(|row| row.3);
        Ok(Response::new(pb::SetPriceResponse {
            price: Some(convert::price(&wire.model, &price, crate::pricing::PriceSource::Override, origin.as_ref())),
        }))
    }

    async fn import_prices(&self, request: Request<pb::ImportPricesRequest>) -> Result<Response<pb::ImportPricesResponse>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        let done = self.state.import_prices(&req.litellm_json, &req.source).await.map_err(status_from)?;
        let detail = format!("{} models imported, {} entries skipped, {} prices changed", done.imported, done.skipped, done.changes.len());
        self.record(&actor, Change::new("price.import", &req.source, detail)).await?;
        Ok(Response::new(pb::ImportPricesResponse {
            imported: done.imported as u32,
            skipped: done.skipped as u32,
            changes: done.changes.iter().map(convert::price_change).collect(),
        }))
    }

    async fn update_prices(&self, request: Request<pb::UpdatePricesRequest>) -> Result<Response<pb::UpdatePricesResponse>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        let done = self.state.update_prices(&req.litellm_json, &req.source).await.map_err(status_from)?;
        let detail = format!("{} models fetched, {} entries skipped, {} prices changed", done.imported, done.skipped, done.changes.len());
        self.record(&actor, Change::new("price.update", &req.source, detail)).await?;
        Ok(Response::new(pb::UpdatePricesResponse {
            imported: done.imported as u32,
            skipped: done.skipped as u32,
            changes: done.changes.iter().map(convert::price_change).collect(),
        }))
    }

    async fn create_grant(&self, request: Request<pb::CreateGrantRequest>) -> Result<Response<pb::CreateGrantResponse>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        let cap = parse_cap(&req.cap).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let period = if req.period.is_empty() {
            Period::Month
        } else {
            Period::parse(&req.period)
                .ok_or_else(|| Status::invalid_argument(crate::grants::GrantError::BadPeriod(req.period.clone()).to_string()))?
        };
        let spec = GrantSpec {
            name: req.name,
            provider: req.provider,
            cap,
            period,
            expires_at: (req.expires_at > 0).then_some(req.expires_at),
            models: req.models,
            note: req.note,
            created_by: req.created_by,
            limits: convert::limits_from(req.limits.as_ref()),
            apis: convert::apis_from(&req.apis)?,
            provider_key: None,
            direct: req.direct,
            alerts: req.alerts.map(|a| a.percent),
            team: (!req.team.is_empty()).then(|| req.team.clone()),
        };
        if let Some(pool) = &spec.team {
            if spec.direct {
                return Err(Status::invalid_argument(format!(
                    "a direct grant cannot share team {pool:?}: its requests go straight to OpenRouter, so the pool would never see what it spends"
                )));
            }
            self.teams.check_joined(pool).map_err(team::team_status)?;
        }
        let (view, key, replaced) = if req.replace {
            self.backstop.replace_grant(spec).await.map_err(backstop_status)?
        } else {
            self.backstop.create_grant(spec).await.map(|(view, key)| (view, key, None)).map_err(backstop_status)?
        };
        if let Some(pool) = &view.grant.team {
            self.teams.attach(pool, view.grant.id, &view.grant.name);
        }
        let mut detail = format!("{}; key {}", convert::grant_summary(&view.grant), crate::audit::key_hint(key.expose()));
        if replaced.is_some() {
            detail.push_str("; replaced the grant of the same name (its key was revoked)");
        }
        self.record(&actor, Change::grant("grant.create", &view.grant.name, detail)).await?;
        let base_url = self.grant_base_url(&view.grant);
        Ok(Response::new(pb::CreateGrantResponse {
            grant: Some(convert::grant(&view)),
            key: key.expose().to_string(),
            base_url,
            replaced: replaced.as_ref().map(convert::grant),
        }))
    }

    async fn list_grants(&self, request: Request<pb::ListGrantsRequest>) -> Result<Response<pb::ListGrantsResponse>, Status> {
        let mut grants = Vec::new();
        for view in self.state.list_grants(request.into_inner().include_revoked) {
            let (view, observed) = if view.grant.direct && view.grant.revoked_at.is_none() {
                self.backstop.direct_view(view).await
            } else {
                let observed = self.backstop.observed(view.grant.id);
                (view, observed)
            };
            let mut grant = convert::grant(&view);
            if let (Some(key), Some(seen)) = (grant.provider_key.as_mut(), observed) {
                key.usage = convert::decimal_string(seen.usage.in_window(view.grant.period));
                key.usage_total = convert::decimal_string(seen.usage.usage);
                key.usage_at = seen.at;
            }
            grants.push(grant);
        }
        Ok(Response::new(pb::ListGrantsResponse { grants }))
    }

    async fn revoke_grant(&self, request: Request<pb::RevokeGrantRequest>) -> Result<Response<pb::RevokeGrantResponse>, Status> {
        let actor = actor(&request);
        let (view, note) = self.backstop.revoke_grant(&request.into_inner().name).await.map_err(backstop_status)?;
        let mut detail = format!("key revoked; it had spent ${} of ${} this period", money(view.spent), money(view.grant.cap));
        if !view.grant.installs.is_empty() {
            let files: Vec<&str> = view.grant.installs.iter().map(|i| i.path.as_str()).collect();
            detail.push_str(&format!("; capitctl restores {}", files.join(", ")));
        }
        self.record(&actor, Change::grant("grant.revoke", &view.grant.name, detail)).await?;
        Ok(Response::new(pb::RevokeGrantResponse { grant: Some(convert::grant(&view)), note: note.unwrap_or_default() }))
    }

    async fn update_grant(&self, request: Request<pb::UpdateGrantRequest>) -> Result<Response<pb::UpdateGrantResponse>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        let invalid = |e: crate::grants::GrantError| Status::invalid_argument(e.to_string());
        let update = crate::state::GrantUpdate {
            cap: req.cap.as_deref().map(parse_cap).transpose().map_err(invalid)?,
            period: req
                .period
                .as_deref()
                .map(|p| Period::parse(p).ok_or_else(|| crate::grants::GrantError::BadPeriod(p.to_string())))
                .transpose()
                .map_err(invalid)?,
            expires_at: req.expires_at.map(|at| (at > 0).then_some(at)),
            models: req.set_models.then(|| req.models.iter().map(|m| m.trim().to_string()).filter(|m| !m.is_empty()).collect()),
            note: req.note,
            max_requests: req.max_requests,
            max_tokens: req.max_tokens,
            rpm: req.rpm,
            tpm: req.tpm,
            concurrency: req.concurrency,
            fit: req.fit,
            apis: if req.set_apis { Some(convert::apis_from(&req.apis)?) } else { None },
            provider_key: None,
            alerts: req.alerts.map(|a| a.percent),
        };
        let before = self.state.find_grant(&req.name).map(|slot| slot.grant());
        let (view, new_key) = self.backstop.update_grant(&req.name, update).await.map_err(backstop_status)?;
        let mut detail = match before {
            Some(before) => convert::grant_changes(&before, &view.grant),
            None => convert::grant_summary(&view.grant),
        };
        if let Some(key) = &new_key {
            detail.push_str(&format!("; new direct key {}", crate::audit::key_hint(key.expose())));
        }
        self.record(&actor, Change::grant("grant.set", &view.grant.name, detail)).await?;
        let (key, base_url) = match new_key {
            Some(key) => (key.expose().to_string(), self.grant_base_url(&view.grant)),
            None => (String::new(), String::new()),
        };
        Ok(Response::new(pb::UpdateGrantResponse { grant: Some(convert::grant(&view)), key, base_url }))
    }

    async fn rotate_grant(&self, request: Request<pb::RotateGrantRequest>) -> Result<Response<pb::RotateGrantResponse>, Status> {
        let actor = actor(&request);
        let (view, key) = self.backstop.rotate_grant(&request.into_inner().name).await.map_err(backstop_status)?;
        let detail = format!("new key {}; the old key stopped working", crate::audit::key_hint(key.expose()));
        self.record(&actor, Change::grant("grant.rotate", &view.grant.name, detail)).await?;
        let base_url = self.grant_base_url(&view.grant);
        Ok(Response::new(pb::RotateGrantResponse { grant: Some(convert::grant(&view)), key: key.expose().to_string(), base_url }))
    }

    async fn record_install(&self, request: Request<pb::RecordInstallRequest>) -> Result<Response<pb::RecordInstallResponse>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        let before: Vec<String> =
            self.state.find_grant(&req.name).map(|slot| slot.grant().installs.into_iter().map(|i| i.path).collect()).unwrap_or_default();
        let change = if req.installs.is_empty() {
            Change::grant("grant.uninstall", &req.name, format!("restored {}", before.join(", ")))
        } else {
            let files: Vec<String> = req
                .installs
                .iter()
                .map(|i| format!("{} ({}, {})", i.path, i.agent, if i.original.is_some() { "edited" } else { "created" }))
                .collect();
            Change::grant("grant.install", &req.name, format!("wrote {}", files.join(", ")))
        };
        let installs = req
            .installs
            .into_iter()
            .map(|i| crate::grants::InstallRecord {
                agent: i.agent,
                path: i.path,
                original: i.original,
                written_sha256: i.written_sha256,
                mode_before: i.mode_before,
            })
            .collect();
        self.state.record_install(&req.name, installs).await.map_err(status_from)?;
        self.record(&actor, change).await?;
        Ok(Response::new(pb::RecordInstallResponse {}))
    }

    type WatchStream = watch::WatchStream;

    async fn watch(&self, _: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(watch::open(&self.state).await?))
    }

    async fn list_audit(&self, request: Request<pb::ListAuditRequest>) -> Result<Response<pb::ListAuditResponse>, Status> {
        let req = request.into_inner();
        let grant = (!req.grant.is_empty()).then_some(req.grant);
        let entries = self.state.audit_entries(req.since.saturating_mul(1000), grant).await.map_err(status_from)?;
        Ok(Response::new(pb::ListAuditResponse { entries: entries.iter().map(convert::audit_entry).collect() }))
    }

    async fn create_team(&self, request: Request<pb::CreateTeamRequest>) -> Result<Response<pb::CreateTeamResponse>, Status> {
        let actor = actor(&request);
        team::create(self, &actor, request.into_inner()).await
    }

    async fn join_team(&self, request: Request<pb::JoinTeamRequest>) -> Result<Response<pb::JoinTeamResponse>, Status> {
        let actor = actor(&request);
        team::join(self, &actor, request.into_inner()).await
    }

    async fn list_teams(&self, _: Request<pb::ListTeamsRequest>) -> Result<Response<pb::ListTeamsResponse>, Status> {
        team::list(self).await
    }

    async fn get_team_usage(&self, request: Request<pb::GetTeamUsageRequest>) -> Result<Response<pb::GetTeamUsageResponse>, Status> {
        team::usage(self, request.into_inner()).await
    }

    async fn leave_team(&self, request: Request<pb::LeaveTeamRequest>) -> Result<Response<pb::LeaveTeamResponse>, Status> {
        let actor = actor(&request);
        team::leave(self, &actor, request.into_inner()).await
    }

    async fn record_change(&self, request: Request<pb::RecordChangeRequest>) -> Result<Response<pb::RecordChangeResponse>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        if !matches!(req.action.as_str(), "service.install" | "service.uninstall") {
            return Err(Status::invalid_argument(format!("{:?} is not a change capitctl records itself", req.action)));
        }
        self.record(&actor, Change::new(&req.action, req.target, req.detail)).await?;
        Ok(Response::new(pb::RecordChangeResponse {}))
    }

    async fn get_usage(&self, request: Request<pb::GetUsageRequest>) -> Result<Response<pb::GetUsageResponse>, Status> {
        let req = request.into_inner();
        let slot = if req.grant.is_empty() {
            None
        } else {
            Some(self.state.find_grant(&req.grant).ok_or_else(|| status_from(crate::state::StateError::UnknownGrant(req.grant.clone())))?)
        };
        let entries = self.state.usage(slot.as_ref().map(|s| s.id), req.since.saturating_mul(1000)).await.map_err(status_from)?;
        let names = self.state.grant_names();
        let mut total = Totals::default();
        let mut by_model: BTreeMap<String, Totals> = BTreeMap::new();
        let mut by_day: BTreeMap<String, Totals> = BTreeMap::new();
        let mut by_grant: BTreeMap<String, Totals> = BTreeMap::new();
        let overflow = |_| Status::out_of_range("a usage total would overflow; narrow the report with --since or a grant");
        let mut by_grant_day: BTreeMap<(String, String), Totals> = BTreeMap::new();
        let mut by_model_day: BTreeMap<(String, String), Totals> = BTreeMap::new();
        for entry in &entries {
            total.add(entry).map_err(overflow)?;
            by_model.entry(entry.model.clone()).or_default().add(entry).map_err(overflow)?;
            by_day.entry(local_day(entry.at_seconds())).or_default().add(entry).map_err(overflow)?;
            let name = names.get(&entry.grant).cloned().unwrap_or_else(|| format!("#{}", entry.grant.0));
            let day = local_day(entry.at_seconds());
            by_grant_day.entry((day.clone(), name.clone())).or_default().add(entry).map_err(overflow)?;
            by_model_day.entry((day, entry.model.clone())).or_default().add(entry).map_err(overflow)?;
            by_grant.entry(name).or_default().add(entry).map_err(overflow)?;
        }
        let days =
            |map: BTreeMap<(String, String), Totals>| map.into_iter().map(|((day, series), t)| convert::day_row(day, series, &t)).collect();
        let rows = |map: BTreeMap<String, Totals>| map.into_iter().map(|(k, t)| convert::usage_row(k, &t)).collect();
        let mut response = pb::GetUsageResponse {
            grant: req.grant,
            total: Some(convert::usage_row("total".into(), &total)),
            by_model: rows(by_model),
            by_day: rows(by_day),
            by_grant: rows(by_grant),
            by_grant_day: days(by_grant_day),
            by_model_day: days(by_model_day),
            ..Default::default()
        };
        if let Some(slot) = slot {
            let view = self.state.grant_view(&slot);
            response.period_spent = convert::decimal_string(view.spent);
            response.cap = crate::grants::money(view.grant.cap);
            response.period = view.grant.period.as_str().to_string();
            response.created_by = view.grant.created_by;
            response.note = view.grant.note;
            response.refused = view.refusals.into_iter().collect();
        }
        Ok(Response::new(response))
    }

    async fn list_remote_keys(&self, request: Request<pb::ListRemoteKeysRequest>) -> Result<Response<pb::ListRemoteKeysResponse>, Status> {
        access::list_remote_keys(self, request.into_inner()).await
    }

    async fn list_access_requests(
        &self,
        _: Request<pb::ListAccessRequestsRequest>,
    ) -> Result<Response<pb::ListAccessRequestsResponse>, Status> {
        Ok(Response::new(access::list_requests(self)))
    }

    async fn approve_access_request(
        &self,
        request: Request<pb::ApproveAccessRequestRequest>,
    ) -> Result<Response<pb::ApproveAccessRequestResponse>, Status> {
        let actor = actor(&request);
        let reply = access::approve(self, request.into_inner()).await?;
        if let (Some(asked), Some(grant)) = (&reply.get_ref().request, &reply.get_ref().grant) {
            let detail = format!(
                "access request {} ({}, ${} asked: {:?}) approved; cap ${} per {}",
                asked.id, asked.kind, asked.amount, asked.reason, grant.cap, grant.period
            );
            self.record(&actor, Change::grant("request.approve", &grant.name, detail)).await?;
        }
        Ok(reply)
    }

    async fn deny_access_request(
        &self,
        request: Request<pb::DenyAccessRequestRequest>,
    ) -> Result<Response<pb::DenyAccessRequestResponse>, Status> {
        let actor = actor(&request);
        let reply = access::deny(self, request.into_inner())?;
        if let Some(asked) = &reply.get_ref().request {
            let detail = format!("access request {} ({}, ${} asked: {:?}) denied", asked.id, asked.kind, asked.amount, asked.reason);
            self.record(&actor, Change::grant("request.deny", &asked.name, detail)).await?;
        }
        Ok(reply)
    }
}

fn local_day(at: i64) -> String {
    use chrono::TimeZone;
    chrono::Local.timestamp_opt(at, 0).single().map(|t| t.format("%Y-%m-%d").to_string()).unwrap_or_default()
}

/// The peer of a control connection (the accept loop has already checked it is this user).
fn actor<T>(request: &Request<T>) -> Actor {
    let cred = request.extensions().get::<tonic::transport::server::UdsConnectInfo>().and_then(|info| info.peer_cred);
    match cred {
        Some(cred) => Actor { uid: cred.uid(), pid: cred.pid() },
        None => Actor { pid: None, ..Actor::daemon() },
    }
}
