//! Conversions between domain values and their protobuf counterparts. Money is a decimal
//! string both ways; an empty string means "not set".

use rust_decimal::Decimal;
use tonic::Status;

use crate::grants::money;
use crate::ledger::Totals;
use crate::pricing::{LongContext, Price, PriceChange, PriceSource, Provenance, TierPrices};
use crate::proto::v1 as pb;
use crate::providers::Provider;
use crate::state::{GrantView, StateError};

pub fn status_from(error: StateError) -> Status {
    match &error {
        StateError::UnknownProvider(_) | StateError::UnknownGrant(_) | StateError::NoKey(_) => Status::not_found(error.to_string()),
        StateError::ProviderExists(_) | StateError::GrantExists(_) => Status::already_exists(error.to_string()),
        StateError::Invalid(_) | StateError::Provider(_) | StateError::Grant(_) | StateError::Price(_) => {
            Status::invalid_argument(error.to_string())
        }
        // A ledger outage is the user's to fix (free some disk), so it is said plainly.
        StateError::Store(crate::store::StoreError::Unavailable(_)) => Status::unavailable(
            "capit cannot write its database (disk full?): nothing was changed; free some disk space and try again (capitctl status shows the error)",
        ),
        StateError::Store(_) | StateError::Random(_) | StateError::Audit(_) => {
            tracing::error!(error = %error, "control request failed");
            Status::internal("capitd could not complete the request; its log has the details")
        }
    }
}

pub fn decimal_string(value: Decimal) -> String {
    value.normalize().to_string()
}

pub fn optional_decimal(value: Option<Decimal>) -> String {
    value.map(decimal_string).unwrap_or_default()
}

/// Parses a decimal from the wire; `field` names it in the error.
pub fn parse_decimal(text: &str, field: &str) -> Result<Option<Decimal>, Status> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse::<Decimal>()
        .or_else(|_| Decimal::from_scientific(text))
        .map(Some)
        .map_err(|_| Status::invalid_argument(format!("{field} price {text:?} is not a decimal number")))
}

pub fn provider(p: &Provider, has_key: bool) -> pb::Provider {
    pb::Provider {
        name: p.name.clone(),
        kind: p.kind.as_str().to_string(),
        base_url: p.base_url.clone(),
        price_zero: p.price_zero,
        has_key,
        has_management_key: false,
    }
}

pub fn grant(view: &GrantView) -> pb::Grant {
    let g = &view.grant;
    pb::Grant {
        team: g.team.clone().unwrap_or_default(),
        name: g.name.clone(),
        provider: g.provider.clone(),
        cap: money(g.cap),
        period: g.period.as_str().to_string(),
        expires_at: g.expires_at.unwrap_or(0),
        models: g.models.clone(),
        spent: decimal_string(view.spent),
        state: view.state.as_str().to_string(),
        created_at: g.created_at,
        created_by: g.created_by.clone(),
        note: g.note.clone(),
        resets_at: view.window.end.unwrap_or(0),
        revoked_at: g.revoked_at.unwrap_or(0),
        id: g.id.0,
        reserved: decimal_string(view.reserved),
        lease: decimal_string(view.lease),
        limits: Some(limits(&g.limits)),
        refused: view.refusals.iter().map(|(reason, n)| (reason.clone(), *n)).collect(),
        installs: g
            .installs
            .iter()
            .map(|i| pb::InstallRecord {
                agent: i.agent.clone(),
                path: i.path.clone(),
                original: i.original.clone(),
                written_sha256: i.written_sha256.clone(),
                mode_before: i.mode_before,
            })
            .collect(),
        direct: g.direct,
        apis: g.apis.iter().map(|a| a.as_str().to_string()).collect(),
        provider_key: g.provider_key.as_deref().map(provider_key),
        alerts: g.alerts.clone(),
    }
}

/// A grant's provider key, without its secret (a fingerprint at most).
pub fn provider_key(k: &crate::backstop::ProviderKey) -> pb::ProviderKey {
    pb::ProviderKey {
        hash: k.hash.clone(),
        name: k.name.clone(),
        fingerprint: k.secret.fingerprint(),
        limit: decimal_string(k.limit),
        limit_reset: crate::backstop::limit_reset(k.reset).unwrap_or_default().to_string(),
        expires_at: k.expires_at.unwrap_or(0),
        created_at: k.created_at_ms.div_euclid(1000),
        usage: String::new(),
        usage_total: String::new(),
        usage_at: 0,
        pending_deletions: k.retired.len() as u32,
    }
}

/// Parses a scope list from the wire.
pub fn apis_from(names: &[String]) -> Result<Vec<crate::grants::Api>, Status> {
    crate::grants::parse_apis(names).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// A listed price; `origin` is where a price above the built-in table came from, and when.
pub fn price(model: &str, p: &Price, source: PriceSource, origin: Option<&Provenance>) -> pb::Price {
    let long = p.long_context.as_ref();
    let date = |at: i64| chrono::DateTime::from_timestamp(at, 0).map(|t| t.format("%Y-%m-%d").to_string()).unwrap_or_default();
    pb::Price {
        model: model.to_string(),
        input: decimal_string(p.base.input),
        cached_input: optional_decimal(p.base.cached_input),
        cache_write_5m: optional_decimal(p.base.cache_write_5m),
        cache_write_1h: optional_decimal(p.base.cache_write_1h),
        output: decimal_string(p.base.output),
        max_output_tokens: p.max_output_tokens.unwrap_or(0),
        source: match source {
            PriceSource::Builtin => "builtin",
            PriceSource::List => "list",
            PriceSource::Override => "override",
        }
        .to_string(),
        checked: match origin {
            Some(o) => date(o.at),
            None => p.checked.clone().unwrap_or_default(),
        },
        origin: match (source, origin) {
            (PriceSource::Builtin, _) => "built-in table".to_string(),
            (_, Some(o)) => o.source.clone(),
            (_, None) => "price set or import".to_string(),
        },
        long_context_threshold: long.map_or(0, |l| l.threshold),
        long_input: long.map(|l| decimal_string(l.prices.input)).unwrap_or_default(),
        long_cached_input: long.and_then(|l| l.prices.cached_input).map(decimal_string).unwrap_or_default(),
        long_output: long.map(|l| decimal_string(l.prices.output)).unwrap_or_default(),
    }
}

/// A model whose price moved, with the before and after prices as listed.
pub fn price_change(c: &PriceChange) -> pb::PriceChange {
    // Only the rates matter here: where each side came from is in `price ls`.
    let rates = |p: &Price| pb::Price {
        source: String::new(),
        origin: String::new(),
        checked: String::new(),
        ..price(&c.model, p, PriceSource::Builtin, None)
    };
    pb::PriceChange { model: c.model.clone(), before: c.before.as_ref().map(rates), after: c.after.as_ref().map(rates) }
}

/// A price from `price set`: input and output are required, the rest optional.
pub fn price_from(p: &pb::Price) -> Result<Price, Status> {
    let required = |text: &str, field: &str| {
        parse_decimal(text, field)?.ok_or_else(|| Status::invalid_argument(format!("the {field} price is required")))
    };
    let long_context = if p.long_context_threshold > 0 {
        Some(LongContext {
            threshold: p.long_context_threshold,
            prices: TierPrices {
                input: required(&p.long_input, "long-context input")?,
                cached_input: parse_decimal(&p.long_cached_input, "long-context cached input")?,
                cache_write_5m: None,
                cache_write_1h: None,
                output: required(&p.long_output, "long-context output")?,
            },
        })
    } else {
        None
    };
    Ok(Price {
        base: TierPrices {
            input: required(&p.input, "input")?,
            cached_input: parse_decimal(&p.cached_input, "cached input")?,
            cache_write_5m: parse_decimal(&p.cache_write_5m, "cache write")?,
            cache_write_1h: parse_decimal(&p.cache_write_1h, "1h cache write")?,
            output: required(&p.output, "output")?,
        },
        max_output_tokens: (p.max_output_tokens > 0).then_some(p.max_output_tokens),
        max_input_tokens: None,
        long_context,
        web_search_per_1k: None,
        per_request: None,
        checked: None,
        provider: None,
    })
}

pub fn usage_row(key: String, t: &Totals) -> pb::UsageRow {
    pb::UsageRow {
        key,
        spent: decimal_string(t.spent),
        requests: t.requests,
        input_tokens: t.input_tokens,
        cached_input_tokens: t.cached_input_tokens,
        cache_write_tokens: t.cache_write_tokens,
        output_tokens: t.output_tokens,
        reasoning_tokens: t.reasoning_tokens,
        estimated: t.estimated,
        errors: t.errors,
    }
}

pub fn limits(l: &crate::grants::Limits) -> pb::Limits {
    pb::Limits {
        max_requests: l.max_requests.unwrap_or(0),
        max_tokens: l.max_tokens.unwrap_or(0),
        rpm: l.rpm.unwrap_or(0),
        tpm: l.tpm.unwrap_or(0),
        concurrency: l.concurrency.unwrap_or(0),
        fit: l.fit,
    }
}

pub fn limits_from(l: Option<&pb::Limits>) -> crate::grants::Limits {
    let some = |n: u64| (n > 0).then_some(n);
    l.map(|l| crate::grants::Limits {
        max_requests: some(l.max_requests),
        max_tokens: some(l.max_tokens),
        rpm: some(l.rpm),
        tpm: some(l.tpm),
        concurrency: some(l.concurrency),
        fit: l.fit,
    })
    .unwrap_or_default()
}

pub fn day_row(day: String, series: String, t: &Totals) -> pb::DayRow {
    pb::DayRow { day, series, spent: decimal_string(t.spent), requests: t.requests }
}

pub fn audit_entry(e: &crate::audit::AuditEntry) -> pb::AuditEntry {
    pb::AuditEntry {
        seq: e.seq,
        at_ms: e.at_ms,
        user: e.user.clone(),
        uid: e.uid,
        pid: e.pid.unwrap_or(0),
        action: e.action.clone(),
        target: e.target.clone(),
        grant: e.grant.clone().unwrap_or_default(),
        detail: e.detail.clone(),
    }
}

/// A price in words, for the audit log.
pub fn price_summary(p: &Price) -> String {
    let mut parts = vec![format!("input ${}", decimal_string(p.base.input)), format!("output ${}", decimal_string(p.base.output))];
    if let Some(cached) = p.base.cached_input {
        parts.push(format!("cached input ${}", decimal_string(cached)));
    }
    if let Some(write) = p.base.cache_write_5m {
        parts.push(format!("cache write ${}", decimal_string(write)));
    }
    if let Some(write) = p.base.cache_write_1h {
        parts.push(format!("1h cache write ${}", decimal_string(write)));
    }
    format!("{} per million tokens", parts.join(", "))
}

/// The parts of a grant a person set, in words, for the audit log.
fn grant_fields(g: &crate::grants::Grant) -> Vec<(&'static str, String)> {
    let n = |v: Option<u64>| v.map_or("none".to_string(), |v| v.to_string());
    vec![
        ("provider", g.provider.clone()),
        ("cap", format!("${}", money(g.cap))),
        ("period", g.period.as_str().to_string()),
        ("expires", g.expires_at.map_or("never".to_string(), crate::grants::format_time)),
        ("models", if g.models.is_empty() { "any priced model".to_string() } else { g.models.join(",") }),
        ("max requests", n(g.limits.max_requests)),
        ("max tokens", n(g.limits.max_tokens)),
        ("rpm", n(g.limits.rpm)),
        ("tpm", n(g.limits.tpm)),
        ("concurrency", n(g.limits.concurrency)),
        ("fit", g.limits.fit.to_string()),
        (
            "alerts",
            if g.alerts.is_empty() { "off".to_string() } else { g.alerts.iter().map(|a| format!("{a}%")).collect::<Vec<_>>().join(",") },
        ),
        ("note", format!("{:?}", g.note)),
    ]
}

/// A new grant in words: what was set, leaving out the limits it does not have.
pub fn grant_summary(g: &crate::grants::Grant) -> String {
    grant_fields(g)
        .iter()
        .filter(|(k, v)| !(v == "none" || (*k == "fit" && v == "false") || (*k == "note" && v == "\"\"")))
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What `set` changed, field by field.
pub fn grant_changes(before: &crate::grants::Grant, after: &crate::grants::Grant) -> String {
    let changed: Vec<String> = grant_fields(before)
        .into_iter()
        .zip(grant_fields(after))
        .filter(|((_, old), (_, new))| old != new)
        .map(|((name, old), (_, new))| format!("{name} {old} -> {new}"))
        .collect();
    if changed.is_empty() { "no change".to_string() } else { changed.join("; ") }
}
