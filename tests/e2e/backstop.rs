//! OpenRouter as a second lock: with a management key stored, every OpenRouter grant gets its
//! own OpenRouter key capped at the grant's cap, kept in step through set, rotate and revoke,
//! compared with the ledger, and handed out whole to agents that cannot reach the proxy.

use std::time::Duration;

use ::http::Method;
use serde_json::Value;

use crate::support::daemon::Daemon;
use crate::support::http::{self, post_json};
use crate::support::upstream::Fake;
use crate::support::{TempDir, dec, runtime, wait_for};

/// An OpenRouter management key, as the fake knows it.
const MANAGEMENT: &str = "sk-or-v1-mgmt00000000000000000000000000000000000000000000000000000000";
const CHAT: &str = r#"{"model":"anthropic/claude-sonnet-4.5","messages":[{"role":"user","content":"hi"}]}"#;

/// A daemon whose openrouter provider points at a fresh fake holding a management key, stored
/// in capit; the fake reports (and bills) $0.001 a request.
fn setup(args: &[&str]) -> (Daemon, Fake) {
    let fake = Fake::openai();
    fake.openrouter().add_management_key(MANAGEMENT);
    fake.script(|s| s.report_cost = Some("0.001"));
    // The bound of a request comes from OpenRouter's model list; the bill is the cost it reports.
    fake.list_model("anthropic/claude-sonnet-4.5", "0.000003", "0.000015");
    let daemon = Daemon::start_with(args);
    daemon.ctl_ok(&["provider", "set", "openrouter", "--base-url", &fake.base_url()]);
    let out = daemon.ctl_stdin(&["key", "add", "openrouter", "--management"], MANAGEMENT);
    assert!(out.status.success(), "key add --management failed: {}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("stored the openrouter management key sk-o…0000"), "{said}");
    assert!(!said.contains(MANAGEMENT));
    (daemon, fake)
}

fn chat(daemon: &Daemon, key: &str) -> http::Reply {
    runtime().block_on(post_json(&daemon.url("/openrouter/v1/chat/completions"), key, CHAT))
}

/// The fake's key for grant `name`, made by capit.
fn remote(fake: &Fake, name: &str) -> crate::support::openrouter::FakeKey {
    fake.openrouter()
        .key_named(&format!("capit:{name}#"))
        .unwrap_or_else(|| panic!("no OpenRouter key for {name}: {:?}", fake.openrouter().keys()))
}

#[test]
fn an_ordinary_key_is_not_taken_for_a_management_key() {
    let fake = Fake::openai();
    let daemon = Daemon::start();
    daemon.ctl_ok(&["provider", "set", "openrouter", "--base-url", &fake.base_url()]);
    let ordinary = fake.openrouter().make_key("my laptop");
    let out = daemon.ctl_stdin(&["key", "add", "openrouter", "--management"], &ordinary.secret);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ordinary API key, not a management key"), "{err}");
    assert!(!err.contains(&ordinary.secret));
    let out = daemon.ctl_stdin(&["key", "add", "openai", "--management"], MANAGEMENT);
    assert!(String::from_utf8_lossy(&out.stderr).contains("only OpenRouter has management keys"));
    assert_eq!(daemon.ctl_json(&["key", "ls"]).as_array().unwrap().len(), 0, "nothing stored");
    let err = daemon.ctl_err(&["key", "ls", "--remote", "openrouter"]);
    assert!(err.contains("capitctl key add openrouter --management"), "{err}");
}

#[test]
fn grant_set_rotate_and_revoke_keep_the_openrouter_key_in_step() {
    let (daemon, fake) = setup(&[]);
    let keys = daemon.ctl_json(&["key", "ls"]);
    assert_eq!((keys[0]["kind"].as_str(), keys[0]["fingerprint"].as_str()), (Some("management"), Some("sk-o…0000")));

    // No master key is stored: the grant's own OpenRouter key is all it needs.
    let expires = chrono::Utc::now() + chrono::Duration::days(30);
    let key = daemon.grant("agent", "5", &["--provider", "openrouter", "--period", "week", "--expires", &expires.to_rfc3339()]);
    let made = remote(&fake, "agent");
    assert_eq!((made.limit, made.limit_reset.as_deref(), made.expires_at), (Some(dec("5")), Some("weekly"), Some(expires.timestamp())));
    assert!(made.include_byok_in_limit, "the cap counts BYOK spend too");
    let received = fake.received();
    let create = received.iter().find(|r| r.method == "POST" && r.path == "/v1/keys").unwrap();
    assert_eq!(create.header("authorization"), Some(format!("Bearer {MANAGEMENT}")));

    assert_eq!(chat(&daemon, &key).status, 200);
    let sent = fake.received().into_iter().rev().find(|r| r.path == "/v1/chat/completions").unwrap();
    assert_eq!(sent.header("authorization"), Some(format!("Bearer {}", made.secret)), "forwarded with the grant's own OpenRouter key");
    assert_eq!(remote(&fake, "agent").usage(), dec("0.001"));

    daemon.ctl_ok(&["set", "agent", "--cap", "7"]);
    assert_eq!(remote(&fake, "agent").limit, Some(dec("7")));
    daemon.ctl_ok(&["set", "agent", "--period", "month"]);
    assert_eq!(remote(&fake, "agent").limit_reset.as_deref(), Some("monthly"));

    // OpenRouter cannot change a key's expiry: a new one replaces it, counting what the old
    // one spent this month, and the old one is deleted.
    let later = chrono::Utc::now() + chrono::Duration::days(60);
    daemon.ctl_ok(&["set", "agent", "--expires", &later.to_rfc3339()]);
    let replaced = remote(&fake, "agent");
    assert_ne!(replaced.hash, made.hash);
    assert_eq!((replaced.expires_at, replaced.limit), (Some(later.timestamp()), Some(dec("6.999"))));
    assert_eq!(fake.openrouter().keys().len(), 1, "the old key is gone");
    assert_eq!(chat(&daemon, &key).status, 200, "the agent's virtual key is unchanged");

    let rotated = daemon.ctl_json(&["rotate", "agent"]);
    let new_key = rotated["key"].as_str().unwrap().to_string();
    let after = remote(&fake, "agent");
    assert_ne!(after.hash, replaced.hash);
    assert_eq!(after.limit, Some(dec("6.998")));
    assert_eq!(fake.openrouter().keys().len(), 1);
    assert_eq!(chat(&daemon, &key).status, 401, "the old virtual key died");
    assert_eq!(chat(&daemon, &new_key).status, 200);
    assert_eq!(fake.received().last().unwrap().header("authorization"), Some(format!("Bearer {}", after.secret)));

    let listed = daemon.ctl_json(&["ls"]);
    let pk = &listed[0]["provider_key"];
    assert_eq!((pk["limit"].as_str(), pk["limit_reset"].as_str()), (Some("6.998"), Some("monthly")));
    assert_eq!(pk["fingerprint"].as_str().unwrap(), format!("sk-o…{}", &after.secret[after.secret.len() - 4..]));

    // The remote listing: capit's key with its grant; a key capit made and lost, flagged; the
    // user's own key, only counted.
    fake.openrouter().make_key("my laptop");
    let installation = daemon.ctl_json(&["key", "ls", "--remote", "openrouter"])["installation"].as_str().unwrap().to_string();
    fake.openrouter().make_key(&format!("capit:ghost#99@{installation}"));
    let listing = daemon.ctl_json(&["key", "ls", "--remote", "openrouter"]);
    let rows = listing["keys"].as_array().unwrap();
    let status =
        |grant: &str| rows.iter().find(|r| r["name"].as_str().unwrap().starts_with(&format!("capit:{grant}#"))).unwrap()["status"].clone();
    assert_eq!(status("agent"), "grant");
    assert_eq!(status("ghost"), "unknown");
    assert_eq!(listing["others"], 1);
    let table = daemon.ctl_ok(&["key", "ls", "--remote", "openrouter"]);
    assert!(table.contains("UNKNOWN to capit") && table.contains("$0.001") && table.contains("(1 other keys"), "{table}");

    daemon.ctl_ok(&["revoke", "agent"]);
    assert!(fake.openrouter().key_named("capit:agent#").is_none(), "revoke deletes the OpenRouter key");
    assert_eq!(chat(&daemon, &new_key).status, 401);

    // No key capit made or was given shows in its log or its replies.
    let log = daemon.log_text();
    for secret in [MANAGEMENT, &made.secret, &replaced.secret, &after.secret] {
        assert!(!log.contains(secret), "a key reached the log");
        assert!(!daemon.ctl_ok(&["ls", "--all", "--json"]).contains(secret));
    }
}

#[test]
fn the_provider_limit_stops_a_grant_whose_metering_is_bypassed_and_drift_is_reported() {
    let (daemon, fake) = setup(&["--key-check-interval", "1"]);
    let key = daemon.grant("leaky", "1", &["--provider", "openrouter"]);
    // The provider reports $0.001 a request but bills the key $0.40: capit's own meter sees a
    // fraction of the spend, as it would with a metering bug.
    fake.openrouter().overbill(Some("0.40"));
    for _ in 0..3 {
        assert_eq!(chat(&daemon, &key).status, 200);
    }
    let refused = chat(&daemon, &key);
    assert_eq!(refused.status, 402, "OpenRouter's own limit stops it: {}", refused.text());
    assert_eq!(refused.json()["error"]["metadata"]["limit_source"], "openrouter_key_limit");
    assert_eq!(daemon.spent("leaky"), dec("0.003"), "the local cap alone would have let it go on");
    assert_eq!(remote(&fake, "leaky").usage(), dec("1.2"));

    let status = wait_for("the drift to be reported", Duration::from_secs(20), || {
        let s = daemon.ctl_json(&["status"]);
        s["provider_keys"]["drift"].as_array().unwrap().iter().any(|d| d["drifted"] == true).then_some(s)
    });
    let row = &status["provider_keys"]["drift"][0];
    assert_eq!(
        (row["grant"].as_str(), row["provider_usage"].as_str(), row["ledger"].as_str()),
        (Some("leaky"), Some("1.2"), Some("0.003"))
    );
    assert_eq!(row["difference"], "1.197");
    let text = daemon.ctl_ok(&["status"]);
    assert!(text.contains("drift: grant \"leaky\": openrouter reports $1.20 used"), "{text}");
    assert!(text.contains("capit's ledger $0.003 (+$1.197)"), "{text}");

    // A grant whose figures agree is checked and not flagged.
    let honest = daemon.grant("honest", "1", &["--provider", "openrouter"]);
    fake.openrouter().overbill(None);
    assert_eq!(chat(&daemon, &honest).status, 200);
    let status = wait_for("the second grant to be checked", Duration::from_secs(20), || {
        let s = daemon.ctl_json(&["status"]);
        let rows = s["provider_keys"]["drift"].as_array().unwrap().clone();
        rows.iter().find(|d| d["grant"] == "honest" && d["provider_usage"] == "0.001").cloned()
    });
    assert_eq!((status["ledger"].as_str(), status["drifted"].as_bool()), (Some("0.001"), Some(false)));

    // A limit changed on OpenRouter's side is set back to the grant's.
    let hash = remote(&fake, "honest").hash;
    let received_before = fake.received().len();
    let (url, auth) = (format!("{}/v1/keys/{hash}", fake.base_url()), format!("Bearer {MANAGEMENT}"));
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    assert_eq!(runtime().block_on(http::send(Method::PATCH, &url, &headers, r#"{"limit":100}"#)).status, 200);
    wait_for("the limit to be set back", Duration::from_secs(20), || (remote(&fake, "honest").limit == Some(dec("1"))).then_some(()));
    assert!(fake.received().len() > received_before);
}

#[test]
fn a_revoke_while_openrouter_is_down_is_retried() {
    let (daemon, fake) = setup(&["--key-check-interval", "1"]);
    let key = daemon.grant("agent", "2", &["--provider", "openrouter"]);
    assert_eq!(chat(&daemon, &key).status, 200);
    fake.openrouter().set_down(true);
    let out = daemon.ctl_ok(&["revoke", "agent"]);
    assert!(out.contains("could not be deleted on openrouter's side yet"), "{out}");
    assert_eq!(chat(&daemon, &key).status, 401, "dead in capit at once");
    assert!(fake.openrouter().key_named("capit:agent#").is_some());
    fake.openrouter().set_down(false);
    wait_for("the deletion to be retried", Duration::from_secs(20), || fake.openrouter().key_named("capit:agent#").is_none().then_some(()));
    // Removing the management key is refused while a grant holds a key only it can delete.
    daemon.grant("other", "1", &["--provider", "openrouter"]);
    let err = daemon.ctl_err(&["key", "rm", "openrouter", "--management"]);
    assert!(err.contains("grants other hold openrouter keys"), "{err}");
    daemon.ctl_ok(&["revoke", "other"]);
    daemon.ctl_ok(&["key", "rm", "openrouter", "--management"]);
}

#[test]
fn a_management_key_added_later_caps_existing_grants() {
    let fake = Fake::openai();
    fake.openrouter().add_management_key(MANAGEMENT);
    fake.script(|s| s.report_cost = Some("0.25"));
    fake.list_model("anthropic/claude-sonnet-4.5", "0.000003", "0.000015");
    let daemon = Daemon::start();
    daemon.setup_provider("openrouter", &fake.base_url(), "sk-or-v1-master0000000000000000000000000000000000000000000000000000000");
    let key = daemon.grant("early", "1", &["--provider", "openrouter", "--period", "total"]);
    assert_eq!(chat(&daemon, &key).status, 200);
    let out = daemon.ctl_stdin(&["key", "add", "openrouter", "--management", "--json"], MANAGEMENT);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["grants_capped"], 1);
    let made = remote(&fake, "early");
    assert_eq!((made.limit, made.limit_reset), (Some(dec("0.75")), None), "what the grant spent already counts");
    assert_eq!(chat(&daemon, &key).status, 200);
    assert_eq!(fake.received().last().unwrap().header("authorization"), Some(format!("Bearer {}", made.secret)));
}

#[test]
fn direct_keys_for_cursor_and_for_a_plain_name() {
    let fake = Fake::openai();
    fake.openrouter().add_management_key(MANAGEMENT);
    fake.script(|s| s.report_cost = Some("0.002"));
    let daemon = Daemon::start();
    daemon.ctl_ok(&["provider", "set", "openrouter", "--base-url", &fake.base_url()]);
    let home = TempDir::new();

    let err = daemon.ctl_err(&["grant", "cursor", "20"]);
    assert!(err.contains("cannot reach a proxy on 127.0.0.1") && err.contains("--direct"), "{err}");
    let err = daemon.ctl_err(&["grant", "cursor", "20", "--direct"]);
    assert!(err.contains("capitctl key add openrouter --management"), "{err}");
    assert!(fake.openrouter().keys().is_empty());
    let out = daemon.ctl_stdin(&["key", "add", "openrouter", "--management"], MANAGEMENT);
    assert!(out.status.success());

    // Cursor keeps keys in its own database: the key is printed with where to put it.
    let text = String::from_utf8(daemon.ctl_home(home.path(), &["grant", "cursor", "20", "--direct"]).stdout).unwrap();
    let made = remote(&fake, "cursor");
    assert!(text.contains("$20.00/month direct openrouter grant \"cursor\" created"), "{text}");
    assert!(text.contains(&format!("key:      {}", made.secret)), "{text}");
    assert!(text.contains(&format!("base URL: {}/v1", fake.base_url())), "{text}");
    assert!(text.contains("Override OpenAI Base URL"), "{text}");
    assert!(text.contains("only OpenRouter's limit on this key caps it"), "{text}");
    assert_eq!((made.limit, made.limit_reset.as_deref()), (Some(dec("20")), Some("monthly")));

    // Cursor's requests go to OpenRouter itself; ls reads their usage from OpenRouter.
    let rt = runtime();
    let direct_url = format!("{}/v1/chat/completions", fake.base_url());
    for _ in 0..2 {
        assert_eq!(rt.block_on(post_json(&direct_url, &made.secret, CHAT)).status, 200);
    }
    let listed = daemon.ctl_json(&["ls"]);
    let cursor = listed.as_array().unwrap().iter().find(|g| g["name"] == "cursor").unwrap().clone();
    assert_eq!(
        (cursor["direct"].as_bool(), cursor["spent"].as_str(), cursor["spent_source"].as_str()),
        (Some(true), Some("0.004"), Some("provider"))
    );
    assert!(daemon.ctl_ok(&["ls"]).contains("active, direct"));

    // A plain name gets the key, OpenRouter's base URL and the export lines.
    let doc = daemon.ctl_json(&["grant", "remote-bot", "3", "--direct", "--period", "day"]);
    let bot = remote(&fake, "remote-bot");
    assert_eq!(
        (doc["key"].as_str(), doc["base_url"].as_str()),
        (Some(bot.secret.as_str()), Some(format!("{}/v1", fake.base_url()).as_str()))
    );
    assert_eq!(doc["exports"][0], format!("export OPENAI_BASE_URL={}/v1", fake.base_url()));
    assert_eq!(bot.limit_reset.as_deref(), Some("daily"));
    assert!(doc["note_direct"].as_str().unwrap().contains("capit neither sees nor meters"));
    // A new expiry is a new key on OpenRouter's side: the agent is handed it, the old one dies.
    let later = chrono::Utc::now() + chrono::Duration::days(10);
    let set = daemon.ctl_json(&["set", "remote-bot", "--expires", &later.to_rfc3339()]);
    let renewed = remote(&fake, "remote-bot");
    assert_eq!((set["key"].as_str(), renewed.expires_at), (Some(renewed.secret.as_str()), Some(later.timestamp())));
    assert_eq!(rt.block_on(post_json(&direct_url, &bot.secret, CHAT)).status, 401);
    assert_eq!(rt.block_on(post_json(&direct_url, &renewed.secret, CHAT)).status, 200);
    let err = daemon.ctl_err(&["set", "remote-bot", "--rpm", "10"]);
    assert!(err.contains("is direct"), "{err}");

    // What only the proxy could enforce is refused; Windsurf cannot take such a key at all.
    let err = daemon.ctl_err(&["grant", "bot2", "3", "--direct", "--models", "openai/gpt-5"]);
    assert!(err.contains("cannot hold it to models"), "{err}");
    let err = daemon.ctl_err(&["grant", "windsurf", "3", "--direct"]);
    assert!(err.contains("windsurf takes only vendors' own keys"), "{err}");
    let err = daemon.ctl_err(&["grant", "bot3", "3", "--direct", "--provider", "openai"]);
    assert!(err.contains("--direct needs an OpenRouter grant"), "{err}");
    let err = daemon.ctl_err(&["grant", "bot4", "3", "--direct", "--team", "eng"]);
    assert!(err.contains("a direct grant cannot share team \"eng\""), "{err}");

    // An agent with a file capit edits gets the key installed; rotation installs the new one.
    let conf = home.path().join(".aider.conf.yml");
    std::fs::write(&conf, "# mine\nmodel: openai/gpt-5\n").unwrap();
    let line = String::from_utf8(daemon.ctl_home(home.path(), &["grant", "aider", "4", "--direct"]).stdout).unwrap();
    assert!(line.contains("direct openrouter grant \"aider\" installed into ~/.aider.conf.yml"), "{line}");
    let aider = remote(&fake, "aider");
    let text = std::fs::read_to_string(&conf).unwrap();
    assert!(text.contains(&aider.secret) && text.contains(&format!("{}/v1", fake.base_url())), "{text}");
    let rotated = String::from_utf8(daemon.ctl_home(home.path(), &["rotate", "aider"]).stdout).unwrap();
    let new = remote(&fake, "aider");
    assert_ne!(new.secret, aider.secret);
    assert!(rotated.contains("the new key is installed into ~/.aider.conf.yml"), "{rotated}");
    assert!(std::fs::read_to_string(&conf).unwrap().contains(&new.secret));
    assert_eq!(rt.block_on(post_json(&direct_url, &aider.secret, CHAT)).status, 401, "the old key was deleted");
    daemon.ctl_home(home.path(), &["revoke", "aider"]);
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "# mine\nmodel: openai/gpt-5\n", "the file comes back as it was");

    // Revoking deletes the key on OpenRouter: Cursor's requests stop.
    daemon.ctl_ok(&["revoke", "cursor"]);
    assert_eq!(rt.block_on(post_json(&direct_url, &made.secret, CHAT)).status, 401);
    assert!(!daemon.log_text().contains(&made.secret));
}
