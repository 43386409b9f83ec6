//! capit's own endpoints on the proxy: access requests (see `access`).
//!
//! - `POST /capit/v1/requests` `{app, provider, models, amount, period, expires, reason, apis}`
//!   asks for a new grant; with a grant's own key and `{amount, reason}` it asks for more for
//!   that grant. Answer: 202 `{id, secret, status: "pending", poll, answer_by}`.
//! - `GET /capit/v1/requests/{id}` with `Authorization: Bearer <secret>`: 202 while pending; 200
//!   with the key and base URL once approved (exactly once); 403 denied; 410 expired or already
//!   collected; 404 for an unknown id or a wrong secret.
//!
//! Only local programs may ask: a request carrying an `Origin` header (a web page) or a `Host`
//! that is not loopback (DNS rebinding) is refused. Approving is for the control socket alone.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::body::{ProxyBody, full};
use crate::access::{AccessError, Ask, MAX_BODY_BYTES, Poll};
use crate::backstop::format_utc;
use crate::grants::{GrantState, money};
use crate::state::State;

pub async fn handle(state: &Arc<State>, req: Request<Incoming>) -> Response<ProxyBody> {
    match route(state, req).await {
        Ok(response) => response,
        Err((status, code, message)) => error(status, code, &message, None),
    }
}

type Refused = (StatusCode, &'static str, String);

fn refused(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refused {
    (status, code, message.into())
}

async fn route(state: &Arc<State>, req: Request<Incoming>) -> Result<Response<ProxyBody>, Refused> {
    if req.headers().contains_key(header::ORIGIN) {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "capit_not_local",
            "capit: access requests come from local programs, not from web pages",
        ));
    }
    if !host_is_loopback(req.headers().get(header::HOST).and_then(|h| h.to_str().ok()), req.uri().host()) {
        return Err(refused(StatusCode::FORBIDDEN, "capit_not_local", "capit: access requests must be sent to 127.0.0.1 or localhost"));
    }
    let path = req.uri().path().trim_end_matches('/').to_string();
    match (req.method(), path.strip_prefix("/capit/v1/requests")) {
        (&Method::POST, Some("")) => ask(state, req).await,
        (&Method::GET, Some(rest)) if rest.starts_with('/') && rest.len() > 1 && !rest[1..].contains('/') => {
            Ok(poll(state, &req, &rest[1..]))
        }
        (_, Some(_)) => Err(refused(
            StatusCode::METHOD_NOT_ALLOWED,
            "capit_method",
            "capit: use POST /capit/v1/requests to ask and GET /capit/v1/requests/ID to poll",
        )),
        _ => Err(refused(StatusCode::NOT_FOUND, "capit_unknown_path", format!("capit: no such capit endpoint: {path}"))),
    }
}

fn host_is_loopback(host_header: Option<&str>, uri_host: Option<&str>) -> bool {
    let Some(host) = host_header.or(uri_host) else { return true };
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(name, port)| if port.bytes().all(|b| b.is_ascii_digit()) { name } else { host })
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

async fn ask(state: &Arc<State>, req: Request<Incoming>) -> Result<Response<ProxyBody>, Refused> {
    let json_body = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| ct.trim_start().to_ascii_lowercase().starts_with("application/json"));
    if !json_body {
        return Err(refused(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "capit_content_type",
            "capit: send the request as JSON (Content-Type: application/json)",
        ));
    }
    let presented = super::request::presented_key(req.headers(), None);
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Err(refused(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                format!("capit: an access request is at most {MAX_BODY_BYTES} bytes"),
            ));
        }
    };
    let now = state.clock().now_seconds();
    let invalid = |e: AccessError| refused(StatusCode::BAD_REQUEST, "capit_bad_request", format!("capit: {e}"));
    let request = match presented {
        Some(key) => {
            let slot = state.find_by_key(&key).ok_or_else(|| {
                refused(
                    StatusCode::UNAUTHORIZED,
                    "invalid_api_key",
                    "capit: the key presented is not a valid capit key (unknown, revoked or rotated)",
                )
            })?;
            let view = state.grant_view(&slot);
            if view.state == GrantState::Expired {
                return Err(refused(
                    StatusCode::FORBIDDEN,
                    "capit_grant_expired",
                    format!("capit: grant {:?} has expired; ask for a new grant instead", view.grant.name),
                ));
            }
            let (amount, reason) = crate::access::parse_top_up(&body).map_err(invalid)?;
            Ask::TopUp { grant: slot.id, name: view.grant.name, amount, reason }
        }
        None => {
            let ask = crate::access::parse_grant_ask(&body, now).map_err(invalid)?;
            if state.provider(&ask.provider).is_none() {
                return Err(refused(
                    StatusCode::BAD_REQUEST,
                    "capit_unknown_provider",
                    format!("capit: unknown provider {:?}", ask.provider),
                ));
            }
            if state.find_grant(&ask.app).is_some_and(|s| state.grant_view(&s).state != GrantState::Revoked) {
                return Err(refused(
                    StatusCode::CONFLICT,
                    "capit_grant_exists",
                    format!(
                        "capit: a grant named {:?} already exists; to ask for more, send {{\"amount\", \"reason\"}} with its key",
                        ask.app
                    ),
                ));
            }
            Ask::Grant(ask)
        }
    };
    let (id, secret) = state.access().ask(request.clone(), now).map_err(|e| match e {
        AccessError::TooMany(_) => refused(StatusCode::TOO_MANY_REQUESTS, "capit_too_many_requests", format!("capit: {e}")),
        AccessError::Duplicate { .. } => refused(StatusCode::CONFLICT, "capit_request_pending", format!("capit: {e}")),
        other => invalid(other),
    })?;
    let answer_by = now + state.access().config().ttl_seconds;
    let what = describe(&request);
    tracing::info!(request = %id, kind = request.kind(), grant = request.name(), amount = %request.amount(), "access request asked: {what}");
    crate::notify::desktop(
        &state.access().config().notify,
        &format!("access request {id}: {what} ({}). Answer with: capitctl approve {id}, or capitctl deny {id}", request.reason()),
    );
    let poll = format!("/capit/v1/requests/{id}");
    Ok(reply(
        StatusCode::ACCEPTED,
        json!({"id": id, "secret": secret.expose(), "status": "pending", "kind": request.kind(), "poll": poll, "answer_by": format_utc(answer_by)}),
    ))
}

/// One line saying what is asked: `"evals": $5.00/month openrouter`.
pub fn describe(ask: &Ask) -> String {
    match ask {
        Ask::Grant(g) => format!("{:?} asks for ${}/{} {}", g.app, money(g.amount), g.period.as_str(), g.provider),
        Ask::TopUp { name, amount, .. } => format!("grant {name:?} asks for ${} more", money(*amount)),
    }
}

fn poll(state: &Arc<State>, req: &Request<Incoming>, id: &str) -> Response<ProxyBody> {
    let Some(secret) = super::request::presented_key(req.headers(), None) else {
        return error(StatusCode::UNAUTHORIZED, "capit_no_secret", "capit: poll with the request's secret as a Bearer token", None);
    };
    let now = state.clock().now_seconds();
    match state.access().poll(id, &secret, now) {
        Poll::Pending { answer_by } => {
            reply(StatusCode::ACCEPTED, json!({"id": id, "status": "pending", "answer_by": format_utc(answer_by)}))
        }
        Poll::Approved(answer) => {
            tracing::info!(request = %id, grant = %answer.grant, "access request's answer collected");
            let mut doc = json!({
                "id": id, "status": "approved", "grant": answer.grant, "provider": answer.provider,
                "cap": money(answer.cap), "period": answer.period.as_str(),
                "expires_at": answer.expires_at.map(format_utc),
            });
            if let Some(key) = &answer.key {
                doc["key"] = json!(key.expose());
            }
            if let Some(url) = &answer.base_url {
                doc["base_url"] = json!(url);
            }
            reply(StatusCode::OK, doc)
        }
        Poll::Denied => {
            error(StatusCode::FORBIDDEN, "capit_request_denied", &format!("capit: access request {id} was denied"), Some("denied"))
        }
        Poll::Collected => error(
            StatusCode::GONE,
            "capit_request_collected",
            &format!("capit: access request {id} was answered and its answer already collected"),
            Some("collected"),
        ),
        Poll::Expired => {
            error(StatusCode::GONE, "capit_request_expired", &format!("capit: access request {id} expired; ask again"), Some("expired"))
        }
        Poll::Unknown => error(StatusCode::NOT_FOUND, "capit_unknown_request", "capit: no such access request, or not its secret", None),
    }
}

fn reply(status: StatusCode, value: Value) -> Response<ProxyBody> {
    let mut response = Response::new(full(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// An error in OpenAI's shape, with the request's `status` where a poll has one.
fn error(status: StatusCode, code: &'static str, message: &str, request_status: Option<&str>) -> Response<ProxyBody> {
    let mut doc = json!({"error": {"message": message, "type": "invalid_request_error", "code": code}});
    if let Some(s) = request_status {
        doc["status"] = json!(s);
    }
    reply(status, doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts() {
        for ok in ["127.0.0.1:8787", "localhost:8787", "LOCALHOST", "[::1]:8787", "127.0.0.2"] {
            assert!(host_is_loopback(Some(ok), None), "{ok}");
        }
        for bad in ["evil.example:8787", "192.168.1.4:8787", "[2001:db8::1]:80", "127.0.0.1.evil.example"] {
            assert!(!host_is_loopback(Some(bad), None), "{bad}");
        }
        assert!(host_is_loopback(None, None), "HTTP/1.0 without a Host reached the loopback listener");
    }
}
