//! `capitctl log`: the daemon's audit log of control-plane changes, oldest first.

use serde_json::{Value, json};

use capit::proto::v1 as pb;

use crate::cli::LogArgs;
use crate::cmd::{Client, rpc};
use crate::{output, when};

fn time_ms_json(at_ms: i64) -> Value {
    chrono::DateTime::from_timestamp_millis(at_ms).map_or(Value::Null, |t| Value::String(t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()))
}

fn time_ms_human(at_ms: i64) -> String {
    use chrono::TimeZone;
    chrono::Local.timestamp_millis_opt(at_ms).single().map_or_else(|| at_ms.to_string(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

pub async fn log(client: &mut Client, args: LogArgs, json: bool) -> anyhow::Result<()> {
    let since = match &args.since {
        Some(text) => when::parse_since(text, chrono::Utc::now().timestamp())?,
        None => 0,
    };
    let request = pb::ListAuditRequest { since, grant: args.grant.clone().unwrap_or_default() };
    let entries = client.list_audit(request).await.map_err(rpc)?.into_inner().entries;
    if json {
        output::json(&Value::Array(
            entries
                .iter()
                .map(|e| {
                    json!({
                        "seq": e.seq, "at": time_ms_json(e.at_ms), "user": e.user, "uid": e.uid,
                        "pid": if e.pid > 0 { json!(e.pid) } else { Value::Null },
                        "action": e.action, "target": e.target,
                        "grant": if e.grant.is_empty() { Value::Null } else { json!(e.grant) },
                        "detail": e.detail,
                    })
                })
                .collect(),
        ));
        return Ok(());
    }
    if entries.is_empty() {
        println!("no changes recorded{}", if since > 0 || args.grant.is_some() { " that match" } else { "" });
        return Ok(());
    }
    let mut rows = vec![["TIME", "USER", "PID", "ACTION", "TARGET", "WHAT CHANGED"].map(String::from).to_vec()];
    for e in &entries {
        rows.push(vec![
            time_ms_human(e.at_ms),
            format!("{} ({})", e.user, e.uid),
            if e.pid > 0 { e.pid.to_string() } else { "-".into() },
            e.action.clone(),
            e.target.clone(),
            e.detail.clone(),
        ]);
    }
    output::table(&rows);
    Ok(())
}
