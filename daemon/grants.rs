//! Grants: a budget and limits given to one agent for one provider, and the rules that admit
//! or refuse a request against them.
//!
//! Invariant: every decision is a pure function of the grant, its spend and an explicit `now`,
//! so the rules are tested without clocks, sockets or disks. Calendar periods are computed in
//! the time zone the caller passes (the user's local zone in the daemon).

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::secret::KeyHash;

/// A grant's stable identity; names can be reused after a revoke, ids never are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GrantId(pub u64);

/// The window a spend cap applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    Week,
    Month,
    Total,
}

impl Period {
    pub fn parse(text: &str) -> Option<Period> {
        Some(match text {
            "day" | "daily" => Period::Day,
            "week" | "weekly" => Period::Week,
            "month" | "monthly" => Period::Month,
            "total" => Period::Total,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
            Period::Total => "total",
        }
    }

    /// The word used in sentences: "monthly cap", "total cap".
    pub fn adjective(self) -> &'static str {
        match self {
            Period::Day => "daily",
            Period::Week => "weekly",
            Period::Month => "monthly",
            Period::Total => "total",
        }
    }

    /// The period containing `now`: its start and its end (when it resets), as Unix seconds.
    /// Days start at local midnight, weeks on Monday, months on the 1st; `Total` never resets.
    pub fn window<Tz: TimeZone>(self, now: &DateTime<Tz>) -> Window {
        let tz = now.timezone();
        let date = now.date_naive();
        let (start, end) = match self {
            Period::Total => return Window { start: 0, end: None },
            Period::Day => (date, date + Duration::days(1)),
            Period::Week => {
                let start = date - Duration::days(i64::from(date.weekday().num_days_from_monday()));
                (start, start + Duration::days(7))
            }
            Period::Month => {
                let start = date.with_day(1).unwrap_or(date);
                (start, first_of_next_month(start))
            }
        };
        Window { start: local_midnight(&tz, start), end: Some(local_midnight(&tz, end)) }
    }
}

fn first_of_next_month(first: NaiveDate) -> NaiveDate {
    let (year, month) = if first.month() == 12 { (first.year() + 1, 1) } else { (first.year(), first.month() + 1) };
    NaiveDate::from_ymd_opt(year, month, 1).unwrap_or(first)
}

/// Unix seconds of the first instant of `date` in `tz` (the earliest, where a DST change makes
/// midnight ambiguous; the first valid instant after it where midnight does not exist).
fn local_midnight<Tz: TimeZone>(tz: &Tz, date: NaiveDate) -> i64 {
    let mut naive = date.and_hms_opt(0, 0, 0).unwrap_or_default();
    for _ in 0..24 * 4 {
        if let Some(instant) = tz.from_local_datetime(&naive).earliest() {
            return instant.timestamp();
        }
        naive += Duration::minutes(15);
    }
    naive.and_utc().timestamp()
}

/// One spend window, in Unix seconds; `end` is `None` for a total cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: i64,
    pub end: Option<i64>,
}

impl Window {
    pub fn contains(&self, at: i64) -> bool {
        at >= self.start && self.end.is_none_or(|end| at < end)
    }
}

/// A grant as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub id: GrantId,
    pub name: String,
    pub provider: String,
    pub cap: Decimal,
    pub period: Period,
    /// Unix seconds after which the key stops working.
    pub expires_at: Option<i64>,
    /// Models the grant may use; empty means any priced model.
    pub models: Vec<String>,
    #[serde(with = "hash_hex")]
    pub key_hash: KeyHash,
    pub created_at: i64,
    pub created_by: String,
    pub note: String,
    pub revoked_at: Option<i64>,
    /// Limits besides the spend cap; all optional.
    #[serde(default)]
    pub limits: Limits,
    /// The agent configuration files capitctl changed for this grant, to undo on revoke.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub installs: Vec<InstallRecord>,
    /// The billable APIs the grant may call; empty means all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apis: Vec<Api>,
    /// The provider's own capped key for this grant (OpenRouter), when capit made one: the proxy
    /// forwards with it, so the provider enforces the cap as a second lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_key: Option<Box<crate::backstop::ProviderKey>>,
    /// The agent was handed `provider_key` itself and talks to the provider directly: capit
    /// neither sees nor meters its requests, and only the provider's limit caps it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub direct: bool,
    /// Percentages of the cap at which an alert fires (once per period each), ascending.
    #[serde(default = "default_alerts")]
    pub alerts: Vec<u32>,
    /// The team pool the grant also draws on (`grant --team`): a request must fit both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
}

/// A billable API, as a grant's scope names it (`--apis chat,embeddings`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// Chat Completions (OpenAI, OpenRouter, OpenAI-compatible servers).
    Chat,
    /// OpenAI's Responses API.
    Responses,
    Embeddings,
    /// Anthropic Messages.
    Messages,
    /// Gemini `generateContent` and `streamGenerateContent`.
    Generate,
}

impl Api {
    pub const ALL: [Api; 5] = [Api::Chat, Api::Responses, Api::Embeddings, Api::Messages, Api::Generate];

    pub fn parse(text: &str) -> Option<Api> {
        Api::ALL.into_iter().find(|api| api.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Api::Chat => "chat",
            Api::Responses => "responses",
            Api::Embeddings => "embeddings",
            Api::Messages => "messages",
            Api::Generate => "generate",
        }
    }

    /// The scope a metered endpoint falls under.
    pub fn of(api: crate::providers::MeteredApi) -> Api {
        use crate::providers::MeteredApi as M;
        match api {
            M::OpenAiChat => Api::Chat,
            M::OpenAiResponses => Api::Responses,
            M::OpenAiEmbeddings => Api::Embeddings,
            M::AnthropicMessages => Api::Messages,
            M::GeminiGenerate => Api::Generate,
        }
    }
}

/// Reads a scope list (`chat,embeddings`): known names, each once, in a fixed order.
pub fn parse_apis(names: &[String]) -> Result<Vec<Api>, GrantError> {
    let mut apis = Vec::new();
    for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        let api = Api::parse(name).ok_or_else(|| GrantError::BadApi(name.to_string()))?;
        if !apis.contains(&api) {
            apis.push(api);
        }
    }
    apis.sort();
    Ok(apis)
}

/// `chat, embeddings`, for messages.
pub fn api_list(apis: &[Api]) -> String {
    apis.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(", ")
}

/// The alert thresholds of a grant made without `--alert`, and of grants stored before alerts.
pub const DEFAULT_ALERTS: [u32; 2] = [80, 100];

fn default_alerts() -> Vec<u32> {
    DEFAULT_ALERTS.to_vec()
}

/// Checks alert thresholds (1 to 1000 percent) and returns them ascending, without repeats.
pub fn validate_alerts(percents: &[u32]) -> Result<Vec<u32>, GrantError> {
    if let Some(bad) = percents.iter().find(|p| !(1..=1000).contains(*p)) {
        return Err(GrantError::BadAlert(*bad));
    }
    let mut sorted = percents.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    Ok(sorted)
}

/// An agent's configuration file changed for a grant: its text before, and a hash of the text
/// written (which holds the key, so it is not kept).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallRecord {
    pub agent: String,
    pub path: String,
    pub original: Option<String>,
    pub written_sha256: String,
    /// The file's permission bits before capitctl made it 0600, when that changed them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode_before: Option<u32>,
}

/// A grant's limits besides money. `max_requests` and `max_tokens` count over the grant's
/// whole life (a till-style activation count); the rates count over the last minute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Requests admitted per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Tokens (input and output) settled per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u64>,
    /// Lower a request's max output tokens to a fair share of what the budget has room for,
    /// rather than refuse it, as long as at least [`MIN_FIT_OUTPUT_TOKENS`] fit. On unless the
    /// user turned it off; grants stored before it was the default (no field) get it too.
    #[serde(default = "fit_by_default")]
    pub fit: bool,
}

fn fit_by_default() -> bool {
    true
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_requests: None, max_tokens: None, rpm: None, tpm: None, concurrency: None, fit: fit_by_default() }
    }
}

/// The least output worth sending a request for when fitting it into what is left.
pub const MIN_FIT_OUTPUT_TOKENS: u64 = 256;

/// What a grant has used of its count and rate limits, as the daemon tracks it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Requests admitted over the grant's life (in flight included).
    pub requests: u64,
    /// Tokens settled over the grant's life, plus the token bounds of requests in flight.
    pub tokens: u64,
    pub in_flight: u64,
    /// Requests admitted in the last minute, and when the oldest of them leaves the minute.
    pub requests_last_minute: u64,
    pub requests_free_at: i64,
    /// Tokens settled in the last minute, and when enough leave it to go under the limit.
    pub tokens_last_minute: u64,
    pub tokens_free_at: i64,
}

mod hash_hex {
    use crate::secret::KeyHash;

    pub fn serialize<S: serde::Serializer>(hash: &KeyHash, s: S) -> Result<S::Ok, S::Error> {
        let hex: String = hash.0.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&hex)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<KeyHash, D::Error> {
        let hex: String = serde::Deserialize::deserialize(d)?;
        let mut out = [0u8; 32];
        if hex.len() != 64 {
            return Err(serde::de::Error::custom("key hash must be 64 hex digits"));
        }
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(serde::de::Error::custom)?;
        }
        Ok(KeyHash(out))
    }
}

impl Refusal {
    /// A short name for why, under which refusals are counted per grant.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Revoked { .. } => "revoked",
            Refusal::Expired { .. } => "expired",
            Refusal::ModelNotAllowed { .. } => "model_not_allowed",
            Refusal::Exhausted { .. } => "cap_spent",
            Refusal::WouldExceed { .. } => "would_exceed_cap",
            Refusal::Busy { queue_full: Some(_), .. } => "queue_full",
            Refusal::Busy { .. } => "queue_timeout",
            Refusal::RequestsUsed { .. } => "max_requests",
            Refusal::TokensUsed { .. } => "max_tokens",
            Refusal::RateLimited { what: "tokens", .. } => "tpm",
            Refusal::RateLimited { .. } => "rpm",
            Refusal::TooManyInFlight { .. } => "concurrency",
            Refusal::ApiNotAllowed { .. } => "api_not_allowed",
            Refusal::Team { unreachable: true, .. } => "team_unreachable",
            Refusal::Team { .. } => "team_cap",
        }
    }

    /// The same refusal after the request waited `seconds` for room (or found `queue_full`).
    pub fn with_wait(self, seconds: u64, queue_full: Option<usize>) -> Refusal {
        match self {
            Refusal::Busy { grant, left, held, least, .. } => {
                Refusal::Busy { grant, left, held, least, waited_seconds: seconds, queue_full }
            }
            other => other,
        }
    }

    /// Seconds after which the same request may succeed, for refusals that pass with time.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Refusal::RateLimited { retry_after, .. } => Some(*retry_after),
            Refusal::TooManyInFlight { .. } => Some(1),
            Refusal::Busy { .. } => Some(BUSY_RETRY_SECONDS),
            Refusal::Team { unreachable: true, .. } => Some(5),
            _ => None,
        }
    }
}

/// The state `capitctl ls` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantState {
    Active,
    Exhausted,
    Expired,
    Revoked,
}

impl GrantState {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantState::Active => "active",
            GrantState::Exhausted => "exhausted",
            GrantState::Expired => "expired",
            GrantState::Revoked => "revoked",
        }
    }
}

/// How a grant whose cap is spent asks its owner for more (see `access`), said at the end of
/// its 429.
const TOP_UP_HINT: &str =
    " To ask its owner for more, POST {\"amount\": \"5.00\", \"reason\": \"...\"} with this key to /capit/v1/requests on this proxy.";

/// Why a request was refused; each has a sentence an agent can show its user.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("capit: grant \"{grant}\" was revoked")]
    Revoked { grant: String },
    #[error("capit: grant \"{grant}\" expired on {}", format_time(*at))]
    Expired { grant: String, at: i64 },
    #[error("capit: grant \"{grant}\" may not use model \"{model}\" (allowed: {})", allowed.join(", "))]
    ModelNotAllowed { grant: String, model: String, allowed: Vec<String> },
    #[error("capit: grant \"{grant}\" has spent ${} of its ${} {} cap{}.{}", money(*spent), money(*cap), period.adjective(), resets_phrase(*resets_at), TOP_UP_HINT)]
    Exhausted { grant: String, spent: Decimal, cap: Decimal, period: Period, resets_at: Option<i64> },
    #[error("capit: grant \"{grant}\" has used all {max} requests it was given")]
    RequestsUsed { grant: String, max: u64 },
    #[error("capit: grant \"{grant}\" has used {used} of its {max} tokens, and this request could use up to {request} more")]
    TokensUsed { grant: String, used: u64, max: u64, request: u64 },
    #[error("capit: grant \"{grant}\" allows {limit} {what} per minute; try again in {retry_after} s")]
    RateLimited { grant: String, what: &'static str, limit: u64, retry_after: u64 },
    #[error("capit: grant \"{grant}\" allows {limit} requests at once; try again when one finishes")]
    TooManyInFlight { grant: String, limit: u64 },
    #[error("capit: grant \"{grant}\" has ${} left of its ${} {} cap and this request could cost up to ${}{}; send less context or a lower max output{}.{}", money(*left), money(*cap), period.adjective(), money(*least), lowered_phrase(*output_tokens), resets_phrase(*resets_at), TOP_UP_HINT)]
    WouldExceed {
        grant: String,
        left: Decimal,
        least: Decimal,
        cap: Decimal,
        period: Period,
        resets_at: Option<i64>,
        output_tokens: Option<u64>,
    },
    #[error("capit: grant \"{grant}\" has ${} left, but requests in flight hold ${} of it and this request needs up to ${}; {}; try again in {} s", money(*left), money(*held), money(*least), busy_phrase(*waited_seconds, *queue_full), BUSY_RETRY_SECONDS)]
    Busy { grant: String, left: Decimal, held: Decimal, least: Decimal, waited_seconds: u64, queue_full: Option<usize> },
    #[error("capit: grant \"{grant}\" may use only the {} API{}, not {}", api_list(allowed), if allowed.len() == 1 { "" } else { "s" }, api.as_str())]
    ApiNotAllowed { grant: String, api: Api, allowed: Vec<Api> },
    /// The team pool the grant draws on refused: no room, or its database cannot be reached
    /// (`unreachable`) and what this daemon holds does not cover the request.
    #[error("{message}")]
    Team { message: String, unreachable: bool },
}

impl Grant {
    pub fn state(&self, now: i64, spent: Decimal) -> GrantState {
        if self.revoked_at.is_some() {
            GrantState::Revoked
        } else if self.expires_at.is_some_and(|at| now >= at) {
            GrantState::Expired
        } else if spent >= self.cap {
            GrantState::Exhausted
        } else {
            GrantState::Active
        }
    }

    /// Refuses a grant that is revoked or expired; enough for free calls such as model lists.
    pub fn check_alive(&self, now: i64) -> Result<(), Refusal> {
        if self.revoked_at.is_some() {
            return Err(Refusal::Revoked { grant: self.name.clone() });
        }
        if let Some(at) = self.expires_at.filter(|at| now >= *at) {
            return Err(Refusal::Expired { grant: self.name.clone(), at });
        }
        Ok(())
    }

    /// Refuses a request that would break a count or rate limit; `request_tokens` is the most
    /// tokens it can use.
    pub fn check_limits(&self, now_ms: i64, used: &Usage, request_tokens: u64) -> Result<(), Refusal> {
        let l = &self.limits;
        let grant = || self.name.clone();
        if let Some(max) = l.max_requests.filter(|max| used.requests >= *max) {
            return Err(Refusal::RequestsUsed { grant: grant(), max });
        }
        if let Some(max) = l.max_tokens.filter(|max| used.tokens.saturating_add(request_tokens) > *max) {
            return Err(Refusal::TokensUsed { grant: grant(), used: used.tokens, max, request: request_tokens });
        }
        if let Some(limit) = l.concurrency.filter(|limit| used.in_flight >= *limit) {
            return Err(Refusal::TooManyInFlight { grant: grant(), limit });
        }
        let wait = |free_at: i64| ((free_at - now_ms).max(0) as u64).div_ceil(1000).max(1);
        if let Some(limit) = l.rpm.filter(|limit| used.requests_last_minute >= *limit) {
            return Err(Refusal::RateLimited { grant: grant(), what: "requests", limit, retry_after: wait(used.requests_free_at) });
        }
        if let Some(limit) = l.tpm.filter(|limit| used.tokens_last_minute >= *limit) {
            return Err(Refusal::RateLimited { grant: grant(), what: "tokens", limit, retry_after: wait(used.tokens_free_at) });
        }
        Ok(())
    }

    /// Refuses a billable API outside the grant's scope.
    pub fn check_api(&self, api: Api) -> Result<(), Refusal> {
        if self.apis.is_empty() || self.apis.contains(&api) {
            Ok(())
        } else {
            Err(Refusal::ApiNotAllowed { grant: self.name.clone(), api, allowed: self.apis.clone() })
        }
    }

    /// Refuses a model outside the grant's list.
    pub fn check_model(&self, model: &str) -> Result<(), Refusal> {
        if self.allows_model(model) {
            Ok(())
        } else {
            Err(Refusal::ModelNotAllowed { grant: self.name.clone(), model: model.to_string(), allowed: self.models.clone() })
        }
    }

    /// A model is allowed when the list is empty, names it, or names it without its dated
    /// suffix (allowing `gpt-5-mini` allows `gpt-5-mini-2025-08-07`).
    pub fn allows_model(&self, model: &str) -> bool {
        self.models.is_empty()
            || self.models.iter().any(|allowed| {
                model == allowed
                    || model.strip_prefix(allowed.as_str()).is_some_and(|rest| {
                        let rest = rest.trim_start_matches('-');
                        rest.len() >= 8 && rest.chars().all(|c| c.is_ascii_digit() || c == '-')
                    })
            })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrantError {
    #[error("grant name {0:?} must be 1-64 characters of letters, digits, '.', '-' or '_'")]
    BadName(String),
    #[error("cap {0} must be a positive amount of at most 1000000 dollars with at most 6 decimals")]
    BadCap(String),
    #[error("unknown period {0:?}; use day, week, month or total")]
    BadPeriod(String),
    #[error("expiry must be in the future")]
    ExpiryInPast,
    #[error("unknown API {0:?}; use chat, responses, embeddings, messages or generate")]
    BadApi(String),
    #[error("alert threshold {0}% must be between 1 and 1000 percent of the cap")]
    BadAlert(u32),
}

pub fn validate_name(name: &str) -> Result<(), GrantError> {
    let ok = (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok { Ok(()) } else { Err(GrantError::BadName(name.to_string())) }
}

/// Parses a cap such as `5`, `5.00` or `$12.50`.
pub fn parse_cap(text: &str) -> Result<Decimal, GrantError> {
    let bad = || GrantError::BadCap(text.to_string());
    let digits = text.trim().trim_start_matches('$');
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad());
    }
    let cap: Decimal = digits.parse().map_err(|_| bad())?;
    if cap <= Decimal::ZERO || cap > Decimal::from(1_000_000) || cap.scale() > 6 {
        return Err(bad());
    }
    Ok(cap)
}

/// Money for people: at least two decimals, more only when they carry value ($0.000375).
pub fn money(amount: Decimal) -> String {
    let normal = amount.normalize();
    if normal.scale() <= 2 { format!("{:.2}", normal) } else { normal.to_string() }
}

/// When to retry a request that found the budget held by requests in flight.
const BUSY_RETRY_SECONDS: u64 = 2;

fn lowered_phrase(output_tokens: Option<u64>) -> String {
    match output_tokens {
        Some(n) => format!(" even with its output lowered to {n} tokens"),
        None => String::new(),
    }
}

fn busy_phrase(waited_seconds: u64, queue_full: Option<usize>) -> String {
    match queue_full {
        Some(depth) => format!("{depth} requests are already waiting for room"),
        None => format!("it waited {waited_seconds} s for them to finish"),
    }
}

fn resets_phrase(resets_at: Option<i64>) -> String {
    match resets_at {
        Some(at) => format!("; it resets on {}", format_time(at)),
        None => String::new(),
    }
}

/// A date (and time, when it is not midnight) in the local time zone.
pub fn format_time(at: i64) -> String {
    match chrono::Local.timestamp_opt(at, 0).single() {
        Some(t) if t.format("%H:%M:%S").to_string() == "00:00:00" => t.format("%Y-%m-%d").to_string(),
        Some(t) => t.format("%Y-%m-%d %H:%M %Z").to_string(),
        None => at.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::FixedOffset;

    fn at(tz: i32, y: i32, m: u32, d: u32, h: u32) -> DateTime<FixedOffset> {
        FixedOffset::east_opt(tz * 3600).unwrap().with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
    }

    fn grant() -> Grant {
        Grant {
            id: GrantId(1),
            name: "claude".into(),
            provider: "openai".into(),
            cap: "5".parse().unwrap(),
            period: Period::Month,
            expires_at: Some(2_000_000_000),
            models: vec![],
            key_hash: KeyHash([0; 32]),
            created_at: 0,
            created_by: "me".into(),
            note: String::new(),
            revoked_at: None,
            limits: Limits::default(),
            installs: Vec::new(),
            apis: Vec::new(),
            provider_key: None,
            direct: false,
            alerts: DEFAULT_ALERTS.to_vec(),
            team: None,
        }
    }

    #[test]
    fn count_and_rate_limits_refuse_at_their_edge() {
        let mut g = grant();
        g.limits = Limits { max_requests: Some(3), max_tokens: Some(1000), rpm: Some(2), tpm: Some(500), concurrency: Some(1), fit: false };
        let fresh = Usage::default();
        assert_eq!(g.check_limits(0, &fresh, 1000), Ok(()));
        assert!(matches!(g.check_limits(0, &Usage { requests: 3, ..fresh }, 1), Err(Refusal::RequestsUsed { max: 3, .. })));
        assert!(matches!(g.check_limits(0, &Usage { tokens: 1, ..fresh }, 1000), Err(Refusal::TokensUsed { .. })));
        assert!(matches!(g.check_limits(0, &Usage { in_flight: 1, ..fresh }, 1), Err(Refusal::TooManyInFlight { limit: 1, .. })));
        let rpm = g.check_limits(10_000, &Usage { requests_last_minute: 2, requests_free_at: 52_500, ..fresh }, 1).unwrap_err();
        assert_eq!(rpm.retry_after(), Some(43));
        assert_eq!(rpm.to_string(), "capit: grant \"claude\" allows 2 requests per minute; try again in 43 s");
        let tpm = g.check_limits(0, &Usage { tokens_last_minute: 500, tokens_free_at: 0, ..fresh }, 1).unwrap_err();
        assert_eq!(tpm.retry_after(), Some(1));
    }

    #[test]
    fn windows_follow_the_local_calendar() {
        let now = at(2, 2026, 11, 23, 1); // Monday 01:00 at UTC+2.
        let midnight = at(2, 2026, 11, 23, 0).timestamp();
        assert_eq!(Period::Day.window(&now), Window { start: midnight, end: Some(midnight + 86400) });
        assert_eq!(Period::Week.window(&now), Window { start: midnight, end: Some(midnight + 7 * 86400) });
        let sunday = at(2, 2026, 11, 29, 23);
        assert_eq!(Period::Week.window(&sunday).start, midnight);
        let month = Period::Month.window(&now);
        assert_eq!(month.start, at(2, 2026, 11, 1, 0).timestamp());
        assert_eq!(month.end, Some(at(2, 2026, 12, 1, 0).timestamp()));
        let december = Period::Month.window(&at(-5, 2026, 12, 31, 23));
        assert_eq!(december.end, Some(at(-5, 2027, 1, 1, 0).timestamp()));
        assert_eq!(Period::Total.window(&now), Window { start: 0, end: None });
    }

    #[test]
    fn alive_and_model_checks() {
        let g = grant();
        assert_eq!(g.check_alive(10), Ok(()));
        assert!(matches!(g.check_alive(2_000_000_000), Err(Refusal::Expired { .. })));
        let mut limited = g.clone();
        limited.models = vec!["gpt-5-mini".into()];
        assert_eq!(limited.check_model("gpt-5-mini-2025-08-07"), Ok(()));
        assert!(matches!(limited.check_model("gpt-5"), Err(Refusal::ModelNotAllowed { .. })));
        assert!(matches!(limited.check_model("gpt-5-mini-turbo"), Err(Refusal::ModelNotAllowed { .. })));
        let mut revoked = g.clone();
        revoked.revoked_at = Some(5);
        assert!(matches!(revoked.check_alive(10), Err(Refusal::Revoked { .. })));
        assert_eq!(revoked.state(10, Decimal::ZERO), GrantState::Revoked);
        assert_eq!(g.state(10, "5".parse().unwrap()), GrantState::Exhausted);
    }

    #[test]
    fn budget_refusals_say_what_is_left_and_what_the_request_needs() {
        let d = |t: &str| t.parse::<Decimal>().unwrap();
        let too_big = Refusal::WouldExceed {
            grant: "claude".into(),
            left: d("1"),
            least: d("1.71"),
            cap: d("5"),
            period: Period::Month,
            resets_at: None,
            output_tokens: Some(256),
        };
        assert_eq!(
            too_big.to_string(),
            format!(
                "capit: grant \"claude\" has $1.00 left of its $5.00 monthly cap and this request could cost up to $1.71 even with its output lowered to 256 tokens; send less context or a lower max output.{TOP_UP_HINT}"
            )
        );
        assert_eq!((too_big.reason(), too_big.retry_after()), ("would_exceed_cap", None));
        let busy =
            Refusal::Busy { grant: "claude".into(), left: d("1"), held: d("0.8"), least: d("0.3"), waited_seconds: 0, queue_full: None }
                .with_wait(60, None);
        assert_eq!(
            busy.to_string(),
            "capit: grant \"claude\" has $1.00 left, but requests in flight hold $0.80 of it and this request needs up to $0.30; it waited 60 s for them to finish; try again in 2 s"
        );
        assert_eq!((busy.reason(), busy.retry_after()), ("queue_timeout", Some(2)));
        let full = busy.with_wait(0, Some(64));
        assert!(full.to_string().contains("64 requests are already waiting for room"), "{full}");
        assert_eq!(full.reason(), "queue_full");
    }

    #[test]
    fn exhausted_message_names_spent_cap_and_reset() {
        let r = Refusal::Exhausted {
            grant: "claude".into(),
            spent: "4.98".parse().unwrap(),
            cap: "5".parse().unwrap(),
            period: Period::Month,
            resets_at: None,
        };
        assert_eq!(
            r.to_string(),
            "capit: grant \"claude\" has spent $4.98 of its $5.00 monthly cap. To ask its owner for more, POST {\"amount\": \"5.00\", \"reason\": \"...\"} with this key to /capit/v1/requests on this proxy."
        );
    }

    #[test]
    fn scopes_limit_the_apis() {
        let mut g = grant();
        assert_eq!(g.check_api(Api::Embeddings), Ok(()), "no scope: every API");
        g.apis = parse_apis(&["embeddings".into(), " chat".into(), "chat".into()]).unwrap();
        assert_eq!(g.apis, [Api::Chat, Api::Embeddings]);
        assert_eq!(g.check_api(Api::Chat), Ok(()));
        let refused = g.check_api(Api::Responses).unwrap_err();
        assert_eq!(refused.to_string(), "capit: grant \"claude\" may use only the chat, embeddings APIs, not responses");
        assert_eq!(refused.reason(), "api_not_allowed");
        assert_eq!(parse_apis(&["images".into()]), Err(GrantError::BadApi("images".into())));
        assert_eq!(Api::of(crate::providers::MeteredApi::GeminiGenerate), Api::Generate);
    }

    #[test]
    fn caps_and_money() {
        assert_eq!(parse_cap("5.00").unwrap(), "5".parse::<Decimal>().unwrap());
        assert_eq!(parse_cap("$0.5").unwrap(), "0.5".parse::<Decimal>().unwrap());
        for bad in ["0", "-1", "abc", "1e3", "", "2000000", "0.0000001"] {
            assert!(parse_cap(bad).is_err(), "{bad}");
        }
        assert_eq!(money("5".parse().unwrap()), "5.00");
        assert_eq!(money("0.000375".parse().unwrap()), "0.000375");
        assert_eq!(money("4.9800".parse().unwrap()), "4.98");
    }
}
