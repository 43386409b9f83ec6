//! The control side of provider keys and access requests: listing the provider's keys, and
//! answering access requests (the control socket is the only place that can).

use tonic::{Response, Status};

use super::{ControlService, backstop_status, convert};
use crate::access::{AccessError, Answer, Ask, RequestView};
use crate::grants::{Limits, parse_cap};
use crate::proto::v1 as pb;
use crate::state::{GrantSpec, GrantUpdate};

fn access_status(error: AccessError) -> Status {
    match error {
        AccessError::NotPending(_) => Status::not_found(error.to_string()),
        AccessError::Random => Status::internal(error.to_string()),
        _ => Status::failed_precondition(error.to_string()),
    }
}

pub async fn list_remote_keys(
    service: &ControlService,
    req: pb::ListRemoteKeysRequest,
) -> Result<Response<pb::ListRemoteKeysResponse>, Status> {
    let (rows, others) = service.backstop.list_remote(&req.provider).await.map_err(backstop_status)?;
    let keys = rows
        .into_iter()
        .map(|row| {
            let f = &row.key.figures;
            pb::RemoteKey {
                hash: row.key.hash,
                name: row.key.name,
                label: row.key.label,
                limit: convert::optional_decimal(f.limit),
                limit_remaining: convert::optional_decimal(f.limit_remaining),
                limit_reset: crate::backstop::limit_reset(f.reset).unwrap_or_default().to_string(),
                usage: convert::decimal_string(f.usage),
                disabled: row.key.disabled,
                expires_at: f.expires_at.unwrap_or(0),
                grant: row.grant.unwrap_or_default(),
                status: row.status.to_string(),
            }
        })
        .collect();
    Ok(Response::new(pb::ListRemoteKeysResponse { keys, others: others as u32, installation: service.state.installation_id().to_string() }))
}

fn request_pb(service: &ControlService, view: &RequestView) -> pb::AccessRequest {
    let mut out = pb::AccessRequest {
        id: view.id.clone(),
        kind: view.ask.kind().to_string(),
        name: view.ask.name().to_string(),
        amount: crate::grants::money(view.ask.amount()),
        reason: view.ask.reason().to_string(),
        asked_at: view.asked_at,
        answer_by: view.answer_by,
        ..Default::default()
    };
    match &view.ask {
        Ask::Grant(g) => {
            out.provider = g.provider.clone();
            out.models = g.models.clone();
            out.period = g.period.as_str().to_string();
            out.expires_at = g.expires_at.unwrap_or(0);
            out.apis = g.apis.iter().map(|a| a.as_str().to_string()).collect();
        }
        Ask::TopUp { grant, .. } => {
            if let Some(slot) = service.state.slot(*grant) {
                let v = service.state.grant_view(&slot);
                out.provider = v.grant.provider.clone();
                out.models = v.grant.models.clone();
                out.period = v.grant.period.as_str().to_string();
                out.expires_at = v.grant.expires_at.unwrap_or(0);
                out.apis = v.grant.apis.iter().map(|a| a.as_str().to_string()).collect();
                out.cap = crate::grants::money(v.grant.cap);
                out.spent = convert::decimal_string(v.spent);
            }
        }
    }
    out
}

pub fn list_requests(service: &ControlService) -> pb::ListAccessRequestsResponse {
    let now = service.state.clock().now_seconds();
    pb::ListAccessRequestsResponse { requests: service.state.access().pending(now).iter().map(|v| request_pb(service, v)).collect() }
}

pub async fn approve(
    service: &ControlService,
    req: pb::ApproveAccessRequestRequest,
) -> Result<Response<pb::ApproveAccessRequestResponse>, Status> {
    let state = &service.state;
    let now = state.clock().now_seconds();
    let cap = req.cap.as_deref().map(parse_cap).transpose().map_err(|e| Status::invalid_argument(e.to_string()))?;
    let apis = if req.set_apis { Some(convert::apis_from(&req.apis)?) } else { None };
    let models = req.set_models.then(|| req.models.iter().map(|m| m.trim().to_string()).filter(|m| !m.is_empty()).collect::<Vec<_>>());
    let view = state.access().begin_approval(&req.id, now).map_err(access_status)?;
    let shown = request_pb(service, &view);
    let approved_by: String = req.approved_by.chars().take(100).collect();
    let outcome = async {
        match &view.ask {
            Ask::Grant(g) => {
                let spec = GrantSpec {
                    name: g.app.clone(),
                    provider: g.provider.clone(),
                    cap: cap.unwrap_or(g.amount),
                    period: g.period,
                    expires_at: g.expires_at,
                    models: models.clone().unwrap_or_else(|| g.models.clone()),
                    note: format!("access request {}: {}", view.id, g.reason),
                    created_by: format!("{approved_by} (access request {})", view.id),
                    limits: Limits::default(),
                    apis: apis.clone().unwrap_or_else(|| g.apis.clone()),
                    provider_key: None,
                    direct: false,
                    alerts: None,
                    team: None,
                };
                let (grant, key) = service.backstop.create_grant(spec).await.map_err(backstop_status)?;
                let answer = Answer {
                    grant: grant.grant.name.clone(),
                    provider: grant.grant.provider.clone(),
                    key: Some(key),
                    base_url: Some(service.base_url(&grant.grant.provider)),
                    cap: grant.grant.cap,
                    period: grant.grant.period,
                    expires_at: grant.grant.expires_at,
                };
                Ok::<_, Status>((grant, answer))
            }
            Ask::TopUp { grant, name, amount, .. } => {
                let slot = state.slot(*grant).filter(|s| s.name() == *name && s.grant().revoked_at.is_none());
                let slot = slot.ok_or_else(|| Status::failed_precondition(format!("grant {name:?} was revoked since it asked")))?;
                let current = slot.grant().cap;
                let new_cap = match cap {
                    Some(cap) => cap,
                    None => {
                        let sum = current.checked_add(*amount).ok_or_else(|| Status::invalid_argument("the new cap is out of range"))?;
                        parse_cap(&sum.to_string()).map_err(|e| Status::invalid_argument(e.to_string()))?
                    }
                };
                let update = GrantUpdate { cap: Some(new_cap), models: models.clone(), apis: apis.clone(), ..GrantUpdate::default() };
                let (grant, _) = service.backstop.update_grant(name, update).await.map_err(backstop_status)?;
                let answer = Answer {
                    grant: grant.grant.name.clone(),
                    provider: grant.grant.provider.clone(),
                    key: None,
                    base_url: None,
                    cap: grant.grant.cap,
                    period: grant.grant.period,
                    expires_at: grant.grant.expires_at,
                };
                Ok((grant, answer))
            }
        }
    }
    .await;
    match outcome {
        Ok((grant, answer)) => {
            tracing::info!(request = %view.id, grant = %grant.grant.name, cap = %grant.grant.cap, by = %approved_by, "access request approved");
            state.access().finish_approval(&view.id, answer, state.clock().now_seconds());
            Ok(Response::new(pb::ApproveAccessRequestResponse { request: Some(shown), grant: Some(convert::grant(&grant)) }))
        }
        Err(status) => {
            state.access().abort_approval(&view.id);
            Err(status)
        }
    }
}

pub fn deny(service: &ControlService, req: pb::DenyAccessRequestRequest) -> Result<Response<pb::DenyAccessRequestResponse>, Status> {
    let now = service.state.clock().now_seconds();
    let view = service.state.access().deny(&req.id, now).map_err(access_status)?;
    tracing::info!(request = %view.id, grant = view.ask.name(), kind = view.ask.kind(), "access request denied");
    Ok(Response::new(pb::DenyAccessRequestResponse { request: Some(request_pb(service, &view)) }))
}
