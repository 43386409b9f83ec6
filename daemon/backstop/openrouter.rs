//! OpenRouter's key-management API, as capit uses it. Checked against OpenRouter's public docs
//! (openrouter.ai/docs: "Management API Keys", the API reference pages for create, update,
//! delete, list and get-current key, and "Limits"):
//!
//! - `POST /api/v1/keys` `{name, limit, limit_reset, include_byok_in_limit, expires_at}` → 201
//!   `{data: {hash, name, label, disabled, limit, limit_remaining, limit_reset, usage, ...}, key}`;
//!   the key itself is returned only here. `limit` is USD; `limit_reset` is `daily`, `weekly`,
//!   `monthly` or null (resets at midnight UTC, weeks Monday to Sunday); `expires_at` must be UTC.
//! - `PATCH /api/v1/keys/{hash}` `{name, disabled, limit, limit_reset, include_byok_in_limit}` →
//!   200 `{data}`. There is no `expires_at` here, so a new expiry means a new key.
//! - `DELETE /api/v1/keys/{hash}` → 200 `{deleted: true}`.
//! - `GET /api/v1/keys?offset=N&include_disabled=true` → `{data: [...]}`, 100 at a time.
//! - `GET /api/v1/key`, with the key itself → `{data: {limit, limit_remaining, limit_reset, usage,
//!   usage_daily, usage_weekly, usage_monthly, is_management_key, expires_at, ...}}`.
//!
//! All of them but the last need the management key as Bearer; a management key cannot call
//! models. Figures in replies are input: validated like any other (finite, within bounds).

use rust_decimal::Decimal;
use serde_json::{Value, json};

use super::{KeyUsage, format_utc, parse_utc};
use crate::grants::Period;
use crate::proxy::outbound::{Outbound, OutboundError};
use crate::secret::Secret;

/// Keys per page of `GET /api/v1/keys` (OpenRouter's page size), and the most pages read.
const PAGE: usize = 100;
const MAX_PAGES: usize = 100;

/// The most a figure in a reply may be, in USD; anything larger is not a real bill.
const MAX_FIGURE: Decimal = Decimal::from_parts(1_000_000_000, 0, 0, false, 0);

#[derive(Debug, thiserror::Error)]
pub enum ManagementError {
    #[error("OpenRouter: {0}")]
    Transport(#[from] OutboundError),
    #[error("OpenRouter answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("OpenRouter's reply could not be read: {0}")]
    BadReply(String),
}

impl ManagementError {
    /// The provider no longer has the key (deleted there, or never made).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ManagementError::Refused { status: 404, .. })
    }
}

/// A key to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewKey {
    pub name: String,
    pub limit: Decimal,
    pub reset: Option<Period>,
    pub expires_at: Option<i64>,
}

/// A key as the management API describes it (never with its secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteKey {
    pub hash: String,
    pub name: String,
    /// OpenRouter's own redacted form of the key (`sk-or-v1-abc...123`).
    pub label: String,
    pub disabled: bool,
    pub figures: KeyUsage,
}

/// A key just made: its description and, this once, the key itself.
pub struct CreatedKey {
    pub key: RemoteKey,
    pub secret: Secret,
}

/// What `GET /api/v1/key` says of the key presented.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurrentKey {
    pub figures: KeyUsage,
    pub is_management_key: bool,
}

/// The body of `POST /api/v1/keys`. Money is written as its exact decimal text.
pub fn create_body(new: &NewKey) -> String {
    let mut body = format!(
        "{{\"name\":{},\"limit\":{},\"limit_reset\":{},\"include_byok_in_limit\":true",
        json!(new.name),
        new.limit.normalize(),
        json!(super::limit_reset(new.reset))
    );
    if let Some(at) = new.expires_at {
        body.push_str(&format!(",\"expires_at\":{}", json!(format_utc(at))));
    }
    body.push('}');
    body
}

/// The body of `PATCH /api/v1/keys/{hash}` setting the limit and its reset.
pub fn limit_body(limit: Decimal, reset: Option<Period>) -> String {
    format!("{{\"limit\":{},\"limit_reset\":{}}}", limit.normalize(), json!(super::limit_reset(reset)))
}

fn money(value: Option<&Value>, field: &str) -> Result<Option<Decimal>, ManagementError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            let not_a_number = || ManagementError::BadReply(format!("{field} is not a number"));
            // The digits as written, never through a float rounding the text did not have.
            let text = v.as_number().ok_or_else(not_a_number)?.to_string();
            let amount = text.parse::<Decimal>().ok().or_else(|| Decimal::from_scientific(&text).ok()).ok_or_else(not_a_number)?;
            if amount.abs() > MAX_FIGURE {
                return Err(ManagementError::BadReply(format!("{field} {amount} is out of range")));
            }
            Ok(Some(amount))
        }
    }
}

/// A usage figure: present or zero, and never negative.
fn usage(value: Option<&Value>, field: &str) -> Result<Decimal, ManagementError> {
    let amount = money(value, field)?.unwrap_or_default();
    if amount.is_sign_negative() && !amount.is_zero() {
        return Err(ManagementError::BadReply(format!("{field} is negative")));
    }
    Ok(amount)
}

fn reset(value: Option<&Value>) -> Result<Option<Period>, ManagementError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => match s.as_str() {
            "daily" => Ok(Some(Period::Day)),
            "weekly" => Ok(Some(Period::Week)),
            "monthly" => Ok(Some(Period::Month)),
            other => Err(ManagementError::BadReply(format!("unknown limit_reset {other:?}"))),
        },
        Some(_) => Err(ManagementError::BadReply("limit_reset is not a string".into())),
    }
}

fn figures(data: &Value) -> Result<KeyUsage, ManagementError> {
    Ok(KeyUsage {
        limit: money(data.get("limit"), "limit")?,
        limit_remaining: money(data.get("limit_remaining"), "limit_remaining")?,
        reset: reset(data.get("limit_reset"))?,
        usage: usage(data.get("usage"), "usage")?,
        usage_daily: usage(data.get("usage_daily"), "usage_daily")?,
        usage_weekly: usage(data.get("usage_weekly"), "usage_weekly")?,
        usage_monthly: usage(data.get("usage_monthly"), "usage_monthly")?,
        expires_at: data.get("expires_at").and_then(Value::as_str).and_then(parse_utc),
    })
}

fn text(data: &Value, field: &str, max: usize) -> Result<String, ManagementError> {
    let value = data.get(field).and_then(Value::as_str).ok_or_else(|| ManagementError::BadReply(format!("no {field}")))?;
    if value.len() > max || value.chars().any(char::is_control) {
        return Err(ManagementError::BadReply(format!("{field} is not a plain short string")));
    }
    Ok(value.to_string())
}

/// One key of a management reply.
pub fn parse_key(data: &Value) -> Result<RemoteKey, ManagementError> {
    let hash = text(data, "hash", 256)?;
    if hash.is_empty() || !hash.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_')) {
        return Err(ManagementError::BadReply("the key's hash is not a plain identifier".into()));
    }
    Ok(RemoteKey {
        hash,
        name: text(data, "name", 1024).unwrap_or_default(),
        label: text(data, "label", 256).unwrap_or_default(),
        disabled: data.get("disabled").and_then(Value::as_bool).unwrap_or(false),
        figures: figures(data)?,
    })
}

/// The reply of `POST /api/v1/keys`.
pub fn parse_created(body: &[u8]) -> Result<CreatedKey, ManagementError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ManagementError::BadReply(e.to_string()))?;
    let key = parse_key(value.get("data").ok_or_else(|| ManagementError::BadReply("no data".into()))?)?;
    let secret = value.get("key").and_then(Value::as_str).ok_or_else(|| ManagementError::BadReply("no key in the reply".into()))?;
    if secret.is_empty() || secret.len() > 4096 || secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ManagementError::BadReply("the new key is not a plain token".into()));
    }
    Ok(CreatedKey { key, secret: Secret::new(secret.to_string()) })
}

/// The reply of `GET /api/v1/key`.
pub fn parse_current(body: &[u8]) -> Result<CurrentKey, ManagementError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ManagementError::BadReply(e.to_string()))?;
    let data = value.get("data").ok_or_else(|| ManagementError::BadReply("no data".into()))?;
    let flag = |name: &str| data.get(name).and_then(Value::as_bool).unwrap_or(false);
    Ok(CurrentKey { figures: figures(data)?, is_management_key: flag("is_management_key") || flag("is_provisioning_key") })
}

/// An error reply's message, made safe to show: on one line, short, with anything shaped like
/// an OpenRouter key cut to its prefix.
pub fn error_message(status: u16, body: &[u8]) -> String {
    let value: Option<Value> = serde_json::from_slice(body).ok();
    let message = value
        .as_ref()
        .and_then(|v| v.pointer("/error/message").or_else(|| v.get("message")))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("HTTP {status}"));
    let words: Vec<String> = message
        .split_whitespace()
        .map(|w| if w.contains("sk-or-") { "sk-or-…".to_string() } else { w.chars().filter(|c| !c.is_control()).collect() })
        .collect();
    let line = words.join(" ");
    if line.chars().count() > 300 { format!("{}…", line.chars().take(300).collect::<String>()) } else { line }
}

/// The management API of one OpenRouter base URL (`https://openrouter.ai/api`).
pub struct ManagementApi<'a> {
    pub outbound: &'a Outbound,
    pub base_url: &'a str,
}

impl ManagementApi<'_> {
    async fn call(&self, method: &str, path: &str, key: &Secret, body: Option<String>) -> Result<bytes::Bytes, ManagementError> {
        let url = format!("{}/v1/{path}", self.base_url);
        let reply = self.outbound.send(method, &url, key, body).await?;
        if (200..300).contains(&reply.status) {
            Ok(reply.body)
        } else {
            Err(ManagementError::Refused { status: reply.status, message: error_message(reply.status, &reply.body) })
        }
    }

    pub async fn create(&self, management: &Secret, new: &NewKey) -> Result<CreatedKey, ManagementError> {
        parse_created(&self.call("POST", "keys", management, Some(create_body(new))).await?)
    }

    pub async fn set_limit(
        &self,
        management: &Secret,
        hash: &str,
        limit: Decimal,
        reset: Option<Period>,
    ) -> Result<RemoteKey, ManagementError> {
        let body = self.call("PATCH", &format!("keys/{hash}"), management, Some(limit_body(limit, reset))).await?;
        let value: Value = serde_json::from_slice(&body).map_err(|e| ManagementError::BadReply(e.to_string()))?;
        parse_key(value.get("data").ok_or_else(|| ManagementError::BadReply("no data".into()))?)
    }

    /// Deletes a key; one the provider no longer has counts as deleted.
    pub async fn delete(&self, management: &Secret, hash: &str) -> Result<(), ManagementError> {
        match self.call("DELETE", &format!("keys/{hash}"), management, None).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every key of the account (disabled ones too), page by page.
    pub async fn list(&self, management: &Secret) -> Result<Vec<RemoteKey>, ManagementError> {
        let mut keys = Vec::new();
        for page in 0..MAX_PAGES {
            let body = self.call("GET", &format!("keys?include_disabled=true&offset={}", page * PAGE), management, None).await?;
            let value: Value = serde_json::from_slice(&body).map_err(|e| ManagementError::BadReply(e.to_string()))?;
            let data = value.get("data").and_then(Value::as_array).ok_or_else(|| ManagementError::BadReply("no data list".into()))?;
            for item in data {
                keys.push(parse_key(item)?);
            }
            if data.len() < PAGE {
                break;
            }
        }
        Ok(keys)
    }

    /// What the provider says of `key` itself (its usage and limit; whether it is a management key).
    pub async fn current(&self, key: &Secret) -> Result<CurrentKey, ManagementError> {
        parse_current(&self.call("GET", "key", key, None).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_exact_money_and_utc_expiry() {
        let new = NewKey {
            name: "capit:claude#1@abc".into(),
            limit: "4.980".parse().unwrap(),
            reset: Some(Period::Week),
            expires_at: Some(1_830_297_599),
        };
        let body: Value = serde_json::from_str(&create_body(&new)).unwrap();
        assert_eq!(
            body,
            json!({"name":"capit:claude#1@abc","limit":4.98,"limit_reset":"weekly","include_byok_in_limit":true,"expires_at":"2027-12-31T23:59:59Z"})
        );
        assert!(create_body(&new).contains("\"limit\":4.98,"), "written as its decimal text");
        let total = NewKey { reset: None, expires_at: None, ..new };
        assert_eq!(serde_json::from_str::<Value>(&create_body(&total)).unwrap()["limit_reset"], Value::Null);
        assert_eq!(limit_body("0.000001".parse().unwrap(), Some(Period::Day)), r#"{"limit":0.000001,"limit_reset":"daily"}"#);
    }

    #[test]
    fn replies_are_read_and_checked() {
        let created = br#"{"data":{"hash":"f01d52606dc8","name":"capit:a#1@x","label":"sk-or-v1-d35...55d","disabled":false,"limit":50,"limit_remaining":50,"limit_reset":"monthly","include_byok_in_limit":true,"usage":0,"usage_daily":0,"usage_weekly":0,"usage_monthly":0,"created_at":"2025-08-24T10:30:00Z","updated_at":null,"expires_at":"2027-12-31T23:59:59Z"},"key":"sk-or-v1-d3558566a246"}"#;
        let c = parse_created(created).unwrap();
        assert_eq!((c.key.hash.as_str(), c.secret.expose()), ("f01d52606dc8", "sk-or-v1-d3558566a246"));
        assert_eq!(c.key.figures.limit, Some("50".parse().unwrap()));
        assert_eq!(c.key.figures.reset, Some(Period::Month));
        assert_eq!(c.key.figures.expires_at, parse_utc("2027-12-31T23:59:59Z"));

        let current = br#"{"data":{"label":"sk-or-v1-au7...890","limit":100,"limit_remaining":74.5,"limit_reset":"monthly","usage":25.5,"usage_daily":1.5e-5,"usage_weekly":25.5,"usage_monthly":25.5,"is_free_tier":false,"is_management_key":false,"expires_at":null}}"#;
        let k = parse_current(current).unwrap();
        assert_eq!(k.figures.usage_daily, "0.000015".parse().unwrap());
        assert_eq!(k.figures.in_window(Period::Total), "25.5".parse().unwrap());
        assert!(!k.is_management_key);
        assert!(parse_current(br#"{"data":{"is_provisioning_key":true,"usage":0}}"#).unwrap().is_management_key);

        for bad in [
            &br#"{"data":{"usage":-1}}"#[..],
            br#"{"data":{"usage":"lots"}}"#,
            br#"{"data":{"usage":1e300}}"#,
            br#"{"data":{"limit_reset":"hourly"}}"#,
            br#"not json"#,
        ] {
            assert!(parse_current(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(parse_key(&json!({"hash":"../../x"})).is_err(), "a hash goes into a URL path");
        assert!(parse_created(br#"{"data":{"hash":"h"},"key":"sk-or has space"}"#).is_err());
    }

    #[test]
    fn error_messages_never_show_a_key() {
        let body = br#"{"error":{"code":401,"message":"No auth credentials found for sk-or-v1-0123456789abcdef"}}"#;
        assert_eq!(error_message(401, body), "No auth credentials found for sk-or-…");
        assert_eq!(error_message(502, b"<html>"), "HTTP 502");
    }
}
