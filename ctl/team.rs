//! `capitctl team create|join|ls|usage|leave`: team budgets shared by many machines through a
//! Postgres database. The database password never comes from argv: it is read from the libpq
//! password file (`PGPASSFILE`, else `~/.pgpass`), else a no-echo prompt, else stdin, and goes
//! to capitd over its socket, which stores it like a master key.

use std::io::{IsTerminal, Read};
use std::os::unix::fs::PermissionsExt;

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};

use capit::proto::v1 as pb;
use capit::team::url::DbUrl;

use crate::cli::{TeamCommand, TeamDbArgs};
use crate::cmd::{Client, rpc};
use crate::output::{self, dollars, time_human, time_json};

pub async fn team(client: &mut Client, cmd: TeamCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        TeamCommand::Create(args) => {
            let database = database(&args.db)?;
            let request = pb::CreateTeamRequest {
                name: args.name,
                cap: args.amount,
                period: args.period,
                time_zone: args.tz.unwrap_or_default(),
                lease_seconds: args.lease_ttl,
                database: Some(database),
                created_by: crate::cmd::local_user(),
            };
            let team = client.create_team(request).await.map_err(rpc)?.into_inner().team.unwrap_or_default();
            if json {
                output::json(&team_json(&team));
            } else {
                println!(
                    "{}{} team pool \"{}\" created in {} ({}); this capitd joined it",
                    dollars(&team.cap),
                    per(&team.period),
                    team.name,
                    team.database,
                    team.time_zone
                );
                println!("on each other machine: capitctl team join {} --db {}", team.name, team.database);
                println!("then draw on it: capitctl grant AGENT AMOUNT --team {}", team.name);
            }
        }
        TeamCommand::Join(args) => {
            let database = database(&args.db)?;
            let request = pb::JoinTeamRequest { name: args.name, database: Some(database) };
            let team = client.join_team(request).await.map_err(rpc)?.into_inner().team.unwrap_or_default();
            if json {
                output::json(&team_json(&team));
            } else {
                println!(
                    "joined team pool \"{}\": {}{} in {}, {} spent this period",
                    team.name,
                    dollars(&team.cap),
                    per(&team.period),
                    team.time_zone,
                    dollars(or_zero(&team.spent))
                );
            }
        }
        TeamCommand::Ls => {
            let teams = client.list_teams(pb::ListTeamsRequest {}).await.map_err(rpc)?.into_inner().teams;
            if json {
                output::json(&Value::Array(teams.iter().map(team_json).collect()));
                return Ok(());
            }
            if teams.is_empty() {
                println!("this capitd is in no team pool; make one with: capitctl team create NAME AMOUNT --db URL");
                return Ok(());
            }
            let mut rows =
                vec![["POOL", "SPENT / CAP", "LEASED", "MINE", "MEMBERS", "GRANTS", "RESETS", "DATABASE"].map(String::from).to_vec()];
            for t in &teams {
                let live = t.members.iter().filter(|m| !m.left).count();
                rows.push(vec![
                    t.name.clone(),
                    format!("{} / {}{}", dollars(or_zero(&t.spent)), dollars(&t.cap), per(&t.period)),
                    dollars(or_zero(&t.leased)),
                    dollars(or_zero(&t.cover)),
                    if t.reachable { live.to_string() } else { "?".into() },
                    if t.grants.is_empty() { "-".into() } else { t.grants.join(",") },
                    time_human(t.resets_at),
                    t.database.clone(),
                ]);
            }
            output::table(&rows);
            for t in teams.iter().filter(|t| !t.error.is_empty()) {
                let behind = if t.unreported > 0 { format!("; {} entries wait to be reported", t.unreported) } else { String::new() };
                println!("{}: {}{behind}", t.name, t.error);
            }
        }
        TeamCommand::Usage(args) => {
            let now = chrono::Utc::now().timestamp();
            let since = match &args.since {
                Some(text) => crate::when::parse_since(text, now)?,
                None => 0,
            };
            let request = pb::GetTeamUsageRequest { name: args.name, by: args.by, since };
            let usage = client.get_team_usage(request).await.map_err(rpc)?.into_inner();
            let team = usage.team.clone().unwrap_or_default();
            let row_json = |r: &pb::UsageRow| json!({"key": r.key, "spent": r.spent, "requests": r.requests, "input_tokens": r.input_tokens, "output_tokens": r.output_tokens});
            if json {
                let total = usage.total.as_ref().map(row_json);
                output::json(&json!({
                    "team": team.name, "by": usage.by, "since": time_json(usage.since), "cap": team.cap, "period": team.period,
                    "spent": or_zero(&team.spent), "leased": or_zero(&team.leased), "credits": or_zero(&team.credits),
                    "rows": usage.rows.iter().map(row_json).collect::<Vec<_>>(), "total": total,
                }));
                return Ok(());
            }
            println!(
                "team pool \"{}\": {} of {}{} spent this period; {} leased by members now",
                team.name,
                dollars(or_zero(&team.spent)),
                dollars(&team.cap),
                per(&team.period),
                dollars(or_zero(&team.leased))
            );
            let mut rows = vec![vec![usage.by.to_uppercase(), "SPENT".into(), "REQUESTS".into(), "INPUT".into(), "OUTPUT".into()]];
            for r in usage.rows.iter().chain(usage.total.as_ref()) {
                rows.push(vec![
                    r.key.clone(),
                    dollars(&r.spent),
                    r.requests.to_string(),
                    r.input_tokens.to_string(),
                    r.output_tokens.to_string(),
                ]);
            }
            output::table(&rows);
            println!("since {}", time_human(usage.since));
        }
        TeamCommand::Leave { name } => {
            let team = client.leave_team(pb::LeaveTeamRequest { name }).await.map_err(rpc)?.into_inner().team.unwrap_or_default();
            if json {
                output::json(&team_json(&team));
            } else {
                println!("left team pool \"{}\"; everything this machine spent from it is reported", team.name);
            }
        }
    }
    Ok(())
}

fn or_zero(text: &str) -> &str {
    if text.is_empty() { "0" } else { text }
}

fn per(period: &str) -> String {
    match period {
        "total" => " in total".to_string(),
        "" => String::new(),
        p => format!("/{p}"),
    }
}

fn team_json(t: &pb::Team) -> Value {
    let members: Vec<Value> = t
        .members
        .iter()
        .map(|m| {
            json!({"member": m.member, "host": m.host, "lease": m.lease, "credit": m.credit, "expires_in": m.expires_in,
                   "last_seen_ago": m.last_seen_ago, "left": m.left, "me": m.me})
        })
        .collect();
    json!({
        "name": t.name, "cap": t.cap, "period": t.period, "time_zone": t.time_zone, "lease_seconds": t.lease_seconds,
        "database": t.database, "spent": or_zero(&t.spent), "leased": or_zero(&t.leased), "credits": or_zero(&t.credits),
        "cover": or_zero(&t.cover), "resets_at": time_json(t.resets_at), "reachable": t.reachable,
        "error": (!t.error.is_empty()).then_some(&t.error), "grants": t.grants, "unreported": t.unreported,
        "joined_at": time_json(t.joined_at), "transactions": t.transactions, "members": members,
    })
}

/// The URL, checked here too (so a password typed into it never reaches the daemon), and the
/// password from the password file, the prompt or stdin.
fn database(args: &TeamDbArgs) -> anyhow::Result<pb::TeamDatabase> {
    let url = DbUrl::parse(&args.db).map_err(|e| anyhow!("--db: {e}"))?;
    let password = password_for(&url)?;
    Ok(pb::TeamDatabase { url: args.db.trim().to_string(), password })
}

fn password_for(url: &DbUrl) -> anyhow::Result<String> {
    let passfile = std::env::var_os("PGPASSFILE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| std::path::Path::new(&home).join(".pgpass")));
    if let Some(path) = passfile.filter(|p| p.is_file()) {
        let mode = std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?.permissions().mode();
        if mode & 0o077 != 0 {
            bail!("{} can be read by other users (mode {:04o}); make it 0600, as libpq requires", path.display(), mode & 0o777);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        if let Some(password) = url.password_from_passfile(&text) {
            return Ok(password);
        }
    }
    let prompt = format!("Password for {} (input hidden; empty for none): ", url.display());
    let text = if std::io::stdin().is_terminal() {
        rpassword::prompt_password(prompt).context("reading the password")?
    } else {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("reading the password from stdin")?;
        text
    };
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}
