//! Access requests: a local program asks the key's owner for a grant (or a grant whose cap is
//! spent asks for more), the owner answers over the control socket, and the program collects
//! the answer with the request's poll secret, once.
//!
//! Invariants:
//! - Only the control socket approves or denies; the proxy can only ask and poll.
//! - Pending requests are bounded in number (`max_pending`) and expire (`ttl`); an answer not
//!   collected within the same time is dropped, key included. Nothing here is written to disk:
//!   a restart forgets every request, and a key not yet collected with it.
//! - A poll secret is kept only as a hash and compared in constant time; the key of an approved
//!   request leaves exactly once, to the first poll that presents the secret.
//! - An ask is input: every field is checked here before anyone sees it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::Value;

use crate::grants::{Api, GrantId, Period, parse_apis, parse_cap, validate_name};
use crate::secret::{KeyHash, RandomError, Secret};

/// Requests at most this long (bytes of JSON) are read.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

const MAX_REASON_CHARS: usize = 500;
const MAX_MODELS: usize = 32;
const POLL_SECRET_PREFIX: &str = "capit-poll-";

/// How a new request is announced on the desktop.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Notifier {
    #[default]
    None,
    /// Run `program "capit" MESSAGE` (notify-send's calling convention).
    Program(PathBuf),
    /// macOS: `osascript -e 'display notification …'`.
    AppleScript,
}

#[derive(Clone, Debug)]
pub struct AccessConfig {
    /// Seconds a request waits for its answer, and an answer for its collection.
    pub ttl_seconds: i64,
    /// Requests waiting for an answer at once.
    pub max_pending: usize,
    pub notify: Notifier,
}

impl Default for AccessConfig {
    fn default() -> AccessConfig {
        AccessConfig { ttl_seconds: 3600, max_pending: 16, notify: Notifier::None }
    }
}

/// What a program asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ask {
    /// A new grant named `app`.
    Grant(GrantAsk),
    /// More for an existing grant, asked with its own key.
    TopUp { grant: GrantId, name: String, amount: Decimal, reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantAsk {
    pub app: String,
    pub provider: String,
    pub models: Vec<String>,
    pub amount: Decimal,
    pub period: Period,
    pub expires_at: Option<i64>,
    pub reason: String,
    pub apis: Vec<Api>,
}

impl Ask {
    pub fn kind(&self) -> &'static str {
        match self {
            Ask::Grant(_) => "grant",
            Ask::TopUp { .. } => "top-up",
        }
    }

    /// The grant asked for or topped up.
    pub fn name(&self) -> &str {
        match self {
            Ask::Grant(g) => &g.app,
            Ask::TopUp { name, .. } => name,
        }
    }

    pub fn amount(&self) -> Decimal {
        match self {
            Ask::Grant(g) => g.amount,
            Ask::TopUp { amount, .. } => *amount,
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Ask::Grant(g) => &g.reason,
            Ask::TopUp { reason, .. } => reason,
        }
    }
}

/// What the owner decided, as the asking program collects it.
#[derive(Clone, Debug)]
pub struct Answer {
    pub grant: String,
    pub provider: String,
    /// The new grant's key (shown this once); `None` for a top-up, whose grant keeps its key.
    pub key: Option<Secret>,
    pub base_url: Option<String>,
    pub cap: Decimal,
    pub period: Period,
    pub expires_at: Option<i64>,
}

/// A request as the owner sees it.
#[derive(Clone, Debug)]
pub struct RequestView {
    pub id: String,
    pub ask: Ask,
    pub asked_at: i64,
    /// When it expires unanswered.
    pub answer_by: i64,
}

/// What a poll gets.
#[derive(Debug)]
pub enum Poll {
    Pending {
        answer_by: i64,
    },
    Approved(Answer),
    Denied,
    /// Approved, and already collected by an earlier poll.
    Collected,
    /// Not answered in time, or answered and not collected in time.
    Expired,
    /// No such request, or the wrong secret: the two are not told apart.
    Unknown,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccessError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} access requests are already waiting for an answer; ask again later")]
    TooMany(usize),
    #[error("a request for {name:?} is already waiting for an answer (request {id})")]
    Duplicate { name: String, id: String },
    #[error("no access request {0:?} is waiting for an answer")]
    NotPending(String),
    #[error("the system random number generator failed")]
    Random,
}

impl From<RandomError> for AccessError {
    fn from(_: RandomError) -> AccessError {
        AccessError::Random
    }
}

enum Stage {
    Pending,
    /// Taken by an approval under way (a grant being made); back to `Pending` if it fails.
    Approving,
    Approved {
        answer: Answer,
        collect_by: i64,
    },
    /// Answered; what a poll says until `until`, after which the request is forgotten.
    Denied {
        until: i64,
    },
    Collected {
        until: i64,
    },
    Expired {
        until: i64,
    },
}

struct Entry {
    ask: Ask,
    secret: KeyHash,
    asked_at: i64,
    answer_by: i64,
    stage: Stage,
}

/// The requests of one daemon, in memory.
pub struct AccessRequests {
    config: AccessConfig,
    entries: Mutex<BTreeMap<String, Entry>>,
}

impl AccessRequests {
    pub fn new(config: AccessConfig) -> AccessRequests {
        AccessRequests { config, entries: Mutex::new(BTreeMap::new()) }
    }

    pub fn config(&self) -> &AccessConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Files a request; returns its id and poll secret (shown this once).
    pub fn ask(&self, ask: Ask, now: i64) -> Result<(String, Secret), AccessError> {
        let mut entries = self.lock();
        purge(&mut entries, now, self.config.ttl_seconds);
        let waiting: Vec<(&String, &Entry)> =
            entries.iter().filter(|(_, e)| matches!(e.stage, Stage::Pending | Stage::Approving)).collect();
        if let Some((id, _)) = waiting.iter().find(|(_, e)| same_subject(&e.ask, &ask)) {
            return Err(AccessError::Duplicate { name: ask.name().to_string(), id: id.to_string() });
        }
        if waiting.len() >= self.config.max_pending {
            return Err(AccessError::TooMany(waiting.len()));
        }
        // Forgotten answers make room first, so that the map stays bounded.
        while entries.len() >= self.config.max_pending.saturating_mul(4).max(4) {
            let Some(oldest) = entries
                .iter()
                .filter(|(_, e)| !matches!(e.stage, Stage::Pending | Stage::Approving))
                .min_by_key(|(_, e)| e.asked_at)
                .map(|(id, _)| id.clone())
            else {
                break;
            };
            entries.remove(&oldest);
        }
        let id = loop {
            let id = crate::secret::random_token("r", 8, b"0123456789abcdefghijklmnopqrstuvwxyz")?.expose().to_string();
            if !entries.contains_key(&id) {
                break id;
            }
        };
        let secret = crate::secret::random_token(POLL_SECRET_PREFIX, 43, crate::secret::BASE62)?;
        let entry = Entry {
            ask,
            secret: KeyHash::of(secret.expose()),
            asked_at: now,
            answer_by: now + self.config.ttl_seconds,
            stage: Stage::Pending,
        };
        entries.insert(id.clone(), entry);
        Ok((id, secret))
    }

    /// Requests waiting for an answer, oldest first.
    pub fn pending(&self, now: i64) -> Vec<RequestView> {
        let mut entries = self.lock();
        purge(&mut entries, now, self.config.ttl_seconds);
        let mut list: Vec<RequestView> = entries
            .iter()
            .filter(|(_, e)| matches!(e.stage, Stage::Pending))
            .map(|(id, e)| RequestView { id: id.clone(), ask: e.ask.clone(), asked_at: e.asked_at, answer_by: e.answer_by })
            .collect();
        list.sort_by_key(|r| (r.asked_at, r.id.clone()));
        list
    }

    /// Takes a pending request for approval: no poll or second approval sees it meanwhile.
    pub fn begin_approval(&self, id: &str, now: i64) -> Result<RequestView, AccessError> {
        let mut entries = self.lock();
        purge(&mut entries, now, self.config.ttl_seconds);
        let entry =
            entries.get_mut(id).filter(|e| matches!(e.stage, Stage::Pending)).ok_or_else(|| AccessError::NotPending(id.to_string()))?;
        entry.stage = Stage::Approving;
        Ok(RequestView { id: id.to_string(), ask: entry.ask.clone(), asked_at: entry.asked_at, answer_by: entry.answer_by })
    }

    /// Puts a request back after its approval failed.
    pub fn abort_approval(&self, id: &str) {
        if let Some(entry) = self.lock().get_mut(id).filter(|e| matches!(e.stage, Stage::Approving)) {
            entry.stage = Stage::Pending;
        }
    }

    /// Records the answer of an approval begun with [`begin_approval`](Self::begin_approval).
    pub fn finish_approval(&self, id: &str, answer: Answer, now: i64) {
        if let Some(entry) = self.lock().get_mut(id).filter(|e| matches!(e.stage, Stage::Approving)) {
            entry.stage = Stage::Approved { answer, collect_by: now + self.config.ttl_seconds };
        }
    }

    pub fn deny(&self, id: &str, now: i64) -> Result<RequestView, AccessError> {
        let mut entries = self.lock();
        purge(&mut entries, now, self.config.ttl_seconds);
        let entry =
            entries.get_mut(id).filter(|e| matches!(e.stage, Stage::Pending)).ok_or_else(|| AccessError::NotPending(id.to_string()))?;
        entry.stage = Stage::Denied { until: now + self.config.ttl_seconds };
        Ok(RequestView { id: id.to_string(), ask: entry.ask.clone(), asked_at: entry.asked_at, answer_by: entry.answer_by })
    }

    /// Answers a poll presenting `secret`; an approval's answer is handed out once.
    pub fn poll(&self, id: &str, secret: &str, now: i64) -> Poll {
        let mut entries = self.lock();
        purge(&mut entries, now, self.config.ttl_seconds);
        let Some(entry) = entries.get_mut(id) else { return Poll::Unknown };
        if !entry.secret.ct_eq(&KeyHash::of(secret)) {
            return Poll::Unknown;
        }
        match &entry.stage {
            Stage::Pending | Stage::Approving => Poll::Pending { answer_by: entry.answer_by },
            Stage::Denied { .. } => Poll::Denied,
            Stage::Collected { .. } => Poll::Collected,
            Stage::Expired { .. } => Poll::Expired,
            Stage::Approved { .. } => {
                let until = now + self.config.ttl_seconds;
                match std::mem::replace(&mut entry.stage, Stage::Collected { until }) {
                    Stage::Approved { answer, .. } => Poll::Approved(answer),
                    _ => unreachable!("matched as approved just above"),
                }
            }
        }
    }

    /// Requests waiting for an answer now.
    pub fn count_pending(&self, now: i64) -> usize {
        self.pending(now).len()
    }
}

fn same_subject(a: &Ask, b: &Ask) -> bool {
    match (a, b) {
        (Ask::Grant(x), Ask::Grant(y)) => x.app == y.app,
        (Ask::TopUp { grant: x, .. }, Ask::TopUp { grant: y, .. }) => x == y,
        _ => false,
    }
}

/// Moves what ran out of time on: unanswered requests and uncollected answers expire (a key
/// dropped with them), and answers are forgotten a while after.
fn purge(entries: &mut BTreeMap<String, Entry>, now: i64, ttl: i64) {
    entries.retain(|id, entry| {
        match &entry.stage {
            Stage::Pending if now >= entry.answer_by => {
                tracing::info!(request = %id, grant = entry.ask.name(), kind = entry.ask.kind(), "access request expired unanswered");
                entry.stage = Stage::Expired { until: now + ttl };
            }
            Stage::Approved { collect_by, .. } if now >= *collect_by => {
                tracing::info!(request = %id, grant = entry.ask.name(), "access request's answer expired uncollected; its key was dropped");
                entry.stage = Stage::Expired { until: now + ttl };
            }
            _ => {}
        }
        !matches!(entry.stage, Stage::Denied { until } | Stage::Collected { until } | Stage::Expired { until } if now >= until)
    });
}

/// The body of a request for a new grant.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    app: Value,
    provider: Value,
    #[serde(default)]
    models: Option<Vec<String>>,
    amount: Value,
    #[serde(default)]
    period: Option<String>,
    #[serde(default)]
    expires: Option<String>,
    reason: Value,
    #[serde(default)]
    apis: Option<Vec<String>>,
}

/// The body of a top-up, asked with the grant's own key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopUpBody {
    amount: Value,
    reason: Value,
}

fn invalid(message: impl Into<String>) -> AccessError {
    AccessError::Invalid(message.into())
}

fn json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, AccessError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(invalid(format!("the request body is larger than {MAX_BODY_BYTES} bytes")));
    }
    serde_json::from_slice(body).map_err(|e| invalid(format!("the request body is not valid: {e}")))
}

fn string(value: &Value, field: &str) -> Result<String, AccessError> {
    value.as_str().map(|s| s.trim().to_string()).ok_or_else(|| invalid(format!("\"{field}\" must be a string")))
}

fn amount(value: &Value) -> Result<Decimal, AccessError> {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return Err(invalid("\"amount\" must be a number of US dollars, such as \"5.00\"")),
    };
    parse_cap(&text).map_err(|e| invalid(e.to_string()))
}

fn reason(value: &Value) -> Result<String, AccessError> {
    let text = string(value, "reason")?;
    if text.is_empty() || text.chars().count() > MAX_REASON_CHARS || text.chars().any(char::is_control) {
        return Err(invalid(format!("\"reason\" must be 1-{MAX_REASON_CHARS} characters on one line, saying why the access is needed")));
    }
    Ok(text)
}

/// Reads a request for a new grant (`{app, provider, models, amount, period, expires, reason,
/// apis}`); `now` fixes a relative expiry.
pub fn parse_grant_ask(body: &[u8], now: i64) -> Result<GrantAsk, AccessError> {
    let b: GrantBody = json(body)?;
    let app = string(&b.app, "app")?;
    validate_name(&app).map_err(|e| invalid(e.to_string()))?;
    let provider = string(&b.provider, "provider")?;
    crate::providers::validate_name(&provider).map_err(|_| invalid(format!("\"provider\" {provider:?} is not a provider name")))?;
    let models: Vec<String> = b.models.unwrap_or_default().into_iter().map(|m| m.trim().to_string()).filter(|m| !m.is_empty()).collect();
    if models.len() > MAX_MODELS {
        return Err(invalid(format!("at most {MAX_MODELS} models may be asked for")));
    }
    for model in &models {
        crate::pricing::validate_model_name(model).map_err(|e| invalid(format!("model {model:?}: {e}")))?;
    }
    let period = match b.period.as_deref().map(str::trim) {
        None | Some("") => Period::Month,
        Some(p) => Period::parse(p).ok_or_else(|| invalid(format!("unknown period {p:?}; use day, week, month or total")))?,
    };
    let expires_at = match b.expires.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => {
            let at = crate::when::parse_expiry(text, now).map_err(invalid)?;
            if at <= now {
                return Err(invalid("\"expires\" must be in the future"));
            }
            Some(at)
        }
    };
    let apis = parse_apis(&b.apis.unwrap_or_default()).map_err(|e| invalid(e.to_string()))?;
    Ok(GrantAsk { app, provider, models, amount: amount(&b.amount)?, period, expires_at, reason: reason(&b.reason)?, apis })
}

/// Reads a top-up (`{amount, reason}`).
pub fn parse_top_up(body: &[u8]) -> Result<(Decimal, String), AccessError> {
    let b: TopUpBody = json(body).map_err(|e| match e {
        AccessError::Invalid(m) => invalid(format!("{m} (a top-up, asked with a grant's key, takes only \"amount\" and \"reason\")")),
        other => other,
    })?;
    Ok((amount(&b.amount)?, reason(&b.reason)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    fn requests(max_pending: usize) -> AccessRequests {
        AccessRequests::new(AccessConfig { ttl_seconds: 60, max_pending, notify: Notifier::None })
    }

    fn ask(app: &str) -> Ask {
        Ask::Grant(GrantAsk {
            app: app.into(),
            provider: "openai".into(),
            models: vec![],
            amount: dec("2"),
            period: Period::Month,
            expires_at: None,
            reason: "nightly evals".into(),
            apis: vec![],
        })
    }

    fn answer() -> Answer {
        Answer {
            grant: "evals".into(),
            provider: "openai".into(),
            key: Some(Secret::new("sk-capit-x".into())),
            base_url: None,
            cap: dec("2"),
            period: Period::Month,
            expires_at: None,
        }
    }

    #[test]
    fn an_approved_answer_is_collected_once_with_its_secret() {
        let r = requests(4);
        let (id, secret) = r.ask(ask("evals"), 0).unwrap();
        assert!(secret.expose().starts_with(POLL_SECRET_PREFIX));
        assert!(matches!(r.poll(&id, secret.expose(), 1), Poll::Pending { answer_by: 60 }));
        assert!(matches!(r.poll(&id, "capit-poll-wrong", 1), Poll::Unknown), "a wrong secret learns nothing");
        assert!(matches!(r.poll("nope", secret.expose(), 1), Poll::Unknown));
        assert_eq!(r.pending(1).len(), 1);
        let taken = r.begin_approval(&id, 2).unwrap();
        assert_eq!(taken.ask, ask("evals"));
        assert!(r.begin_approval(&id, 2).is_err(), "one approval at a time");
        assert!(r.pending(2).is_empty());
        r.finish_approval(&id, answer(), 3);
        match r.poll(&id, secret.expose(), 4) {
            Poll::Approved(a) => assert_eq!(a.key.unwrap().expose(), "sk-capit-x"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(r.poll(&id, secret.expose(), 5), Poll::Collected), "the second poll gets nothing");
        assert!(matches!(r.poll(&id, secret.expose(), 5 + 60), Poll::Unknown), "forgotten after a while");
    }

    #[test]
    fn requests_expire_are_bounded_and_not_repeated() {
        let r = requests(2);
        let (a, secret) = r.ask(ask("a"), 0).unwrap();
        assert!(matches!(r.ask(ask("a"), 1), Err(AccessError::Duplicate { .. })));
        r.ask(ask("b"), 1).unwrap();
        assert!(matches!(r.ask(ask("c"), 2), Err(AccessError::TooMany(2))));
        // A denial frees the place; so does expiry.
        r.deny(&a, 3).unwrap();
        assert!(matches!(r.poll(&a, secret.expose(), 4), Poll::Denied));
        assert!(r.deny(&a, 4).is_err(), "answered already");
        r.ask(ask("c"), 5).unwrap();
        assert!(r.ask(ask("d"), 6).is_err());
        assert_eq!(r.count_pending(61), 1, "b expired after its ttl");
        r.ask(ask("d"), 61).unwrap();
        // An approval collected too late is gone, key and all.
        let (e, secret) = r.ask(ask("e"), 200).unwrap();
        r.begin_approval(&e, 200).unwrap();
        r.finish_approval(&e, answer(), 200);
        assert!(matches!(r.poll(&e, secret.expose(), 260), Poll::Expired));
        // A failed approval puts the request back.
        let (f, _) = r.ask(ask("f"), 300).unwrap();
        r.begin_approval(&f, 300).unwrap();
        r.abort_approval(&f);
        assert_eq!(r.pending(300).iter().map(|v| v.id.clone()).collect::<Vec<_>>(), [f]);
    }

    #[test]
    fn bodies_are_checked_like_any_input() {
        let ok = br#"{"app":"evals","provider":"openrouter","models":["openai/gpt-5-mini"],"amount":"5.00","period":"week","expires":"7d","reason":"nightly evals","apis":["chat"]}"#;
        let g = parse_grant_ask(ok, 1000).unwrap();
        assert_eq!(
            (g.app.as_str(), g.amount, g.period, g.expires_at, g.apis.as_slice()),
            ("evals", dec("5"), Period::Week, Some(1000 + 7 * 86_400), &[Api::Chat][..])
        );
        let minimal = parse_grant_ask(br#"{"app":"x","provider":"openai","amount":2,"reason":"r"}"#, 0).unwrap();
        assert_eq!((minimal.period, minimal.amount), (Period::Month, dec("2")));
        for bad in [
            &br#"{"app":"x","provider":"openai","amount":"2","reason":"r","admin":true}"#[..],
            br#"{"app":"../x","provider":"openai","amount":"2","reason":"r"}"#,
            br#"{"app":"x","provider":"openai","amount":"-2","reason":"r"}"#,
            br#"{"app":"x","provider":"openai","amount":"2","reason":""}"#,
            br#"{"app":"x","provider":"openai","amount":"2","reason":"a\nb"}"#,
            br#"{"app":"x","provider":"openai","amount":"2","reason":"r","expires":"yesterday"}"#,
            br#"{"app":"x","provider":"openai","amount":"2","reason":"r","apis":["images"]}"#,
            br#"{"app":"x","provider":"Open AI","amount":"2","reason":"r"}"#,
            br#"{"app":"x","amount":"2","reason":"r"}"#,
            br#"[1,2]"#,
        ] {
            assert!(parse_grant_ask(bad, 0).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(parse_grant_ask(&vec![b' '; MAX_BODY_BYTES + 1], 0).is_err());
        assert_eq!(parse_top_up(br#"{"amount":"1.50","reason":"one more eval run"}"#).unwrap(), (dec("1.5"), "one more eval run".into()));
        let err = parse_top_up(br#"{"amount":"1","reason":"r","app":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("takes only"), "{err}");
    }
}
