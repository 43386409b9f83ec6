//! The team RPCs: create, join, list, usage and leave a pool, each change audited. The
//! database password arrives here once and goes to the store; no reply carries it.

use tonic::{Response, Status};

use super::ControlService;
use super::convert::decimal_string;
use crate::audit::{Actor, Change};
use crate::grants::{Period, money, parse_cap};
use crate::proto::v1 as pb;
use crate::secret::Secret;
use crate::team::pg::UsageBy;
use crate::team::service::TeamView;
use crate::team::{PoolSpec, TeamError};

pub fn team_status(error: TeamError) -> Status {
    let message = error.to_string();
    match error {
        TeamError::Invalid(_) | TeamError::Overflow => Status::invalid_argument(message),
        TeamError::Unreachable(_) => Status::unavailable(message),
        TeamError::UnknownPool(_) | TeamError::NotJoined(_) => Status::not_found(message),
        TeamError::PoolExists(_) | TeamError::AlreadyJoined(_) => Status::already_exists(message),
        TeamError::Database(_) | TeamError::SchemaTooNew { .. } => Status::failed_precondition(message),
        TeamError::Lease(_) => Status::resource_exhausted(message),
    }
}

/// The password as capitctl sent it; empty means none (trust or certificate authentication).
fn password(database: Option<&pb::TeamDatabase>) -> (String, Option<Secret>) {
    match database {
        Some(db) => (db.url.clone(), (!db.password.is_empty()).then(|| Secret::new(db.password.clone()))),
        None => (String::new(), None),
    }
}

pub fn team(view: &TeamView) -> pb::Team {
    let spec = view.spec.as_ref();
    let mut team = pb::Team {
        name: view.name.clone(),
        cap: spec.map(|s| money(s.cap)).unwrap_or_default(),
        period: spec.map(|s| s.period.as_str().to_string()).unwrap_or_default(),
        time_zone: spec.map(|s| s.time_zone.clone()).unwrap_or_default(),
        lease_seconds: spec.map_or(0, |s| s.lease_seconds),
        database: view.database.clone(),
        cover: decimal_string(view.standing.cover),
        reachable: view.status.is_some(),
        error: view.error.clone().unwrap_or_default(),
        grants: view.grants.clone(),
        unreported: view.unreported,
        joined_at: view.joined_at,
        transactions: view.standing.transactions,
        ..Default::default()
    };
    if let Some(last) = &view.standing.last {
        team.spent = decimal_string(last.spent);
        team.leased = decimal_string(last.leases);
    }
    if let Some(status) = &view.status {
        team.spent = decimal_string(status.spent);
        team.leased = decimal_string(status.leases);
        team.credits = decimal_string(status.credits);
        team.members = status
            .members
            .iter()
            .map(|m| pb::TeamMember {
                member: m.member.clone(),
                host: m.host.clone(),
                lease: decimal_string(m.lease),
                credit: decimal_string(m.credit),
                expires_in: m.expires_in,
                last_seen_ago: m.last_seen_ago,
                left: m.left,
                me: m.member == view.member,
            })
            .collect();
        if let Some(me) = status.members.iter().find(|m| m.member == view.member) {
            team.cover = decimal_string(me.lease + me.credit);
        }
    }
    if let Some(spec) = spec {
        team.resets_at = spec.window(chrono::Utc::now().timestamp()).end.unwrap_or(0);
    }
    team
}

fn summary(spec: &PoolSpec, database: &str) -> String {
    format!(
        "${}/{} pool in {}, leases of {} s, database {database}",
        money(spec.cap),
        spec.period.as_str(),
        spec.time_zone,
        spec.lease_seconds
    )
}

pub async fn create(
    service: &ControlService,
    actor: &Actor,
    req: pb::CreateTeamRequest,
) -> Result<Response<pb::CreateTeamResponse>, Status> {
    let cap = parse_cap(&req.cap).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let period = match req.period.as_str() {
        "" => Period::Month,
        text => {
            Period::parse(text).ok_or_else(|| Status::invalid_argument(crate::grants::GrantError::BadPeriod(text.into()).to_string()))?
        }
    };
    let time_zone = if req.time_zone.trim().is_empty() { crate::team::local_time_zone() } else { req.time_zone.trim().to_string() };
    let lease_seconds = if req.lease_seconds == 0 { crate::team::DEFAULT_LEASE_SECONDS } else { req.lease_seconds };
    let spec = PoolSpec { name: req.name.clone(), cap, period, time_zone, lease_seconds };
    let (url, password) = password(req.database.as_ref());
    let created_by: String = req.created_by.chars().take(200).collect();
    let view = service.teams.create(spec.clone(), &url, password, &created_by).await.map_err(team_status)?;
    service.record(actor, Change::new("team.create", &spec.name, format!("{}; joined", summary(&spec, &view.database)))).await?;
    Ok(Response::new(pb::CreateTeamResponse { team: Some(team(&view)) }))
}

pub async fn join(service: &ControlService, actor: &Actor, req: pb::JoinTeamRequest) -> Result<Response<pb::JoinTeamResponse>, Status> {
    let (url, password) = password(req.database.as_ref());
    let view = service.teams.join(&req.name, &url, password).await.map_err(team_status)?;
    let detail = match &view.spec {
        Some(spec) => summary(spec, &view.database),
        None => format!("database {}", view.database),
    };
    service.record(actor, Change::new("team.join", &req.name, detail)).await?;
    Ok(Response::new(pb::JoinTeamResponse { team: Some(team(&view)) }))
}

pub async fn list(service: &ControlService) -> Result<Response<pb::ListTeamsResponse>, Status> {
    let views = service.teams.list().await;
    Ok(Response::new(pb::ListTeamsResponse { teams: views.iter().map(team).collect() }))
}

pub async fn usage(service: &ControlService, req: pb::GetTeamUsageRequest) -> Result<Response<pb::GetTeamUsageResponse>, Status> {
    let by_text = if req.by.is_empty() { "member" } else { req.by.as_str() };
    let by =
        UsageBy::parse(by_text).ok_or_else(|| Status::invalid_argument(format!("--by {by_text:?}: use member, grant, model or day")))?;
    let since = (req.since > 0).then(|| req.since.saturating_mul(1000));
    let (view, rows, since_ms) = service.teams.usage(&req.name, by, since).await.map_err(team_status)?;
    let row = |r: &crate::team::pg::UsageRow| pb::UsageRow {
        key: r.key.clone(),
        spent: decimal_string(r.spent),
        requests: r.requests,
        input_tokens: r.input_tokens,
        output_tokens: r.output_tokens,
        ..Default::default()
    };
    let mut total = crate::team::pg::UsageRow {
        key: "total".into(),
        spent: rust_decimal::Decimal::ZERO,
        requests: 0,
        input_tokens: 0,
        output_tokens: 0,
    };
    for r in &rows {
        total.spent = total.spent.checked_add(r.spent).ok_or_else(|| Status::out_of_range("a usage total would overflow"))?;
        total.requests += r.requests;
        total.input_tokens += r.input_tokens;
        total.output_tokens += r.output_tokens;
    }
    Ok(Response::new(pb::GetTeamUsageResponse {
        team: Some(team(&view)),
        by: by_text.to_string(),
        since: since_ms.div_euclid(1000),
        rows: rows.iter().map(row).collect(),
        total: Some(row(&total)),
    }))
}

pub async fn leave(service: &ControlService, actor: &Actor, req: pb::LeaveTeamRequest) -> Result<Response<pb::LeaveTeamResponse>, Status> {
    let view = service.teams.leave(&req.name).await.map_err(team_status)?;
    service.record(actor, Change::new("team.leave", &req.name, format!("left; database {}", view.database))).await?;
    Ok(Response::new(pb::LeaveTeamResponse { team: Some(team(&view)) }))
}
