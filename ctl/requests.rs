//! `capitctl requests`, `approve ID`, `deny ID`: access requests from local programs, answered
//! here (the control socket is the only place they can be).

use anyhow::bail;
use serde_json::{Value, json};

use capit::proto::v1 as pb;

use crate::cli::ApproveArgs;
use crate::cmd::{Client, rpc};
use crate::output::{self, dollars, time_human, time_json};

fn request_json(r: &pb::AccessRequest) -> Value {
    let opt = |s: &str| if s.is_empty() { Value::Null } else { json!(s) };
    json!({
        "id": r.id, "kind": r.kind, "name": r.name, "provider": r.provider, "models": r.models, "apis": r.apis,
        "amount": r.amount, "period": opt(&r.period), "expires_at": time_json(r.expires_at), "reason": r.reason,
        "asked_at": time_json(r.asked_at), "answer_by": time_json(r.answer_by), "cap": opt(&r.cap), "spent": opt(&r.spent),
    })
}

/// What is asked, in one line.
fn asked(r: &pb::AccessRequest) -> String {
    let list = |items: &[String], all: &str| if items.is_empty() { all.to_string() } else { items.join(",") };
    match r.kind.as_str() {
        "top-up" => format!("{} more (cap {}, spent {} this {})", dollars(&r.amount), dollars(&r.cap), dollars(&r.spent), r.period),
        _ => format!(
            "{}/{} {}; models {}; APIs {}; expires {}",
            dollars(&r.amount),
            r.period,
            r.provider,
            list(&r.models, "any"),
            list(&r.apis, "all"),
            time_human(r.expires_at)
        ),
    }
}

pub async fn list(client: &mut Client, json: bool) -> anyhow::Result<()> {
    let requests = client.list_access_requests(pb::ListAccessRequestsRequest {}).await.map_err(rpc)?.into_inner().requests;
    if json {
        output::json(&Value::Array(requests.iter().map(request_json).collect()));
        return Ok(());
    }
    if requests.is_empty() {
        println!("no access requests wait for an answer");
        return Ok(());
    }
    let mut rows = vec![["ID", "KIND", "NAME", "ASKS FOR", "REASON", "ANSWER BY"].map(String::from).to_vec()];
    for r in &requests {
        rows.push(vec![r.id.clone(), r.kind.clone(), r.name.clone(), asked(r), r.reason.clone(), time_human(r.answer_by)]);
    }
    output::table(&rows);
    println!("answer with: capitctl approve ID [--cap X] [--models ...] [--apis ...], or capitctl deny ID");
    Ok(())
}

pub async fn approve(client: &mut Client, args: ApproveArgs, json: bool) -> anyhow::Result<()> {
    if args.id.trim().is_empty() {
        bail!("give the request's id, as capitctl requests lists it");
    }
    let request = pb::ApproveAccessRequestRequest {
        id: args.id.clone(),
        cap: args.cap.clone(),
        set_models: args.models.is_some(),
        models: args.models.clone().unwrap_or_default(),
        set_apis: args.apis.is_some(),
        apis: args.apis.clone().unwrap_or_default(),
        approved_by: crate::cmd::local_user(),
    };
    let reply = client.approve_access_request(request).await.map_err(rpc)?.into_inner();
    let (r, g) = (reply.request.unwrap_or_default(), reply.grant.unwrap_or_default());
    if json {
        output::json(&json!({"request": request_json(&r), "grant": crate::cmd::grant_json(&g)}));
        return Ok(());
    }
    match r.kind.as_str() {
        "top-up" => {
            let per = if g.period == "total" { "in total".to_string() } else { format!("per {}", g.period) };
            println!("approved {}: grant \"{}\" now has a {} cap {per} ({} spent)", r.id, g.name, dollars(&g.cap), dollars(&g.spent))
        }
        _ => println!("approved {}: {}/{} {} grant \"{}\" made", r.id, dollars(&g.cap), g.period, g.provider, g.name),
    }
    println!("the program that asked collects its answer once, with its poll secret");
    Ok(())
}

pub async fn deny(client: &mut Client, id: &str, json: bool) -> anyhow::Result<()> {
    let r = client
        .deny_access_request(pb::DenyAccessRequestRequest { id: id.to_string() })
        .await
        .map_err(rpc)?
        .into_inner()
        .request
        .unwrap_or_default();
    if json {
        output::json(&json!({"request": request_json(&r), "denied": true}));
    } else {
        println!("denied {}: {} for \"{}\"", r.id, r.kind, r.name);
    }
    Ok(())
}
