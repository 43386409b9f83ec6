//! The commands: each turns its arguments into one or two RPCs and prints the answer.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};

use capit::proto::v1 as pb;
use capit::proto::v1::control_client::ControlClient;

use crate::cli::{Cli, Command, GrantArgs, KeyCommand, LimitArgs, PriceCommand, ProviderCommand, SetArgs, UsageArgs};
use crate::consumers::{self, AgentEnv, Target, files};
use crate::install::{self, Installer};
use crate::output::{self, dollars, time_human, time_json};
use crate::when;

pub(crate) type Client = ControlClient<Channel>;

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.json;
    // The commands that work without a daemon.
    let command = match cli.command {
        Command::Service(cmd) => return crate::service::service(cmd, cli.socket, json).await,
        Command::Completions { shell } => return completions(shell),
        Command::Man { page } => return manual(&page),
        command => command,
    };
    let socket = socket_path(cli.socket)?;
    let mut client = connect(&socket).await?;
    match command {
        Command::Key(cmd) => key(&mut client, cmd, json).await,
        Command::Provider(cmd) => provider(&mut client, cmd, json).await,
        Command::Price(cmd) => price(&mut client, cmd, json).await,
        Command::Grant(args) => grant(&mut client, args, json).await,
        Command::Team(cmd) => crate::team::team(&mut client, cmd, json).await,
        Command::Ls { all } => list(&mut client, all, json).await,
        Command::Usage(args) => usage(&mut client, args, json).await,
        Command::Revoke { grant } => revoke(&mut client, &grant, json).await,
        Command::Set(args) => set(&mut client, args, json).await,
        Command::Rotate { grant } => rotate(&mut client, &grant, json).await,
        Command::Status => status(&mut client, json).await,
        Command::Agents => agents(json),
        Command::Uninstall { agent } => uninstall(&mut client, &agent, json).await,
        Command::Requests => crate::requests::list(&mut client, json).await,
        Command::Approve(args) => crate::requests::approve(&mut client, args, json).await,
        Command::Deny { id } => crate::requests::deny(&mut client, &id, json).await,
        Command::Watch => crate::watch::watch(&socket, json).await,
        Command::Log(args) => crate::audit::log(&mut client, args, json).await,
        Command::Service(_) | Command::Completions { .. } | Command::Man { .. } => unreachable!("handled above"),
    }
}

fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "capitctl", &mut std::io::stdout());
    Ok(())
}

fn manual(page: &str) -> anyhow::Result<()> {
    let command = match page {
        "capitd" => <capit::config::Cli as clap::CommandFactory>::command(),
        _ => <Cli as clap::CommandFactory>::command(),
    };
    clap_mangen::Man::new(command).render(&mut std::io::stdout()).context("writing the man page")
}

/// `--alert 50,80,100`: percentages of the cap; `off` (or `none`) for none.
fn alerts_pb(alert: Option<&Vec<String>>) -> anyhow::Result<Option<pb::Alerts>> {
    let Some(words) = alert else { return Ok(None) };
    if words.len() == 1 && matches!(words[0].trim(), "off" | "none" | "") {
        return Ok(Some(pb::Alerts { percent: Vec::new() }));
    }
    let percent = words
        .iter()
        .map(|w| w.trim().trim_end_matches('%').parse::<u32>().map_err(|_| anyhow!("--alert {w:?} is not a percentage such as 80")))
        .collect::<anyhow::Result<Vec<u32>>>()?;
    Ok(Some(pb::Alerts { percent }))
}

pub(crate) fn socket_path(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let env = capit::paths::PathEnv::from_process();
    flag.or_else(|| env.socket_path()).context("cannot find the control socket: set CAPIT_SOCKET, CAPIT_HOME or HOME")
}

pub(crate) async fn connect(socket: &std::path::Path) -> anyhow::Result<Client> {
    connect_with(socket, |endpoint| endpoint).await
}

/// Connects with the endpoint adjusted, e.g. flow-control windows for a stream.
pub(crate) async fn connect_with(socket: &std::path::Path, adjust: impl FnOnce(Endpoint) -> Endpoint) -> anyhow::Result<Client> {
    if !socket.exists() {
        bail!("capitd is not running (no control socket at {}); start it with: capitd", socket.display());
    }
    let uri = format!("unix://{}", socket.display());
    let channel = adjust(Endpoint::from_shared(uri).context("invalid socket path")?)
        .connect()
        .await
        .map_err(|e| anyhow!("cannot connect to capitd at {}: {e}", socket.display()))?;
    Ok(ControlClient::new(channel).max_encoding_message_size(64 * 1024 * 1024))
}

/// Turns a gRPC status into the daemon's own message.
pub(crate) fn rpc(status: tonic::Status) -> anyhow::Error {
    let message = status.message();
    if message.is_empty() { anyhow!("capitd: {:?}", status.code()) } else { anyhow!("{message}") }
}

/// Reads a secret: from a no-echo prompt on a terminal, else all of stdin. Never from argv.
pub(crate) fn read_secret(prompt: &str) -> anyhow::Result<String> {
    let text = if std::io::stdin().is_terminal() {
        rpassword::prompt_password(prompt).context("reading the key")?
    } else {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("reading the key from stdin")?;
        text
    };
    let text = text.trim().to_string();
    if text.is_empty() {
        bail!("no key was given (type it at the prompt, or pipe it on stdin)");
    }
    Ok(text)
}

async fn key(client: &mut Client, cmd: KeyCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        KeyCommand::Add { provider, management } => {
            let what = if management { "Management key" } else { "Master key" };
            let secret = read_secret(&format!("{what} for {provider} (input hidden): "))?;
            let reply = client.add_key(pb::AddKeyRequest { provider, secret, management }).await.map_err(rpc)?.into_inner();
            let info = reply.key.unwrap_or_default();
            let kind = if management { "management key" } else { "key" };
            if json {
                output::json(&json!({
                    "provider": info.provider, "fingerprint": info.fingerprint, "added_at": time_json(info.added_at),
                    "management": management, "grants_capped": reply.backstopped, "not_capped": reply.not_backstopped,
                    "at_rest": info.at_rest,
                }));
            } else {
                let at_rest =
                    if info.at_rest == "keyring" { "sealed under the OS keyring" } else { "as text in the database (no keyring)" };
                println!("stored the {} {kind} {}, {at_rest}", info.provider, info.fingerprint);
                if management {
                    println!(
                        "every {} grant now gets its own {} key, capped by {} itself ({} existing grants got one)",
                        info.provider, info.provider, info.provider, reply.backstopped
                    );
                    for failed in &reply.not_backstopped {
                        println!("not capped on {}'s side: {failed}", info.provider);
                    }
                }
            }
        }
        KeyCommand::Ls { remote: Some(provider) } => return crate::remote::list(client, &provider, json).await,
        KeyCommand::Ls { remote: None } => {
            let keys = client.list_keys(pb::ListKeysRequest {}).await.map_err(rpc)?.into_inner().keys;
            let kind = |k: &pb::KeyInfo| if k.management { "management" } else { "master" };
            if json {
                output::json(&Value::Array(
                    keys.iter()
                        .map(|k| json!({"provider": k.provider, "fingerprint": k.fingerprint, "added_at": time_json(k.added_at), "kind": kind(k), "at_rest": k.at_rest}))
                        .collect(),
                ));
            } else if keys.is_empty() {
                println!("no master keys stored; add one with: capitctl key add <provider>");
            } else {
                let mut rows = vec![vec!["PROVIDER".into(), "KIND".into(), "KEY".into(), "ADDED".into(), "AT REST".into()]];
                rows.extend(
                    keys.iter().map(|k| {
                        vec![k.provider.clone(), kind(k).into(), k.fingerprint.clone(), time_human(k.added_at), k.at_rest.clone()]
                    }),
                );
                output::table(&rows);
            }
        }
        KeyCommand::Rm { provider, management } => {
            client.remove_key(pb::RemoveKeyRequest { provider: provider.clone(), management }).await.map_err(rpc)?;
            let kind = if management { "management key" } else { "key" };
            if json {
                output::json(&json!({"provider": provider, "removed": true, "management": management}));
            } else {
                println!("removed the {provider} {kind}");
            }
        }
    }
    Ok(())
}

fn provider_json(p: &pb::Provider) -> Value {
    json!({"name": p.name, "kind": p.kind, "base_url": p.base_url, "price_zero": p.price_zero, "has_key": p.has_key})
}

async fn provider(client: &mut Client, cmd: ProviderCommand, json: bool) -> anyhow::Result<()> {
    let changed = match cmd {
        ProviderCommand::Ls => {
            let providers = client.list_providers(pb::ListProvidersRequest {}).await.map_err(rpc)?.into_inner().providers;
            if json {
                output::json(&Value::Array(providers.iter().map(provider_json).collect()));
            } else {
                let mut rows = vec![vec!["NAME".into(), "KIND".into(), "BASE URL".into(), "KEY".into()]];
                for p in &providers {
                    let key = if p.price_zero {
                        "priced at zero"
                    } else if p.has_key {
                        "stored"
                    } else {
                        "missing"
                    };
                    rows.push(vec![p.name.clone(), p.kind.clone(), p.base_url.clone(), key.into()]);
                }
                output::table(&rows);
            }
            return Ok(());
        }
        ProviderCommand::Set { name, base_url, price_zero } => {
            if base_url.is_none() && price_zero.is_none() {
                bail!("nothing to change; give --base-url or --price-zero");
            }
            client.set_provider(pb::SetProviderRequest { name, base_url, price_zero }).await.map_err(rpc)?.into_inner().provider
        }
        ProviderCommand::Add { name, kind, base_url, price_zero } => {
            client.add_provider(pb::AddProviderRequest { name, kind, base_url, price_zero }).await.map_err(rpc)?.into_inner().provider
        }
    };
    let p = changed.unwrap_or_default();
    if json {
        output::json(&provider_json(&p));
    } else {
        println!("provider {} ({}) at {}", p.name, p.kind, p.base_url);
    }
    Ok(())
}

fn price_json(p: &pb::Price) -> Value {
    let opt = |s: &str| if s.is_empty() { Value::Null } else { Value::String(s.to_string()) };
    json!({
        "model": p.model, "input": p.input, "cached_input": opt(&p.cached_input),
        "cache_write_5m": opt(&p.cache_write_5m), "cache_write_1h": opt(&p.cache_write_1h), "output": p.output,
        "max_output_tokens": if p.max_output_tokens > 0 { json!(p.max_output_tokens) } else { Value::Null },
        "long_context_threshold": if p.long_context_threshold > 0 { json!(p.long_context_threshold) } else { Value::Null },
        "long_input": opt(&p.long_input), "long_output": opt(&p.long_output),
        "source": p.source, "origin": opt(&p.origin), "checked": opt(&p.checked),
    })
}

/// `$in in / $out out` for a change line, `-` for no price.
fn rates(p: Option<&pb::Price>) -> String {
    match p {
        Some(p) => format!("${} in / ${} out", p.input, p.output),
        None => "no price".to_string(),
    }
}

/// Prints what an import or update changed: every model whose price moved or went, and how many
/// were priced for the first time (all of them with `--json`).
fn print_changes(json: bool, imported: u32, skipped: u32, changes: &[pb::PriceChange], what: &str) {
    let added: Vec<&pb::PriceChange> = changes.iter().filter(|c| c.before.is_none()).collect();
    let moved: Vec<&pb::PriceChange> = changes.iter().filter(|c| c.before.is_some()).collect();
    if json {
        let change = |c: &&pb::PriceChange| json!({"model": c.model, "before": c.before.as_ref().map(price_json), "after": c.after.as_ref().map(price_json)});
        output::json(&json!({
            "imported": imported, "skipped": skipped, "source": what,
            "added": added.iter().map(|c| c.model.clone()).collect::<Vec<_>>(),
            "changed": moved.iter().filter(|c| c.after.is_some()).map(change).collect::<Vec<_>>(),
            "removed": moved.iter().filter(|c| c.after.is_none()).map(change).collect::<Vec<_>>(),
        }));
        return;
    }
    println!(
        "{imported} prices from {what} ({skipped} entries skipped: other modes or no token prices): {} models newly priced, {} changed, {} no longer priced",
        added.len(),
        moved.iter().filter(|c| c.after.is_some()).count(),
        moved.iter().filter(|c| c.after.is_none()).count()
    );
    for c in moved {
        println!("  {}: {} -> {}", c.model, rates(c.before.as_ref()), rates(c.after.as_ref()));
    }
}

async fn price(client: &mut Client, cmd: PriceCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        PriceCommand::Ls => {
            let prices = client.list_prices(pb::ListPricesRequest {}).await.map_err(rpc)?.into_inner().prices;
            if json {
                output::json(&Value::Array(prices.iter().map(price_json).collect()));
            } else {
                let dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
                let mut rows = vec![["MODEL", "INPUT", "CACHED", "CACHE WRITE", "OUTPUT", "SOURCE", "SINCE"].map(String::from).to_vec()];
                for p in &prices {
                    let source = match p.source.as_str() {
                        "builtin" => "built-in".to_string(),
                        "list" => "price list".to_string(),
                        _ => p.origin.clone(),
                    };
                    rows.push(vec![
                        p.model.clone(),
                        p.input.clone(),
                        dash(&p.cached_input),
                        dash(&p.cache_write_5m),
                        p.output.clone(),
                        source,
                        dash(&p.checked),
                    ]);
                }
                output::table(&rows);
                println!("(USD per million tokens; SINCE: when the price was checked, fetched or set)");
                if let Some(listed) = prices.iter().find(|p| p.source == "list") {
                    println!("price list: {}, fetched {}", listed.origin, listed.checked);
                }
            }
        }
        PriceCommand::Import { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let source = std::path::absolute(&file).unwrap_or(file.clone()).display().to_string();
            let r = client.import_prices(pb::ImportPricesRequest { litellm_json: text, source }).await.map_err(rpc)?.into_inner();
            print_changes(json, r.imported, r.skipped, &r.changes, &file.display().to_string());
        }
        PriceCommand::Update { from } => {
            let text = crate::fetch::text(&from).await?;
            let r =
                client.update_prices(pb::UpdatePricesRequest { litellm_json: text, source: from.clone() }).await.map_err(rpc)?.into_inner();
            print_changes(json, r.imported, r.skipped, &r.changes, &from);
        }
        PriceCommand::Set { model, input, output: out, cached_input, cache_write, cache_write_1h, max_output_tokens } => {
            let price = pb::Price {
                model,
                input,
                output: out,
                cached_input: cached_input.unwrap_or_default(),
                cache_write_5m: cache_write.unwrap_or_default(),
                cache_write_1h: cache_write_1h.unwrap_or_default(),
                max_output_tokens: max_output_tokens.unwrap_or(0),
                ..Default::default()
            };
            let p = client.set_price(pb::SetPriceRequest { price: Some(price) }).await.map_err(rpc)?.into_inner().price.unwrap_or_default();
            if json {
                output::json(&price_json(&p));
            } else {
                println!("{}: input ${} and output ${} per million tokens", p.model, p.input, p.output);
            }
        }
    }
    Ok(())
}

/// The provider an agent speaks by default; unknown agents get OpenAI's API, the most common.
fn default_provider(agent: &str) -> &'static str {
    match agent {
        "claude" | "claude-code" | "opencode" | "openclaw" | "goose" | "continue" => "anthropic",
        "gemini" | "gemini-cli" => "gemini",
        _ => "openai",
    }
}

/// The environment lines that point an SDK of `kind` at the proxy.
fn export_lines(kind: &str, base_url: &str, key: &str) -> Vec<String> {
    let (url_var, key_var) = match kind {
        "anthropic" => ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY"),
        "gemini" => ("GOOGLE_GEMINI_BASE_URL", "GEMINI_API_KEY"),
        _ => ("OPENAI_BASE_URL", "OPENAI_API_KEY"),
    };
    vec![format!("export {url_var}={base_url}"), format!("export {key_var}={key}")]
}

pub(crate) fn local_user() -> String {
    std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| format!("uid {}", unsafe { libc::getuid() }))
}

/// The one line every direct grant is given with.
const DIRECT_CAVEAT: &str =
    "direct: the agent calls OpenRouter itself, so only OpenRouter's limit on this key caps it; capit neither sees nor meters its requests";

/// Writes a direct grant's new key into the files it was installed into (its key was replaced:
/// a rotation, a new expiry), keeping what each file was before capit; says what it did.
async fn reinstall(client: &mut Client, g: &pb::Grant, key: &str, base_url: &str) -> anyhow::Result<Option<String>> {
    if g.installs.is_empty() {
        return Ok(None);
    }
    let providers = client.list_providers(pb::ListProvidersRequest {}).await.map_err(rpc)?.into_inner().providers;
    let kind = providers.iter().find(|p| p.name == g.provider).map(|p| p.kind.clone()).unwrap_or_default();
    let env = AgentEnv::from_process();
    let target = Target { base_url, key, kind: &kind };
    let mut records = Vec::new();
    let mut shown = Vec::new();
    for install in &g.installs {
        let path = std::path::PathBuf::from(&install.path);
        let installer = Installer::of_record(install);
        let current = files::read(&path).with_context(|| format!("reading {}", install.path))?;
        let text = installer.install(&path, current.as_deref(), &target)?;
        files::write_atomic(&path, &text, installer.holds_key()).with_context(|| format!("writing {}", install.path))?;
        records.push(pb::InstallRecord { written_sha256: files::fingerprint(&text), ..install.clone() });
        shown.push(consumers::display_path(&path, &env));
    }
    client.record_install(pb::RecordInstallRequest { name: g.name.clone(), installs: records }).await.map_err(rpc)?;
    Ok(Some(format!("the new key is installed into {}", shown.join(", "))))
}

async fn grant(client: &mut Client, args: GrantArgs, json: bool) -> anyhow::Result<()> {
    let manual = args.direct.then(|| consumers::direct_instructions(&args.agent)).flatten();
    if let Some(reason) = consumers::unsupported(&args.agent).filter(|_| manual.is_none()) {
        bail!("{reason}");
    }
    let env = AgentEnv::from_process();
    let consumer = consumers::find(&args.agent).filter(|_| !args.no_install);
    // A direct key can only be an OpenRouter one: only OpenRouter caps a key itself.
    let provider = args
        .provider
        .clone()
        .or(args.direct.then(|| "openrouter".to_string()))
        .or(consumer.map(|c| c.provider().to_string()))
        .unwrap_or_else(|| default_provider(&args.agent).to_string());
    let now = chrono::Utc::now().timestamp();
    let expires_at = match &args.expires {
        Some(text) => when::parse_expiry(text, now)?,
        None => 0,
    };
    let providers = client.list_providers(pb::ListProvidersRequest {}).await.map_err(rpc)?.into_inner().providers;
    let Some(info) = providers.iter().find(|p| p.name == provider).cloned() else {
        let names: Vec<&str> = providers.iter().map(|p| p.name.as_str()).collect();
        bail!("unknown provider {provider:?}; known: {}", names.join(", "));
    };
    // Every file (the agent's and its companions) is read and its edit checked before any grant
    // exists: a broken file, or one whose settings would go around the cap, stops here untouched.
    let installers: Vec<(Installer, std::path::PathBuf)> = match (&args.env_file, consumer) {
        (Some(file), _) => vec![(Installer::EnvFile, std::path::absolute(file)?)],
        (None, Some(c)) => {
            c.check(&env).map_err(|reason| anyhow!("{reason}"))?;
            if !c.accepts(&info.kind) {
                bail!("{} cannot use provider {provider:?} ({}); give --no-install or --env-file to get the key", c.name(), info.kind);
            }
            let mut list = Vec::new();
            for installer in Installer::for_agent(c) {
                let Installer::Agent(agent) = &installer else { continue };
                let path = agent.config_path(&env).context("cannot find the agent's configuration: HOME is not set")?;
                list.push((installer, path));
            }
            list
        }
        (None, None) => Vec::new(),
    };
    let plan = install::plan(installers, &info.kind)?;
    if args.dry_run {
        if plan.is_empty() {
            bail!("--dry-run shows an install; {} has none (give a known agent or --env-file)", args.agent);
        }
        let status = client.get_status(pb::GetStatusRequest {}).await.map_err(rpc)?.into_inner();
        let suffix = if info.kind == "anthropic" || info.kind == "gemini" { "" } else { "/v1" };
        let base_url =
            if args.direct { format!("{}{suffix}", info.base_url) } else { format!("http://{}/{}{suffix}", status.listen_addr, info.name) };
        let target = Target { base_url: &base_url, key: "sk-capit-<new key>", kind: &info.kind };
        for step in &plan {
            let existing = files::read(&step.path)?;
            let new = step.installer.install(&step.path, existing.as_deref(), &target)?;
            if existing.as_deref().unwrap_or("") != new {
                print!("{}", install::diff(&consumers::display_path(&step.path, &env), existing.as_deref().unwrap_or(""), &new));
            }
        }
        for note in plan.iter().flat_map(|s| &s.notes) {
            println!("{note}");
        }
        return Ok(());
    }
    // A direct grant, or one whose provider key capit makes, needs no master key.
    if !info.has_key && !info.price_zero && !args.direct && !info.has_management_key {
        // A first-time user needs one command: ask for the master key on the spot.
        let secret = read_secret(&format!("No {provider} key is stored yet. Master key for {provider} (input hidden): "))
            .with_context(|| format!("no master key is stored for {provider}; add one with: capitctl key add {provider}"))?;
        client.add_key(pb::AddKeyRequest { provider: provider.clone(), secret, management: false }).await.map_err(rpc)?;
    }
    // Granting an agent again replaces its grant, but only once the daemon has accepted the new
    // one: the old key dies in the same write that makes the new one, and its files are then
    // rewritten with the new key (a bad cap, period or model changes nothing).
    let replace = !plan.is_empty();
    let request = pb::CreateGrantRequest {
        name: args.agent.clone(),
        provider: provider.clone(),
        cap: args.amount.clone(),
        period: args.period.clone(),
        expires_at,
        models: args.models.clone(),
        note: args.note.clone(),
        created_by: local_user(),
        limits: Some(limits_pb(&args.limits)),
        direct: args.direct,
        apis: args.apis.clone(),
        replace,
        alerts: alerts_pb(args.alert.as_ref())?,
        team: args.team.clone().unwrap_or_default(),
    };
    let created = client.create_grant(request).await.map_err(rpc)?.into_inner();
    let g = created.grant.clone().unwrap_or_default();
    let replaced = created.replaced.as_ref().map(|r| r.installs.clone()).unwrap_or_default();
    let mut written = Vec::new();
    if !plan.is_empty() {
        let target = Target { base_url: &created.base_url, key: &created.key, kind: &info.kind };
        let applied = install::apply(&plan, &target, &replaced, &env);
        let result = match applied {
            Ok((records, done)) => {
                written = done;
                client
                    .record_install(pb::RecordInstallRequest { name: g.name.clone(), installs: records.clone() })
                    .await
                    .map_err(rpc)
                    .inspect_err(|_| {
                        for record in &records {
                            let _ = install::restore(record, &info.kind, &env);
                        }
                    })
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            // Nothing half-done: the files are back as they were, and the new grant goes again.
            let _ = client.revoke_grant(pb::RevokeGrantRequest { name: g.name.clone() }).await;
            let first = consumers::display_path(&plan[0].path, &env);
            let what =
                if created.replaced.is_some() { "the grant it replaced was revoked and its files restored" } else { "no grant was made" };
            return Err(e.context(format!("installing into {first}; {what}")));
        }
    }
    let notes: Vec<&String> = plan.iter().flat_map(|s| &s.notes).collect();
    let exports = export_lines(&info.kind, &created.base_url, &created.key);
    let per = if g.period == "total" { " in total".to_string() } else { format!("/{}", g.period) };
    if json {
        let installed: Vec<Value> = written
            .iter()
            .map(|w| json!({"path": w.shown, "mode": w.mode.map(|m| format!("{m:04o}")), "mode_before": w.mode_before.map(|m| format!("{m:04o}"))}))
            .collect();
        output::json(&json!({
            "name": g.name, "provider": g.provider, "key": created.key, "base_url": created.base_url,
            "cap": g.cap, "period": g.period, "expires_at": time_json(g.expires_at),
            "models": g.models, "state": g.state, "created_by": g.created_by, "note": g.note,
            "resets_at": time_json(g.resets_at), "exports": exports,
            "installed_into": written.first().map(|w| w.shown.clone()), "installed": installed, "notes": notes,
            "replaced": created.replaced.is_some(),
            "direct": g.direct, "apis": g.apis, "note_direct": g.direct.then_some(DIRECT_CAVEAT), "setup": manual,
        }));
        return Ok(());
    }
    let mode = if g.direct { " direct" } else { "" };
    if !plan.is_empty() {
        let into = if written.is_empty() { "its configuration, already up to date".to_string() } else { install::describe(&written) };
        println!("${}{per}{mode} {} grant \"{}\" installed into {into}", g.cap, g.provider, g.name);
        for note in notes {
            println!("{note}");
        }
        if g.direct {
            println!("{DIRECT_CAVEAT}");
        }
        return Ok(());
    }
    println!("${}{per}{mode} {} grant \"{}\" created; its key is shown only now:", g.cap, g.provider, g.name);
    println!();
    println!("  key:      {}", created.key);
    println!("  base URL: {}", created.base_url);
    println!();
    match manual {
        Some(steps) => println!("{steps}"),
        None => {
            for line in exports {
                println!("{line}");
            }
        }
    }
    if g.direct {
        println!("{DIRECT_CAVEAT}");
    }
    Ok(())
}

async fn uninstall(client: &mut Client, agent: &str, json: bool) -> anyhow::Result<()> {
    let grants = client.list_grants(pb::ListGrantsRequest { include_revoked: false }).await.map_err(rpc)?.into_inner().grants;
    let Some(grant) = grants.iter().find(|g| g.name == agent) else { bail!("no active grant named {agent:?}") };
    if grant.installs.is_empty() {
        bail!("grant {agent:?} is not installed into any configuration");
    }
    let providers = client.list_providers(pb::ListProvidersRequest {}).await.map_err(rpc)?.into_inner().providers;
    let kind = providers.iter().find(|p| p.name == grant.provider).map(|p| p.kind.clone()).unwrap_or_default();
    let env = AgentEnv::from_process();
    let mut done = Vec::new();
    for install in &grant.installs {
        done.push(install::restore(install, &kind, &env)?);
    }
    let restored = done.join("; ");
    client.record_install(pb::RecordInstallRequest { name: agent.to_string(), installs: Vec::new() }).await.map_err(rpc)?;
    if json {
        output::json(&json!({"grant": agent, "restored": restored}));
    } else {
        println!("{restored}; grant \"{agent}\" still works (revoke it to stop its key)");
    }
    Ok(())
}

fn agents(json: bool) -> anyhow::Result<()> {
    let env = AgentEnv::from_process();
    let rows: Vec<(String, String, String, bool, String)> = consumers::all()
        .iter()
        .map(|c| {
            let path = c.config_path(&env).map(|p| consumers::display_path(&p, &env)).unwrap_or_default();
            (c.name().to_string(), c.describe().to_string(), c.provider().to_string(), c.detect(&env), path)
        })
        .collect();
    if json {
        let mut list: Vec<Value> = rows.iter().map(|(name, what, provider, found, path)| json!({"agent": name, "describes": what, "provider": provider, "found": found, "config": path, "supported": true})).collect();
        for name in ["cursor", "windsurf"] {
            let direct = consumers::direct_instructions(name).is_some();
            list.push(json!({"agent": name, "supported": false, "direct": direct, "reason": consumers::unsupported(name)}));
        }
        output::json(&Value::Array(list));
        return Ok(());
    }
    let mut table = vec![["AGENT", "WHAT", "PROVIDER", "FOUND", "CONFIG"].map(String::from).to_vec()];
    for (name, what, provider, found, path) in rows {
        table.push(vec![name, what, provider, if found { "yes" } else { "no" }.into(), path]);
    }
    output::table(&table);
    println!("any other name: capitctl grant NAME AMOUNT --provider P prints the key and export lines (or --env-file FILE)");
    println!("any agent, with an OpenRouter management key stored: --direct hands it a key OpenRouter caps itself (no proxy)");
    for name in ["cursor", "windsurf"] {
        let how = if consumers::direct_instructions(name).is_some() { "only with --direct" } else { "not supported" };
        println!("{name}: {how}: {}", consumers::unsupported(name).unwrap_or_default());
    }
    Ok(())
}

fn limits_pb(l: &LimitArgs) -> pb::Limits {
    pb::Limits {
        max_requests: l.max_requests.unwrap_or(0),
        max_tokens: l.max_tokens.unwrap_or(0),
        rpm: l.rpm.unwrap_or(0),
        tpm: l.tpm.unwrap_or(0),
        concurrency: l.concurrency.unwrap_or(0),
        fit: l.fit.unwrap_or(true),
    }
}

fn limits_json(l: Option<&pb::Limits>) -> Value {
    let l = l.cloned().unwrap_or_default();
    let n = |v: u64| if v == 0 { Value::Null } else { json!(v) };
    json!({"max_requests": n(l.max_requests), "max_tokens": n(l.max_tokens), "rpm": n(l.rpm), "tpm": n(l.tpm), "concurrency": n(l.concurrency), "fit": l.fit})
}

async fn set(client: &mut Client, args: SetArgs, json: bool) -> anyhow::Result<()> {
    let now = chrono::Utc::now().timestamp();
    let expires_at = match args.expires.as_deref() {
        None => None,
        Some("never") => Some(0),
        Some(text) => Some(when::parse_expiry(text, now)?),
    };
    let l = &args.limits;
    let request = pb::UpdateGrantRequest {
        name: args.grant.clone(),
        cap: args.cap.clone(),
        period: args.period.clone(),
        expires_at,
        set_models: args.models.is_some(),
        models: args.models.clone().unwrap_or_default(),
        note: args.note.clone(),
        max_requests: l.max_requests,
        max_tokens: l.max_tokens,
        rpm: l.rpm,
        tpm: l.tpm,
        concurrency: l.concurrency,
        fit: l.fit,
        set_apis: args.apis.is_some(),
        apis: args.apis.clone().unwrap_or_default(),
        alerts: alerts_pb(args.alert.as_ref())?,
    };
    let unchanged = request.alerts.is_none()
        && request.cap.is_none()
        && request.period.is_none()
        && request.expires_at.is_none()
        && !request.set_models
        && request.note.is_none()
        && [l.max_requests, l.max_tokens, l.rpm, l.tpm, l.concurrency].iter().all(Option::is_none)
        && l.fit.is_none()
        && !request.set_apis;
    if unchanged {
        bail!("nothing to change; give --cap, --period, --expires, --models, --apis, --note, --alert or a limit");
    }
    let reply = client.update_grant(request).await.map_err(rpc)?.into_inner();
    let g = reply.grant.unwrap_or_default();
    let reinstalled = if reply.key.is_empty() { None } else { reinstall(client, &g, &reply.key, &reply.base_url).await? };
    if json {
        let mut doc = grant_json(&g);
        if !reply.key.is_empty() {
            doc["key"] = json!(reply.key);
            doc["base_url"] = json!(reply.base_url);
            doc["reinstalled"] = json!(reinstalled);
        }
        output::json(&doc);
    } else {
        println!("grant \"{}\": {} of {} per {}, {}", g.name, dollars(&g.spent), dollars(&g.cap), g.period, g.state);
        if !reply.key.is_empty() {
            // OpenRouter cannot change a key's expiry, so the direct grant has a new key.
            println!(
                "its OpenRouter key was replaced (OpenRouter cannot change a key's expiry) and the old one deleted; the new key is shown only now:"
            );
            println!();
            println!("  key:      {}", reply.key);
            println!("  base URL: {}", reply.base_url);
            if let Some(done) = reinstalled {
                println!("{done}");
            }
        }
    }
    Ok(())
}

async fn rotate(client: &mut Client, name: &str, json: bool) -> anyhow::Result<()> {
    let r = client.rotate_grant(pb::RotateGrantRequest { name: name.to_string() }).await.map_err(rpc)?.into_inner();
    let g = r.grant.unwrap_or_default();
    // The old key stops at once: every file it was installed into gets the new one.
    let reinstalled = reinstall(client, &g, &r.key, &r.base_url).await?;
    if json {
        let mut doc = grant_json(&g);
        doc["key"] = json!(r.key);
        doc["base_url"] = json!(r.base_url);
        doc["reinstalled"] = json!(reinstalled);
        output::json(&doc);
    } else {
        let what = if g.direct { "OpenRouter key" } else { "key" };
        println!("grant \"{}\" has a new {what} (the old one no longer works); it is shown only now:", g.name);
        println!();
        println!("  key:      {}", r.key);
        println!("  base URL: {}", r.base_url);
        if let Some(done) = reinstalled {
            println!("{done}");
        }
    }
    Ok(())
}

pub(crate) fn grant_json(g: &pb::Grant) -> Value {
    json!({
        "name": g.name, "provider": g.provider, "cap": g.cap, "spent": g.spent, "reserved": g.reserved, "lease": g.lease, "period": g.period,
        "expires_at": time_json(g.expires_at), "state": g.state, "resets_at": time_json(g.resets_at),
        "models": g.models, "created_at": time_json(g.created_at), "created_by": g.created_by, "note": g.note,
        "revoked_at": time_json(g.revoked_at), "limits": limits_json(g.limits.as_ref()), "alerts": g.alerts,
        "installed_into": g.installs.first().map(|i| i.path.clone()),
        "refused": refused_json(&g.refused),
        "direct": g.direct, "spent_source": if g.direct { "provider" } else { "ledger" }, "apis": g.apis,
        "provider_key": g.provider_key.as_ref().map(crate::remote::provider_key_json),
        "team": (!g.team.is_empty()).then_some(&g.team),
    })
}

/// Refusals by reason, as a JSON object sorted by reason.
fn refused_json(refused: &std::collections::HashMap<String, u64>) -> Value {
    let sorted: std::collections::BTreeMap<&String, &u64> = refused.iter().collect();
    json!(sorted)
}

/// Refusals by reason for people: "12 would_exceed_cap, 3 rpm", or "none".
fn refused_human(refused: &std::collections::HashMap<String, u64>) -> String {
    let mut reasons: Vec<(&String, &u64)> = refused.iter().collect();
    reasons.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    if reasons.is_empty() {
        return "none".into();
    }
    reasons.iter().map(|(reason, n)| format!("{n} {reason}")).collect::<Vec<_>>().join(", ")
}

async fn list(client: &mut Client, all: bool, json: bool) -> anyhow::Result<()> {
    let grants = client.list_grants(pb::ListGrantsRequest { include_revoked: all }).await.map_err(rpc)?.into_inner().grants;
    if json {
        output::json(&Value::Array(grants.iter().map(grant_json).collect()));
        return Ok(());
    }
    if grants.is_empty() {
        println!("no grants; make one with: capitctl grant <agent> <amount>");
        return Ok(());
    }
    let mut rows = vec![
        ["NAME", "PROVIDER", "SPENT / CAP", "HELD", "PERIOD", "RESETS", "EXPIRES", "STATE", "REFUSED", "BY", "NOTE"]
            .map(String::from)
            .to_vec(),
    ];
    for g in &grants {
        rows.push(vec![
            g.name.clone(),
            g.provider.clone(),
            format!("{} / {}", dollars(&g.spent), dollars(&g.cap)),
            dollars(&g.reserved),
            g.period.clone(),
            time_human(g.resets_at),
            time_human(g.expires_at),
            if g.direct { format!("{}, direct", g.state) } else { g.state.clone() },
            g.refused.values().sum::<u64>().to_string(),
            g.created_by.clone(),
            g.note.clone(),
        ]);
    }
    output::table(&rows);
    Ok(())
}

fn row_json(r: &pb::UsageRow) -> Value {
    json!({
        "key": r.key, "spent": r.spent, "requests": r.requests, "input_tokens": r.input_tokens,
        "cached_input_tokens": r.cached_input_tokens, "cache_write_tokens": r.cache_write_tokens,
        "output_tokens": r.output_tokens, "reasoning_tokens": r.reasoning_tokens,
        "estimated": r.estimated, "errors": r.errors,
    })
}

async fn usage(client: &mut Client, args: UsageArgs, json: bool) -> anyhow::Result<()> {
    let now = chrono::Utc::now().timestamp();
    let since = match &args.since {
        Some(text) => when::parse_since(text, now)?,
        None => 0,
    };
    let grant = args.grant.clone().unwrap_or_default();
    let u = client.get_usage(pb::GetUsageRequest { grant: grant.clone(), since }).await.map_err(rpc)?.into_inner();
    if let Some(file) = &args.chart {
        return crate::chart::write_svg(file, &u, json);
    }
    let total = u.total.clone().unwrap_or_default();
    let named = |rows: &[pb::UsageRow], key: &str| -> Vec<Value> {
        rows.iter()
            .map(|r| {
                let mut v = row_json(r);
                v[key] = Value::String(r.key.clone());
                v
            })
            .collect()
    };
    if json {
        let mut doc = json!({
            "grant": if grant.is_empty() { Value::Null } else { Value::String(grant.clone()) },
            "spent": total.spent, "requests": total.requests, "input_tokens": total.input_tokens,
            "cached_input_tokens": total.cached_input_tokens, "cache_write_tokens": total.cache_write_tokens,
            "output_tokens": total.output_tokens, "reasoning_tokens": total.reasoning_tokens,
            "estimated": total.estimated, "errors": total.errors,
            "by_model": named(&u.by_model, "model"), "by_day": named(&u.by_day, "day"),
            "since": time_json(since),
        });
        if grant.is_empty() {
            doc["by_grant"] = Value::Array(named(&u.by_grant, "grant"));
        } else {
            doc["period_spent"] = json!(u.period_spent);
            doc["cap"] = json!(u.cap);
            doc["period"] = json!(u.period);
            doc["created_by"] = json!(u.created_by);
            doc["note"] = json!(u.note);
            doc["refused"] = refused_json(&u.refused);
        }
        output::json(&doc);
        return Ok(());
    }
    if grant.is_empty() {
        println!("all grants: {} in {} requests", dollars(&total.spent), total.requests);
    } else {
        println!(
            "grant \"{grant}\": {} in {} requests; {} of {} this {} (by {}{})",
            dollars(&total.spent),
            total.requests,
            dollars(&u.period_spent),
            dollars(&u.cap),
            u.period,
            u.created_by,
            if u.note.is_empty() { String::new() } else { format!(": {}", u.note) }
        );
        println!("refused over its life: {}", refused_human(&u.refused));
    }
    let (label, rows) = match args.by.as_deref() {
        Some("day") => ("DAY", &u.by_day),
        Some(_) => ("MODEL", &u.by_model),
        None if grant.is_empty() => ("GRANT", &u.by_grant),
        None => ("MODEL", &u.by_model),
    };
    if rows.is_empty() {
        return Ok(());
    }
    // Every day in the range, spent or not, so the bars read as a time line.
    let rows = if label == "DAY" { crate::chart::every_day(rows) } else { rows.clone() };
    let bars = crate::chart::bars(&rows, 30);
    let mut table =
        vec![[label, "SPENT", "REQUESTS", "INPUT", "CACHED", "OUTPUT", "REASONING", "ESTIMATED", ""].map(String::from).to_vec()];
    for (r, bar) in rows.iter().zip(bars) {
        table.push(vec![
            r.key.clone(),
            dollars(&r.spent),
            r.requests.to_string(),
            r.input_tokens.to_string(),
            r.cached_input_tokens.to_string(),
            r.output_tokens.to_string(),
            r.reasoning_tokens.to_string(),
            r.estimated.to_string(),
            bar,
        ]);
    }
    println!();
    output::table(&table);
    Ok(())
}

async fn revoke(client: &mut Client, name: &str, json: bool) -> anyhow::Result<()> {
    let reply = client.revoke_grant(pb::RevokeGrantRequest { name: name.to_string() }).await.map_err(rpc)?.into_inner();
    let (g, note) = (reply.grant.unwrap_or_default(), reply.note);
    let restored = if g.installs.is_empty() {
        None
    } else {
        let providers = client.list_providers(pb::ListProvidersRequest {}).await.map_err(rpc)?.into_inner().providers;
        let kind = providers.iter().find(|p| p.name == g.provider).map(|p| p.kind.clone()).unwrap_or_default();
        let env = AgentEnv::from_process();
        let mut done = Vec::new();
        for install in &g.installs {
            done.push(install::restore(install, &kind, &env).context("the key is revoked, but its install could not be undone")?);
        }
        Some(done.join("; "))
    };
    if json {
        let mut doc = grant_json(&g);
        doc["restored"] = json!(restored);
        doc["note"] = json!((!note.is_empty()).then_some(note));
        output::json(&doc);
    } else {
        println!("revoked grant \"{}\"; its key no longer works (it had spent {})", g.name, dollars(&g.spent));
        if !note.is_empty() {
            println!("{note}");
        }
        if let Some(restored) = restored {
            println!("{restored}");
        }
    }
    Ok(())
}

async fn status(client: &mut Client, json: bool) -> anyhow::Result<()> {
    let s = client.get_status(pb::GetStatusRequest {}).await.map_err(rpc)?.into_inner();
    if json {
        output::json(&json!({
            "version": s.version, "uptime_seconds": s.uptime_seconds, "listen_addr": s.listen_addr, "home": s.home,
            "grants_active": s.grants_active, "grants_total": s.grants_total, "keys": s.keys,
            "providers": s.providers, "ledger_entries": s.ledger_entries, "watchers": s.watchers,
            "access_requests": s.access_requests,
            "provider_keys": {
                "checked_at": time_json(s.keys_checked_at), "errors": s.key_check_errors,
                "drift": s.drift.iter().map(|d| json!({
                    "grant": d.grant, "provider": d.provider, "provider_usage": d.provider_usage, "ledger": d.ledger,
                    "difference": d.difference, "drifted": d.drifted, "since": time_json(d.since),
                })).collect::<Vec<_>>(),
            },
            "key_storage": s.key_storage, "key_storage_detail": s.key_storage_detail,
            "store": {
                "writable": s.store_writable, "error": (!s.store_error.is_empty()).then_some(&s.store_error),
                "failing_since": time_json(s.store_failing_since), "waiting_writes": s.store_waiting_writes,
                "outages_recovered": s.store_outages_recovered,
            },
        }));
    } else {
        println!("capitd {} up {} s, proxy on http://{}", s.version, s.uptime_seconds, s.listen_addr);
        println!("home {}", s.home);
        println!(
            "{} active grants ({} in all), {} master keys, {} providers, {} ledger entries",
            s.grants_active, s.grants_total, s.keys, s.providers, s.ledger_entries
        );
        if s.access_requests > 0 {
            println!("{} access requests wait for an answer: capitctl requests", s.access_requests);
        }
        if s.keys_checked_at > 0 {
            let drifted: Vec<&pb::KeyDrift> = s.drift.iter().filter(|d| d.drifted).collect();
            println!(
                "provider keys checked {}: {} keys, {} drifting from the ledger",
                time_human(s.keys_checked_at),
                s.drift.len(),
                drifted.len()
            );
            for d in drifted {
                println!(
                    "drift: grant \"{}\": {} reports {} used since {}, capit's ledger {} ({}{})",
                    d.grant,
                    d.provider,
                    dollars(&d.provider_usage),
                    time_human(d.since),
                    dollars(&d.ledger),
                    if d.difference.starts_with('-') { "" } else { "+" },
                    dollars(&d.difference).replace("$-", "-$")
                );
            }
        }
        for e in &s.key_check_errors {
            println!("provider key check failed: {e}");
        }
        println!("keys at rest: {}: {}", s.key_storage, s.key_storage_detail);
        if !s.store_writable {
            println!(
                "LEDGER CANNOT BE WRITTEN since {} ({} settlements waiting in memory): {}",
                time_human(s.store_failing_since),
                s.store_waiting_writes,
                s.store_error
            );
            println!("metered requests are refused with 503 until it can; free some disk space and service resumes by itself");
        }
    }
    Ok(())
}
