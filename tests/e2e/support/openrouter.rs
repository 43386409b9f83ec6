//! OpenRouter's key-management API, faked: management keys, the keys they make (with a limit,
//! its reset at midnight UTC, an expiry), and the limit enforced on every request made with such
//! a key, as OpenRouter does: a request is admitted while the key's usage in its window is below
//! its limit, and charged after (so one request can overshoot), and refused with 402 once the
//! limit is reached (`error.metadata.limit_source: "openrouter_key_limit"`, per OpenRouter's
//! "Limits" page). Served by the fake upstream at the real paths (`/v1/keys`, `/v1/key`).

use std::sync::Mutex;

use chrono::{Datelike, Duration, TimeZone, Utc};
use http::request::Parts;
use rust_decimal::Decimal;
use serde_json::{Map, Value, json};

use super::upstream::Script;

/// A key as the fake keeps it.
#[derive(Clone, Debug)]
pub struct FakeKey {
    pub hash: String,
    pub secret: String,
    pub name: String,
    pub disabled: bool,
    pub limit: Option<Decimal>,
    pub limit_reset: Option<String>,
    pub include_byok_in_limit: bool,
    pub expires_at: Option<i64>,
    pub created_at: i64,
    /// (when, amount) of every request charged to the key.
    pub charges: Vec<(i64, Decimal)>,
}

impl FakeKey {
    /// Usage since `start` (Unix seconds).
    fn usage_since(&self, start: i64) -> Decimal {
        self.charges.iter().filter(|(at, _)| *at >= start).map(|(_, amount)| *amount).sum()
    }

    pub fn usage(&self) -> Decimal {
        self.usage_since(i64::MIN)
    }

    /// Usage in the key's current window: the UTC day, week (from Monday) or month.
    pub fn usage_in_window(&self, reset: Option<&str>) -> Decimal {
        self.usage_since(window_start(reset, Utc::now().timestamp()))
    }

    fn json(&self) -> Value {
        let now = Utc::now().timestamp();
        let num = |d: Decimal| json!(d.to_string().parse::<f64>().unwrap());
        let used = self.usage_in_window(self.limit_reset.as_deref());
        json!({
            "hash": self.hash, "name": self.name, "label": format!("{}...{}", &self.secret[..12], &self.secret[self.secret.len() - 3..]),
            "disabled": self.disabled,
            "limit": self.limit.map(num), "limit_remaining": self.limit.map(|l| num(l - used)),
            "limit_reset": self.limit_reset, "include_byok_in_limit": self.include_byok_in_limit,
            "usage": num(self.usage()),
            "usage_daily": num(self.usage_since(window_start(Some("daily"), now))),
            "usage_weekly": num(self.usage_since(window_start(Some("weekly"), now))),
            "usage_monthly": num(self.usage_since(window_start(Some("monthly"), now))),
            "byok_usage": 0, "byok_usage_daily": 0, "byok_usage_weekly": 0, "byok_usage_monthly": 0,
            "created_at": rfc3339(self.created_at), "updated_at": null,
            "expires_at": self.expires_at.map(rfc3339),
        })
    }
}

fn rfc3339(at: i64) -> String {
    Utc.timestamp_opt(at, 0).unwrap().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The start of OpenRouter's current window for a reset (midnight UTC; weeks from Monday).
fn window_start(reset: Option<&str>, now: i64) -> i64 {
    let today = Utc.timestamp_opt(now, 0).unwrap().date_naive();
    let start = match reset {
        Some("daily") => today,
        Some("weekly") => today - Duration::days(i64::from(today.weekday().num_days_from_monday())),
        Some("monthly") => today.with_day(1).unwrap(),
        _ => return i64::MIN,
    };
    start.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp()
}

#[derive(Default)]
struct Inner {
    management: Vec<String>,
    keys: Vec<FakeKey>,
    /// Charge each keyed request this much, whatever usage.cost says (a bill the client never sees).
    overbill: Option<Decimal>,
    /// The management API answers 503 (OpenRouter unreachable for key management).
    down: bool,
    /// Keys deleted (refused from then on); other unknown keys are taken for master keys.
    deleted: Vec<String>,
    next: u64,
}

#[derive(Default)]
pub struct OpenRouter {
    inner: Mutex<Inner>,
}

type Answer = (u16, Value);

fn error(status: u16, message: &str) -> Answer {
    (status, json!({"error": {"code": status, "message": message}}))
}

fn bearer(parts: &Parts) -> Option<String> {
    let value = parts.headers.get("authorization")?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(str::to_string)
}

fn decimal(value: &Value) -> Option<Decimal> {
    match value {
        Value::Number(n) => n.to_string().parse().ok().or_else(|| Decimal::from_scientific(&n.to_string()).ok()),
        _ => None,
    }
}

fn random_hex(n: usize, seed: u64) -> String {
    let mut out = String::new();
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15 ^ (Utc::now().timestamp_nanos_opt().unwrap_or(0) as u64);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push_str(&format!("{x:016x}"));
    }
    out.truncate(n);
    out
}

/// A fresh key with no limit, named `name`.
fn new_key(inner: &mut Inner, name: &str) -> FakeKey {
    inner.next += 1;
    FakeKey {
        hash: random_hex(64, inner.next),
        secret: format!("sk-or-v1-{}", random_hex(64, inner.next + 1000)),
        name: name.to_string(),
        disabled: false,
        limit: None,
        limit_reset: None,
        include_byok_in_limit: false,
        expires_at: None,
        created_at: Utc::now().timestamp(),
        charges: Vec::new(),
    }
}

/// Checks a create or update body: known fields of the right types only.
fn check_body(body: &Map<String, Value>, allowed: &[&str]) -> Result<(), Answer> {
    for (field, value) in body {
        if !allowed.contains(&field.as_str()) {
            return Err(error(400, &format!("Unrecognized key: \"{field}\"")));
        }
        let ok = match field.as_str() {
            "name" | "creator_user_id" | "workspace_id" => value.is_string(),
            "limit" => value.is_null() || decimal(value).is_some_and(|d| d >= Decimal::ZERO),
            "limit_reset" => value.is_null() || matches!(value.as_str(), Some("daily" | "weekly" | "monthly")),
            "include_byok_in_limit" | "disabled" => value.is_boolean(),
            "expires_at" => {
                value.is_null()
                    || value.as_str().is_some_and(|s| {
                        s.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(s).is_ok_and(|t| t.timestamp() > Utc::now().timestamp())
                    })
            }
            _ => false,
        };
        if !ok {
            return Err(error(400, &format!("Invalid value for \"{field}\"")));
        }
    }
    Ok(())
}

impl OpenRouter {
    pub fn add_management_key(&self, key: &str) {
        self.inner.lock().unwrap().management.push(key.to_string());
    }

    /// Charges every keyed request `amount` (or, with `None`, the cost it reports).
    pub fn overbill(&self, amount: Option<&str>) {
        self.inner.lock().unwrap().overbill = amount.map(|a| a.parse().unwrap());
    }

    /// Makes the management API unreachable (503) or reachable again.
    pub fn set_down(&self, down: bool) {
        self.inner.lock().unwrap().down = down;
    }

    /// The keys as they are now, oldest first.
    pub fn keys(&self) -> Vec<FakeKey> {
        self.inner.lock().unwrap().keys.clone()
    }

    pub fn key_named(&self, prefix: &str) -> Option<FakeKey> {
        self.keys().into_iter().find(|k| k.name.starts_with(prefix))
    }

    /// Makes a key as a person would on openrouter.ai (not through capit).
    pub fn make_key(&self, name: &str) -> FakeKey {
        let mut inner = self.inner.lock().unwrap();
        let key = new_key(&mut inner, name);
        inner.keys.push(key.clone());
        key
    }

    /// Answers the management API, and refuses a request made with one of its keys when that key
    /// is unknown, disabled, expired, over its limit, or a management key; `None` lets the fake
    /// serve the request (charging the key for it first).
    pub fn serve(&self, parts: &Parts, body: &[u8], script: &Script) -> Option<Answer> {
        let path = parts.uri.path();
        let method = parts.method.as_str();
        let token = bearer(parts);
        let mut inner = self.inner.lock().unwrap();
        let is_management = token.as_ref().is_some_and(|t| inner.management.contains(t));
        if path == "/v1/keys" || path.starts_with("/v1/keys/") || path == "/v1/key" {
            if inner.down {
                return Some(error(503, "Service temporarily unavailable"));
            }
            if path == "/v1/key" {
                return Some(self.current(&inner, token.as_deref(), is_management));
            }
            if !is_management {
                return Some(error(401, "Management key required"));
            }
            return Some(match (method, path.strip_prefix("/v1/keys").unwrap()) {
                ("GET", "") => {
                    let query = parts.uri.query().unwrap_or("");
                    let offset: usize = query.split('&').find_map(|p| p.strip_prefix("offset=")).and_then(|o| o.parse().ok()).unwrap_or(0);
                    let disabled = query.contains("include_disabled=true");
                    let all: Vec<Value> =
                        inner.keys.iter().filter(|k| disabled || !k.disabled).skip(offset).take(100).map(FakeKey::json).collect();
                    (200, json!({"data": all}))
                }
                ("POST", "") | ("POST", "/") => self.create(&mut inner, body),
                (_, rest) => {
                    let hash = rest.trim_start_matches('/');
                    let Some(index) = inner.keys.iter().position(|k| k.hash == hash) else { return Some(error(404, "API key not found")) };
                    match method {
                        "GET" => (200, json!({"data": inner.keys[index].json()})),
                        "DELETE" => {
                            let gone = inner.keys.remove(index);
                            inner.deleted.push(gone.secret);
                            (200, json!({"deleted": true}))
                        }
                        "PATCH" => self.update(&mut inner.keys[index], body),
                        _ => error(405, "Method not allowed"),
                    }
                }
            });
        }
        let billable = method == "POST" && matches!(path, "/v1/chat/completions" | "/v1/embeddings");
        let token = token?;
        if is_management {
            return Some(error(403, "Management keys cannot be used to make API calls"));
        }
        if inner.deleted.contains(&token) {
            return Some(error(401, "User not found."));
        }
        let overbill = inner.overbill;
        let now = Utc::now().timestamp();
        // A key the fake never made is an account's master key: served as usual.
        let key = inner.keys.iter_mut().find(|k| k.secret == token)?;
        if key.disabled {
            return Some(error(401, "This API key is disabled"));
        }
        if key.expires_at.is_some_and(|at| now >= at) {
            return Some(error(401, "This API key has expired"));
        }
        if let Some(limit) = key.limit
            && key.usage_in_window(key.limit_reset.as_deref()) >= limit
        {
            return Some((
                402,
                json!({"error": {"code": 402, "message": "Key limit exceeded", "metadata": {"limit_source": "openrouter_key_limit", "remedy_hint": "Raise the key's credit limit or wait for it to reset."}}}),
            ));
        }
        if billable && script.status == 200 {
            let reported = script.report_cost.map(|c| Decimal::from_scientific(c).or_else(|_| c.parse()).unwrap()).unwrap_or_default();
            key.charges.push((now, overbill.unwrap_or(reported)));
        }
        None
    }

    fn current(&self, inner: &Inner, token: Option<&str>, is_management: bool) -> Answer {
        if is_management {
            return (
                200,
                json!({"data": {"label": "sk-or-v1-mgm...xyz", "limit": null, "limit_remaining": null, "limit_reset": null, "usage": 0, "usage_daily": 0, "usage_weekly": 0, "usage_monthly": 0, "is_free_tier": false, "is_management_key": true, "is_provisioning_key": true, "expires_at": null}}),
            );
        }
        match token.and_then(|t| inner.keys.iter().find(|k| k.secret == t)) {
            Some(key) => {
                let mut data = key.json();
                let object = data.as_object_mut().unwrap();
                for field in ["hash", "name", "disabled", "created_at", "updated_at"] {
                    object.remove(field);
                }
                object.insert("is_free_tier".into(), json!(false));
                object.insert("is_management_key".into(), json!(false));
                object.insert("is_provisioning_key".into(), json!(false));
                (200, json!({"data": data}))
            }
            None => error(401, "User not found."),
        }
    }

    fn create(&self, inner: &mut Inner, body: &[u8]) -> Answer {
        let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(body) else { return error(400, "Invalid JSON body") };
        if let Err(answer) =
            check_body(&body, &["name", "limit", "limit_reset", "include_byok_in_limit", "expires_at", "creator_user_id", "workspace_id"])
        {
            return answer;
        }
        let Some(name) = body.get("name").and_then(Value::as_str).filter(|n| !n.is_empty()) else { return error(400, "name is required") };
        let key = FakeKey {
            limit: body.get("limit").and_then(decimal),
            limit_reset: body.get("limit_reset").and_then(Value::as_str).map(str::to_string),
            include_byok_in_limit: body.get("include_byok_in_limit").and_then(Value::as_bool).unwrap_or(false),
            expires_at: body
                .get("expires_at")
                .and_then(Value::as_str)
                .map(|s| chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp()),
            ..new_key(inner, name)
        };
        let answer = (201, json!({"data": key.json(), "key": key.secret}));
        inner.keys.push(key);
        answer
    }

    fn update(&self, key: &mut FakeKey, body: &[u8]) -> Answer {
        let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(body) else { return error(400, "Invalid JSON body") };
        if let Err(answer) = check_body(&body, &["name", "disabled", "limit", "limit_reset", "include_byok_in_limit"]) {
            return answer;
        }
        if let Some(name) = body.get("name").and_then(Value::as_str) {
            key.name = name.to_string();
        }
        if let Some(disabled) = body.get("disabled").and_then(Value::as_bool) {
            key.disabled = disabled;
        }
        if let Some(limit) = body.get("limit") {
            key.limit = decimal(limit);
        }
        if let Some(reset) = body.get("limit_reset") {
            key.limit_reset = reset.as_str().map(str::to_string);
        }
        if let Some(byok) = body.get("include_byok_in_limit").and_then(Value::as_bool) {
            key.include_byok_in_limit = byok;
        }
        (200, json!({"data": key.json()}))
    }
}
