//! `capitctl key ls --remote PROVIDER`: the keys capit made on the provider's side (OpenRouter),
//! each with the grant holding it, and those capit no longer knows flagged.

use serde_json::{Value, json};

use capit::proto::v1 as pb;

use crate::cmd::{Client, rpc};
use crate::output::{self, dollars, time_human, time_json};

/// A grant's provider key for `--json` (never its secret: a fingerprint).
pub fn provider_key_json(k: &pb::ProviderKey) -> Value {
    let opt = |s: &str| if s.is_empty() { Value::Null } else { json!(s) };
    json!({
        "hash": k.hash, "name": k.name, "fingerprint": k.fingerprint, "limit": k.limit,
        "limit_reset": opt(&k.limit_reset), "expires_at": time_json(k.expires_at), "created_at": time_json(k.created_at),
        "usage": opt(&k.usage), "usage_total": opt(&k.usage_total), "usage_at": time_json(k.usage_at),
        "pending_deletions": k.pending_deletions,
    })
}

fn status_text(status: &str) -> &'static str {
    match status {
        "grant" => "ok",
        "pending-delete" => "revoked or replaced; capit is still deleting it",
        "unknown" => "UNKNOWN to capit: made by this capit, held by no grant (delete it on openrouter.ai)",
        "other-capit" => "another capit installation's",
        _ => "?",
    }
}

pub async fn list(client: &mut Client, provider: &str, json: bool) -> anyhow::Result<()> {
    let reply = client.list_remote_keys(pb::ListRemoteKeysRequest { provider: provider.to_string() }).await.map_err(rpc)?.into_inner();
    if json {
        output::json(&json!({
            "provider": provider,
            "installation": reply.installation,
            "others": reply.others,
            "keys": reply.keys.iter().map(|k| json!({
                "hash": k.hash, "name": k.name, "label": k.label, "limit": if k.limit.is_empty() { Value::Null } else { json!(k.limit) },
                "limit_remaining": if k.limit_remaining.is_empty() { Value::Null } else { json!(k.limit_remaining) },
                "limit_reset": if k.limit_reset.is_empty() { Value::Null } else { json!(k.limit_reset) },
                "usage": k.usage, "disabled": k.disabled, "expires_at": time_json(k.expires_at),
                "grant": if k.grant.is_empty() { Value::Null } else { json!(k.grant) }, "status": k.status,
            })).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    if reply.keys.is_empty() {
        println!("capit has made no keys on {provider}'s side");
    } else {
        let mut rows = vec![["NAME", "GRANT", "LIMIT", "USAGE", "RESET", "EXPIRES", "STATUS"].map(String::from).to_vec()];
        for k in &reply.keys {
            rows.push(vec![
                k.name.clone(),
                if k.grant.is_empty() { "-".into() } else { k.grant.clone() },
                if k.limit.is_empty() { "none".into() } else { dollars(&k.limit) },
                dollars(&k.usage),
                if k.limit_reset.is_empty() { "never".into() } else { k.limit_reset.clone() },
                time_human(k.expires_at),
                format!("{}{}", status_text(&k.status), if k.disabled { ", disabled" } else { "" }),
            ]);
        }
        output::table(&rows);
    }
    if reply.others > 0 {
        println!("({} other keys on the account were not made by capit)", reply.others);
    }
    let unknown = reply.keys.iter().filter(|k| k.status == "unknown").count();
    if unknown > 0 {
        println!("{unknown} keys made by this capit belong to no grant; they still work until deleted");
    }
    Ok(())
}
