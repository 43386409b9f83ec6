//! Team budgets against a real Postgres (each test starts its own server): the pool's
//! transactions as members run them, a member's task through expiry, rollover and an outage, TLS,
//! and the whole set-up through the real capitd and capitctl.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rust_decimal::Decimal;

use capit::grants::Period;
use capit::lease::{LeaseError, LeaseSource};
use capit::secret::Secret;
use capit::state::Clock;
use capit::team::member::{Feed, Member, MemberConfig};
use capit::team::pg::{self, Database, LedgerCopy, Sync};
use capit::team::url::DbUrl;
use capit::team::{PoolSpec, TeamError};

use crate::metering::{chat_url, setup};
use crate::support::daemon::Daemon;
use crate::support::http::post_json;
use crate::support::postgres::Postgres;
use crate::support::{dec, runtime, wait_for};

fn url_of(pg: &Postgres) -> DbUrl {
    DbUrl::parse(&format!("{}?sslmode=disable", pg.url())).unwrap()
}

async fn open(pg: &Postgres) -> Database {
    let mut db = pg::connect(&url_of(pg), Some(&Secret::new(pg.password.clone()))).await.expect("connecting to the test Postgres");
    db.migrate().await.unwrap();
    db
}

fn spec(name: &str, cap: &str, period: Period, lease_seconds: u32) -> PoolSpec {
    PoolSpec { name: name.into(), cap: dec(cap), period, time_zone: "UTC".into(), lease_seconds }
}

fn copy(seq: u64, cost: &str, at_ms: i64) -> LedgerCopy {
    LedgerCopy {
        seq,
        grant: "claude".into(),
        model: "test-model".into(),
        api: "chat.completions".into(),
        cost: dec(cost),
        status: "metered".into(),
        http_status: 200,
        input_tokens: 10,
        output_tokens: 5,
        at_ms,
        window_start: 0,
    }
}

fn sync<'a>(pool: &'a str, member: &'a str, rows: &'a [LedgerCopy], target: Option<&str>) -> Sync<'a> {
    Sync { pool, member, window: 0, rows, target: target.map(dec) }
}

fn no_room(available: &str) -> Option<LeaseError> {
    Some(LeaseError::NoRoom { available: dec(available) })
}

#[test]
fn leases_fit_the_cap_across_members_and_a_batch_sent_twice_counts_once() {
    let Some(pg) = Postgres::start() else { return };
    let rt = runtime();
    rt.block_on(async {
        let mut db = open(&pg).await;
        db.create_pool(&spec("eng", "10", Period::Total, 60), "test").await.unwrap();
        assert!(matches!(db.create_pool(&spec("eng", "5", Period::Total, 60), "test").await, Err(TeamError::PoolExists(_))));
        for member in ["a", "b"] {
            db.join("eng", member, "host").await.unwrap();
        }
        let a = db.sync(sync("eng", "a", &[], Some("6"))).await.unwrap();
        assert_eq!((a.cover, a.refused.clone()), (dec("6"), None));
        let b = db.sync(sync("eng", "b", &[], Some("5"))).await.unwrap();
        assert_eq!((b.cover, b.refused), (dec("0"), no_room("4")), "6 + 5 does not fit a cap of 10");
        let b = db.sync(sync("eng", "b", &[], Some("4"))).await.unwrap();
        assert_eq!((b.cover, b.leases, b.refused), (dec("4"), dec("10"), None), "exactly the cap fits");

        // A reports what it spent: spend up, its lease down, in one transaction.
        let rows = [copy(0, "1.25", 1_000), copy(1, "0.75", 2_000)];
        let a = db.sync(sync("eng", "a", &rows, None)).await.unwrap();
        assert_eq!((a.spent, a.cover, a.new_rows, a.new_cost), (dec("2"), dec("4"), 2, dec("2")));
        // The same batch again (its reply was lost): nothing is counted twice.
        let again = db.sync(sync("eng", "a", &rows, None)).await.unwrap();
        assert_eq!((again.spent, again.cover, again.new_rows), (dec("2"), dec("4"), 0));
        let b = db.sync(sync("eng", "b", &[], Some("6"))).await.unwrap();
        assert_eq!(b.refused, no_room("4"), "spend 2 and leases 4 + 4 leave b only what it holds");
        // A lowering always succeeds and makes room for the others.
        db.sync(sync("eng", "a", &[], Some("0"))).await.unwrap();
        let b = db.sync(sync("eng", "b", &[], Some("8"))).await.unwrap();
        assert_eq!((b.cover, b.spent, b.leases), (dec("8"), dec("2"), dec("8")));
        // A raise that does not fit still records the rows it came with.
        let rows = [copy(2, "0.5", 3_000)];
        let a = db.sync(sync("eng", "a", &rows, Some("1"))).await.unwrap();
        assert_eq!((a.refused, a.spent, a.cover), (no_room("0"), dec("2.5"), dec("0")));
        assert_eq!(pg.query("SELECT sum(cost) FROM capit_ledger WHERE pool = 'eng'"), "2.50");
        assert_eq!(pg.query("SELECT reported_seq FROM capit_members WHERE member = 'a'"), "2");
        assert!(matches!(db.sync(sync("eng", "nobody", &[], None)).await, Err(TeamError::NotJoined(_))));
        assert!(matches!(db.join("nope", "a", "host").await, Err(TeamError::UnknownPool(_))));
    });
}

#[test]
fn an_expired_lease_is_charged_and_its_member_reconciles_without_counting_twice() {
    let Some(pg) = Postgres::start() else { return };
    let rt = runtime();
    rt.block_on(async {
        let mut db = open(&pg).await;
        db.create_pool(&spec("eng", "10", Period::Total, 2), "test").await.unwrap();
        for member in ["a", "b"] {
            db.join("eng", member, "host").await.unwrap();
        }
        db.sync(sync("eng", "a", &[], Some("3"))).await.unwrap();
        let b = db.sync(sync("eng", "b", &[], Some("8"))).await.unwrap();
        assert_eq!(b.refused, no_room("7"), "a's live lease holds its room");
        // A goes silent; once its lease has expired, B's next raise charges it as spend.
        tokio::time::sleep(Duration::from_millis(2300)).await;
        let b = db.sync(sync("eng", "b", &[], Some("7"))).await.unwrap();
        assert_eq!(b.charged, vec![("a".to_string(), dec("3"))]);
        assert_eq!((b.refused, b.spent, b.cover), (None, dec("3"), dec("7")), "a's lease is spend now, and b has the rest");
        assert_eq!(
            pg.query("SELECT lease || ' ' || (SELECT amount FROM capit_credits WHERE member = 'a') FROM capit_members WHERE member = 'a'"),
            "0 3"
        );
        // A comes back and reports what its requests cost: drawn from what was charged.
        let rows = [copy(0, "1.2", 1_000), copy(1, "0.3", 2_000)];
        let a = db.sync(sync("eng", "a", &rows, None)).await.unwrap();
        assert_eq!((a.spent, a.cover, a.credit), (dec("3"), dec("1.5"), dec("1.5")), "nothing counted twice");
        // It has nothing in flight: the cover goes to 0 and the excess is given back.
        let a = db.sync(sync("eng", "a", &[], Some("0"))).await.unwrap();
        assert_eq!((a.spent, a.cover), (dec("1.5"), dec("0")));
        assert_eq!(pg.query("SELECT sum(cost) FROM capit_ledger"), "1.5");
        assert_eq!(pg.query("SELECT spent FROM capit_pool_windows"), "1.5", "the pool's spend is its ledger, exactly");
        assert_eq!(pg.query("SELECT count(*) FROM capit_credits"), "0");
    });
}

#[test]
fn migrations_are_applied_once_and_a_newer_schema_is_refused() {
    let Some(pg) = Postgres::start() else { return };
    let rt = runtime();
    rt.block_on(async {
        // Several members migrating at once: one applies, the others find it done.
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let (url, password) = (url_of(&pg), pg.password.clone());
            set.spawn(async move {
                let mut db = pg::connect(&url, Some(&Secret::new(password))).await.unwrap();
                db.migrate().await.unwrap();
            });
        }
        while let Some(done) = set.join_next().await {
            done.unwrap();
        }
        assert_eq!(pg.query("SELECT string_agg(version::text, ',') FROM capit_schema_migrations"), "1");
        pg.query("INSERT INTO capit_schema_migrations (version, name) VALUES (99, 'from a newer capit')");
        let mut db = pg::connect(&url_of(&pg), Some(&Secret::new(pg.password.clone()))).await.unwrap();
        let err = db.migrate().await.unwrap_err();
        assert!(matches!(err, TeamError::SchemaTooNew { found: 99, known: 1 }), "{err}");
        // A wrong password is the database's answer, named as such, and never echoes a secret.
        let wrong = pg::connect(&url_of(&pg), Some(&Secret::new("not-the-password".into()))).await.err().unwrap();
        assert!(wrong.to_string().contains("password authentication failed"), "{wrong}");
        assert!(!wrong.to_string().contains("not-the-password"));
    });
}

/// The local ledger of a member, in memory: entries are appended by the test.
#[derive(Default)]
struct MemoryFeed(Mutex<Vec<LedgerCopy>>);

impl Feed for MemoryFeed {
    fn after(&self, after: Option<u64>, limit: usize) -> Result<Vec<LedgerCopy>, String> {
        let rows = self.0.lock().unwrap();
        Ok(rows.iter().filter(|r| after.is_none_or(|a| r.seq > a)).take(limit).cloned().collect())
    }
}

fn member_config(pg: &Postgres, pool: &str, member: &str, clock: &Clock) -> MemberConfig {
    MemberConfig {
        pool: pool.into(),
        url: url_of(pg),
        password: Some(Arc::new(Secret::new(pg.password.clone()))),
        member: member.into(),
        host: format!("host-{member}"),
        clock: clock.clone(),
        report_interval: Duration::from_millis(100),
    }
}

#[test]
fn the_pools_period_rolls_over_in_its_own_time_zone_on_the_members_clock() {
    let Some(pg) = Postgres::start() else { return };
    let rt = runtime();
    rt.block_on(async {
        let mut db = open(&pg).await;
        let pool = PoolSpec { time_zone: "Asia/Tokyo".into(), ..spec("daily", "1", Period::Day, 60) };
        db.create_pool(&pool, "test").await.unwrap();
        let clock = Clock::default();
        let feed = Arc::new(MemoryFeed::default());
        let member = Member::start(member_config(&pg, "daily", "m", &clock), feed.clone());
        member.flush().await.unwrap();
        member.commit_lease(dec("0.9")).await.unwrap();
        assert_eq!(member.commit_lease(dec("1.1")).await, Err(LeaseError::NoRoom { available: dec("1") }));
        let now_ms = clock.now_millis();
        feed.0.lock().unwrap().push(copy(0, "0.9", now_ms));
        member.flush().await.unwrap();
        let today = pool.window(clock.now_seconds());
        let standing = member.standing();
        assert_eq!((standing.last.as_ref().unwrap().spent, standing.cover), (dec("0.9"), dec("0")));
        assert_eq!(member.commit_lease(dec("0.2")).await, Err(LeaseError::NoRoom { available: dec("0.1") }), "today is spent");

        // Tokyo's midnight passes (on the daemon's clock, advanced as tests do).
        let midnight = today.end.unwrap();
        clock.advance(Duration::from_secs((midnight - clock.now_seconds()) as u64 + 1));
        member.commit_lease(dec("1")).await.unwrap();
        let standing = member.standing();
        assert_eq!((standing.last.as_ref().unwrap().spent, standing.cover), (dec("0"), dec("1")), "a new day, the whole cap");
        feed.0.lock().unwrap().push(copy(1, "0.25", clock.now_millis()));
        member.flush().await.unwrap();
        member.commit_lease(Decimal::ZERO).await.unwrap();
        let windows = pg.query("SELECT string_agg(window_start || '=' || spent, ' ' ORDER BY window_start) FROM capit_pool_windows");
        assert_eq!(windows, format!("{}=0.9 {midnight}=0.25", today.start));
        member.stop().await;
    });
}

#[test]
fn with_postgres_down_a_raise_fails_the_lease_serves_until_it_expires_and_reports_resume_exactly() {
    let Some(mut pg) = Postgres::start() else { return };
    let rt = runtime();
    let clock = Clock::default();
    let feed = Arc::new(MemoryFeed::default());
    let member = rt.block_on(async {
        let mut db = open(&pg).await;
        db.create_pool(&spec("eng", "10", Period::Total, 3), "test").await.unwrap();
        let member = Member::start(member_config(&pg, "eng", "m", &clock), feed.clone());
        member.commit_lease(dec("2")).await.unwrap();
        member
    });
    assert_eq!(member.usable_cover(Instant::now()), dec("2"));
    pg.stop();
    let started = Instant::now();
    rt.block_on(async {
        let refused = member.commit_lease(dec("3")).await;
        assert!(matches!(refused, Err(LeaseError::Unreachable(_))), "{refused:?}");
        // Spend settles meanwhile; it waits to be reported.
        feed.0.lock().unwrap().push(copy(0, "0.5", clock.now_millis()));
        feed.0.lock().unwrap().push(copy(1, "0.25", clock.now_millis()));
        assert!(member.flush().await.is_err());
    });
    // What was leased serves until its expiry, and not after.
    assert_eq!(member.usable_cover(Instant::now()), dec("2"), "still within the lease");
    wait_for("the lease to run out", Duration::from_secs(10), || member.usable_cover(Instant::now()).is_zero().then_some(()));
    assert!(started.elapsed() <= Duration::from_secs(3), "the cover outlived the lease: {:?}", started.elapsed());
    pg.restart();
    rt.block_on(async {
        wait_for_async(|| async { member.flush().await.is_ok() }).await;
        member.commit_lease(Decimal::ZERO).await.unwrap();
    });
    assert_eq!(pg.query("SELECT sum(cost) FROM capit_ledger"), "0.75");
    assert_eq!(pg.query("SELECT spent FROM capit_pool_windows"), "0.75", "the lease charged while down is reconciled exactly");
    assert_eq!(pg.query("SELECT lease FROM capit_members"), "0");
    rt.block_on(member.stop());
}

async fn wait_for_async<F: std::future::Future<Output = bool>>(mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn tls_to_postgres_verifies_the_certificate() {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "capit test team CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&key, &ca).unwrap();
    let (cert, key) = (server.pem(), key.serialize_pem());
    let conf = ["ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'"];
    let Some(pg) = Postgres::start_with(&conf, &[("server.crt", &cert), ("server.key", &key)]) else { return };
    let dir = crate::support::TempDir::new();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let password = Secret::new(pg.password.clone());
    let rt = runtime();
    rt.block_on(async {
        let verified =
            DbUrl::parse(&format!("postgres://capit@localhost:{}/capit?sslmode=require&sslrootcert={}", pg.port, ca_file.display()))
                .unwrap();
        let mut db = pg::connect(&verified, Some(&password)).await.expect("TLS with the pool's CA");
        db.migrate().await.unwrap();
        let unknown_ca = DbUrl::parse(&format!("postgres://capit@localhost:{}/capit?sslmode=require", pg.port)).unwrap();
        let err = pg::connect(&unknown_ca, Some(&password)).await.err().expect("an unknown CA is refused");
        assert!(matches!(err, TeamError::Unreachable(_)), "{err}");
        assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
    });
}

/// The whole set-up through capitctl: create on one machine, join on another (the password once
/// from a PGPASSFILE, once from stdin), grants that draw on the pool, their spend reported to
/// its ledger, usage by member, grant, model and day, and leave.
#[test]
fn team_create_join_grant_usage_and_leave_through_capitctl() {
    let Some(pg) = Postgres::start() else { return };
    let (first, fake) = setup();
    let second = Daemon::start();
    second.setup_provider("openai", &fake.base_url(), crate::metering::MASTER);
    second.ctl_ok(&["price", "set", "test-model", "--input", "1.10", "--cached-input", "0.275", "--output", "4.40"]);
    let url = format!("{}?sslmode=disable", pg.url());
    let passfile = pg.passfile(first.dir.path());

    let refused =
        first.ctl_err(&["team", "create", "eng", "10", "--db", &format!("postgres://capit:{}@127.0.0.1:{}/capit", pg.password, pg.port)]);
    assert!(refused.contains("password") && !refused.contains(&pg.password), "{refused}");
    let created =
        ctl_env(&first, &["team", "create", "eng", "10", "--db", &url, "--period", "day", "--tz", "Europe/Berlin", "--json"], &passfile);
    assert_eq!((created["name"].as_str(), created["cap"].as_str(), created["period"].as_str()), (Some("eng"), Some("10.00"), Some("day")));
    assert_eq!(created["time_zone"], "Europe/Berlin");
    assert!(!created.to_string().contains(&pg.password));
    let out = second.ctl_stdin(&["team", "join", "eng", "--db", &url, "--json"], &format!("{}\n", pg.password));
    assert!(out.status.success(), "join: {}", String::from_utf8_lossy(&out.stderr));
    let out = second.ctl_stdin(&["team", "join", "ops", "--db", &url], &format!("{}\n", pg.password));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no pool named \"ops\""), "{}", String::from_utf8_lossy(&out.stderr));
    let out = second.ctl_stdin(&["team", "join", "eng", "--db", &url], "wrong\n");
    assert!(!out.status.success());

    let missing = first.ctl_err(&["grant", "claude", "5", "--provider", "openai", "--no-install", "--team", "ops"]);
    assert!(missing.contains("not a member of pool \"ops\""), "{missing}");
    let key_a = first.grant("claude", "5", &["--provider", "openai", "--team", "eng"]);
    let key_b = second.grant("codex", "5", &["--provider", "openai", "--team", "eng"]);
    assert_eq!(first.ctl_json(&["ls"])[0]["team"], "eng");
    fake.script(|s| {
        s.prompt_tokens = 1000;
        s.completion_tokens = 200;
    });
    let rt = runtime();
    let body = r#"{"model":"test-model","max_tokens":300,"messages":[{"role":"user","content":"hi"}]}"#;
    for (daemon, key, n) in [(&first, &key_a, 3), (&second, &key_b, 2)] {
        for _ in 0..n {
            let reply = rt.block_on(post_json(&chat_url(daemon), key, body));
            assert_eq!(reply.status, 200, "{}", reply.text());
        }
    }
    // Each machine reports on its own within half a second; a usage query reports its own first.
    second.ctl_json(&["team", "usage", "eng"]);
    let by_member = first.ctl_json(&["team", "usage", "eng"]);
    let bill = fake.bill();
    assert_eq!(dec(by_member["total"]["spent"].as_str().unwrap()), bill, "the pool's ledger equals the upstream's bill: {by_member}");
    assert_eq!(by_member["total"]["requests"], 5);
    let rows = by_member["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{by_member}");
    let by_grant = second.ctl_json(&["team", "usage", "eng", "--by", "grant"]);
    let keys: Vec<&str> = by_grant["rows"].as_array().unwrap().iter().map(|r| r["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["claude", "codex"]);
    assert_eq!(second.ctl_json(&["team", "usage", "eng", "--by", "model"])["rows"][0]["key"], "test-model");
    let day = second.ctl_json(&["team", "usage", "eng", "--by", "day"]);
    assert_eq!(day["rows"].as_array().unwrap().len(), 1);
    assert_eq!(dec(day["spent"].as_str().unwrap()), bill, "spend this period is the ledger");

    let listed = first.ctl_json(&["team", "ls"]);
    let team = &listed[0];
    assert_eq!((team["name"].as_str(), team["reachable"].as_bool()), (Some("eng"), Some(true)));
    assert_eq!(team["members"].as_array().unwrap().len(), 2);
    assert_eq!(team["grants"], serde_json::json!(["claude"]));
    assert_eq!(team["database"], format!("postgres://capit@127.0.0.1:{}/capit", pg.port));
    let human = first.ctl_ok(&["team", "ls"]);
    assert!(human.contains("eng") && human.contains("$10.00/day"), "{human}");

    // Leaving is refused while a grant draws on the pool, and while a request admitted under
    // it is still in flight after its grant's revoke; once that one has settled, everything is
    // reported and the membership goes.
    assert!(first.ctl_err(&["team", "leave", "eng"]).contains("claude"));
    fake.script(|s| s.hold_after_first_event = true);
    let seen = fake.received().len();
    let streamed = r#"{"model":"test-model","max_tokens":300,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let in_flight = {
        let (url, key) = (chat_url(&first), key_a.clone());
        rt.spawn(async move { post_json(&url, &key, streamed).await })
    };
    wait_for("the stream to be in flight", Duration::from_secs(10), || (fake.received().len() > seen).then_some(()));
    first.ctl_ok(&["revoke", "claude"]);
    let err = first.ctl_err(&["team", "leave", "eng"]);
    assert!(err.contains("still in flight"), "{err}");
    fake.release();
    assert_eq!(rt.block_on(in_flight).unwrap().status, 200);
    first.ctl_ok(&["team", "leave", "eng"]);
    let by_member = second.ctl_json(&["team", "usage", "eng"]);
    assert_eq!(
        dec(by_member["total"]["spent"].as_str().unwrap()),
        fake.bill(),
        "the stream that outlived its grant is in the pool's ledger"
    );
    assert_eq!(first.ctl_json(&["team", "ls"]), serde_json::json!([]));
    assert_eq!(pg.query("SELECT count(*) FROM capit_members WHERE left_at IS NOT NULL"), "1");

    // The password is a secret: never in capitd's log, the audit log, or capitctl's output.
    for (daemon, name) in [(&first, "first"), (&second, "second")] {
        assert!(!daemon.log_text().contains(&pg.password), "{name}'s log holds the database password");
        let audit = std::fs::read_to_string(daemon.home.join("audit.log")).unwrap();
        assert!(!audit.contains(&pg.password), "{name}'s audit log holds the password");
        assert!(audit.contains("team.join") || audit.contains("team.create"), "{audit}");
    }
    let log = first.ctl_ok(&["log"]);
    assert!(log.contains("team.create") && log.contains("team.leave"), "{log}");
    // After a restart the member picks up where it was, from the stored connection.
    let mut second = second;
    second.restart();
    assert_eq!(second.ctl_json(&["team", "ls"])[0]["reachable"], true);
}

/// capitctl with `PGPASSFILE` set, asserting success; its JSON.
fn ctl_env(daemon: &Daemon, args: &[&str], passfile: &std::path::Path) -> serde_json::Value {
    let out = std::process::Command::new(crate::support::daemon::CAPITCTL)
        .arg("--socket")
        .arg(&daemon.socket)
        .args(args)
        .env("PGPASSFILE", passfile)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "capitctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The pool's lease books of four members, each with ten requests at a time, against one pool:
/// every request takes its hold under its member's book and goes "upstream" only once the
/// committed lease covers it; what is billed is the hold or less. The bill never passes the cap,
/// and once everything is reported the pool's ledger and spend equal the bill.
#[test]
fn four_members_with_ten_requests_each_never_bill_past_the_pool() {
    use capit::team::pool_lease::PoolLease;
    let Some(pg) = Postgres::start() else { return };
    let rt = runtime();
    let cap = dec("1.00");
    let (bill, refused, served) = rt.block_on(async {
        let mut db = open(&pg).await;
        db.create_pool(&spec("eng", "1.00", Period::Total, 30), "test").await.unwrap();
        let clock = Clock::default();
        let bill = Arc::new(Mutex::new(Decimal::ZERO));
        let (refused, served) = (Arc::new(std::sync::atomic::AtomicU64::new(0)), Arc::new(std::sync::atomic::AtomicU64::new(0)));
        let mut members = Vec::new();
        let mut tasks = tokio::task::JoinSet::new();
        for m in 0..4 {
            let feed = Arc::new(MemoryFeed::default());
            let member = Member::start(member_config(&pg, "eng", &format!("m{m}"), &clock), feed.clone());
            let lease = PoolLease::new(member.clone(), capit::lease::LeasePolicy::default(), 0);
            members.push(member);
            let seq = Arc::new(std::sync::atomic::AtomicU64::new(0));
            for stream in 0..10u64 {
                let (lease, feed, bill, seq, clock) = (lease.clone(), feed.clone(), bill.clone(), seq.clone(), clock.clone());
                let (refused, served) = (refused.clone(), served.clone());
                tasks.spawn(async move {
                    for i in 0..15u64 {
                        // Holds of 1 to 4 cents; the request costs 40 % to 100 % of its hold.
                        let hold = Decimal::new(1 + ((stream * 7 + i * 3) % 4) as i64, 2);
                        let Ok(taken) = lease.take(hold) else {
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            continue;
                        };
                        if lease.wait(&taken).await.is_err() {
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            continue;
                        }
                        tokio::time::sleep(Duration::from_millis(5 + (i % 3) * 10)).await;
                        let cost = hold * Decimal::new(40 + ((stream + i) % 7) as i64 * 10, 2);
                        *bill.lock().unwrap() += cost;
                        served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let n = seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        feed.0.lock().unwrap().push(copy(n, &cost.to_string(), clock.now_millis()));
                        lease.settle(taken, cost);
                    }
                });
            }
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        for member in &members {
            member.flush().await.unwrap();
            member.stop().await;
        }
        let bill = *bill.lock().unwrap();
        (bill, refused.load(std::sync::atomic::Ordering::Relaxed), served.load(std::sync::atomic::Ordering::Relaxed))
    });
    eprintln!("pool of $1.00: billed {bill} over {served} requests, {refused} refused");
    assert!(bill <= cap, "the members together billed {bill}, past the pool's cap of {cap}");
    assert!(served > 20 && refused > 0, "the load reached the cap: {served} served, {refused} refused");
    assert_eq!(dec(&pg.query("SELECT coalesce(sum(cost), 0) FROM capit_ledger")), bill, "the pool's ledger is the bill");
    assert_eq!(dec(&pg.query("SELECT spent FROM capit_pool_windows")), bill, "the pool's spend is the bill");
}

/// One member machine for the load tests: its own capitd and its own fake upstream, with a grant
/// of its own ($100, far from binding) that draws on the pool.
struct Machine {
    daemon: Daemon,
    fake: crate::support::upstream::Fake,
    key: String,
}

/// `n` machines on one pool of `cap` (leases of `lease_ttl` s), made by the first and joined by
/// the others, the password from stdin.
fn machines(pg: &Postgres, n: usize, cap: &str, lease_ttl: &str) -> Vec<Machine> {
    let url = format!("{}?sslmode=disable", pg.url());
    let password = format!("{}\n", pg.password);
    (0..n)
        .map(|i| {
            let (daemon, fake) = setup();
            let verb = if i == 0 {
                vec!["team", "create", "eng", cap, "--db", &url, "--period", "total", "--lease-ttl", lease_ttl]
            } else {
                vec!["team", "join", "eng", "--db", &url]
            };
            let out = daemon.ctl_stdin(&verb, &password);
            assert!(out.status.success(), "{verb:?}: {}", String::from_utf8_lossy(&out.stderr));
            let key = daemon.grant(&format!("agent{i}"), "100", &["--provider", "openai", "--team", "eng"]);
            fake.script(|s| {
                s.prompt_tokens = 1000;
                s.completion_tokens = 500;
                s.chunk_delay = Duration::from_millis(2);
            });
            Machine { daemon, fake, key }
        })
        .collect()
}

const LOAD_BODY: &str = r#"{"model":"test-model","stream":true,"max_tokens":500,"messages":[{"role":"user","content":"hi"}]}"#;

/// What one stream of requests saw.
#[derive(Default, Clone, Copy)]
struct Seen {
    ok: u64,
    team_refused: u64,
    other: u64,
}

/// `streams` concurrent clients per machine, each sending until `stop` is set or `each`
/// requests were sent; returns what each machine's clients saw.
fn load(
    rt: &tokio::runtime::Runtime,
    machines: &[&Machine],
    streams: usize,
    each: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Seen>> {
    let mut tasks = Vec::new();
    for m in machines {
        for _ in 0..streams {
            let (url, key, stop) = (chat_url(&m.daemon), m.key.clone(), stop.clone());
            tasks.push(rt.spawn(async move {
                let mut seen = Seen::default();
                let client = crate::support::http::client();
                let auth = format!("Bearer {key}");
                for _ in 0..each {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                    let request = crate::support::http::request(::http::Method::POST, &url, &[("authorization", &auth)], LOAD_BODY);
                    let Ok(response) = client.request(request).await else {
                        seen.other += 1;
                        continue;
                    };
                    let status = response.status().as_u16();
                    let body = http_body_util::BodyExt::collect(response.into_body()).await.map(|b| b.to_bytes()).unwrap_or_default();
                    match status {
                        200 => seen.ok += 1,
                        429 | 503 if String::from_utf8_lossy(&body).contains("team") => {
                            seen.team_refused += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        _ => seen.other += 1,
                    }
                }
                seen
            }));
        }
    }
    tasks
}

fn pool_ledger(pg: &Postgres) -> Decimal {
    dec(&pg.query("SELECT coalesce(sum(cost), 0) FROM capit_ledger"))
}

fn pool_spent(pg: &Postgres) -> Decimal {
    dec(&pg.query("SELECT coalesce(sum(spent), 0) FROM capit_pool_windows"))
}

/// Everything each machine settled is in the pool (a usage query reports its own first).
fn report_all(machines: &[Machine]) {
    for m in machines {
        m.daemon.ctl_json(&["team", "usage", "eng"]);
    }
}

/// The issue's test: 4 capitd instances, each with 10 concurrent streams, against one pool that
/// pays for 10 requests in all. The upstreams' combined bill never passes the pool's cap, and
/// the pool's ledger equals it. Also measured here, with a pool far from its cap: the added
/// latency of a pool grant over a plain one, and the pool's transactions per 1,000 requests.
#[test]
fn four_daemons_with_ten_streams_each_against_a_pool_that_fits_ten() {
    let Some(pg) = Postgres::start() else { return };
    let cost = dec("0.0033"); // 1,000 in and 500 out at $1.10 and $4.40 per million
    let cap = cost * dec("10");
    let machines = machines(&pg, 4, &cap.to_string(), "30");
    let rt = runtime();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let all: Vec<&Machine> = machines.iter().collect();
    let seen: Vec<Seen> = load(&rt, &all, 10, 6, stop).into_iter().map(|t| rt.block_on(t).unwrap()).collect();
    report_all(&machines);
    let bill: Decimal = machines.iter().map(|m| m.fake.bill()).sum();
    let ok: u64 = seen.iter().map(|s| s.ok).sum();
    let refused: u64 = seen.iter().map(|s| s.team_refused).sum();
    let other: u64 = seen.iter().map(|s| s.other).sum();
    let overshoot = (bill - cap).max(Decimal::ZERO);
    eprintln!(
        "pool cap ${cap}: 4 daemons x 10 streams: {ok} served, {refused} refused by the pool, {other} other; bill ${bill}; overshoot ${overshoot}"
    );
    assert_eq!(other, 0, "every request was served or refused by the pool");
    assert!(bill <= cap, "the upstreams billed {bill}, past the pool's cap of {cap}");
    assert!(ok >= 8, "the pool's room was used: {ok} served");
    assert_eq!(pool_ledger(&pg), bill, "the pool's ledger equals the combined bill");
    assert_eq!(pool_spent(&pg), bill, "and so does its spend");
    for m in &machines {
        assert_eq!(m.daemon.spent(&format!("agent{}", machines.iter().position(|x| std::ptr::eq(x, m)).unwrap())), m.fake.bill());
    }
}

/// Steady state with a pool far from its cap: no round trip per request (p50 beside a plain
/// grant on the same daemon, in the same run), and the pool's transactions per 1,000 requests.
#[test]
fn a_pool_far_from_its_cap_costs_no_round_trip_per_request() {
    let Some(pg) = Postgres::start() else { return };
    let machines = machines(&pg, 2, "1000", "30");
    let plain = machines[0].daemon.grant("plain", "100", &["--provider", "openai"]);
    let rt = runtime();
    let body = r#"{"model":"test-model","max_tokens":500,"messages":[{"role":"user","content":"hi"}]}"#;
    for m in &machines {
        m.fake.script(|s| s.chunk_delay = Duration::ZERO);
    }
    let url = chat_url(&machines[0].daemon);
    let time = |key: &str| {
        let started = Instant::now();
        let reply = rt.block_on(post_json(&url, key, body));
        assert_eq!(reply.status, 200, "{}", reply.text());
        started.elapsed()
    };
    // Warm both (the pool's first raise is its one round trip), then alternate request by request.
    for _ in 0..50 {
        time(&machines[0].key);
        time(&plain);
    }
    let (mut with_pool, mut without) = (Vec::new(), Vec::new());
    for _ in 0..400 {
        with_pool.push(time(&machines[0].key));
        without.push(time(&plain));
    }
    let pct = |times: &mut Vec<Duration>, p: usize| {
        times.sort();
        times[times.len() * p / 100]
    };
    let (pool50, plain50, pool99, plain99) =
        (pct(&mut with_pool, 50), pct(&mut without, 50), pct(&mut with_pool, 99), pct(&mut without, 99));
    eprintln!(
        "per request, alternating: grant on a pool p50 {pool50:?} p99 {pool99:?}; plain grant p50 {plain50:?} p99 {plain99:?}; added at p50 {:?}",
        pool50.saturating_sub(plain50)
    );

    // Transactions per 1,000 requests: 2 daemons x 10 streams of streamed requests.
    let transactions =
        |ms: &[Machine]| -> u64 { ms.iter().map(|m| m.daemon.ctl_json(&["team", "ls"])[0]["transactions"].as_u64().unwrap()).sum() };
    let before = transactions(&machines);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let all: Vec<&Machine> = machines.iter().collect();
    let started = Instant::now();
    let seen: Vec<Seen> = load(&rt, &all, 10, 60, stop).into_iter().map(|t| rt.block_on(t).unwrap()).collect();
    let elapsed = started.elapsed();
    let after = transactions(&machines);
    let served: u64 = seen.iter().map(|s| s.ok).sum();
    assert_eq!(served, 1200, "a pool far from its cap refuses nothing");
    eprintln!(
        "{served} requests in {elapsed:?}: {} pool transactions ({:.1} per 1,000 requests)",
        after - before,
        (after - before) as f64 * 1000.0 / served as f64
    );
    report_all(&machines);
    let bill: Decimal = machines.iter().map(|m| m.fake.bill()).sum::<Decimal>() - machines[0].daemon.spent("plain");
    assert_eq!(pool_ledger(&pg), bill);
}

/// This machine's member id in the pool, from `team ls`.
fn member_id(m: &Machine) -> String {
    let listed = m.daemon.ctl_json(&["team", "ls"]);
    let me = listed[0]["members"].as_array().unwrap().iter().find(|x| x["me"] == true).cloned().unwrap();
    me["member"].as_str().unwrap().to_string()
}

/// kill -9 one member mid-load: once its lease expires the pool's spend covers everything billed
/// through it; restarted, it reconciles, and nothing is counted twice.
#[test]
fn a_member_killed_mid_load_is_charged_when_its_lease_expires_and_reconciles_on_restart() {
    let Some(pg) = Postgres::start() else { return };
    let mut machines = machines(&pg, 2, "1000", "3");
    let victim = member_id(&machines[0]);
    let rt = runtime();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let all: Vec<&Machine> = machines.iter().collect();
    let tasks = load(&rt, &all, 10, 100_000, stop.clone());
    std::thread::sleep(Duration::from_millis(700));
    machines[0].daemon.signal(libc::SIGKILL);
    let status = machines[0].daemon.wait_exit(Duration::from_secs(10));
    assert!(!status.success());
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for task in tasks {
        rt.block_on(task).unwrap();
    }
    // Requests the fake was still answering finish there (and are billed) meanwhile.
    std::thread::sleep(Duration::from_millis(300));
    let billed = machines[0].fake.bill();
    assert!(billed > Decimal::ZERO, "the victim served requests before it died");
    // The survivor's next transactions (it renews its own lease) charge the victim's.
    let held_for_victim = || {
        dec(&pg.query(&format!(
            "SELECT (SELECT coalesce(sum(cost), 0) FROM capit_ledger WHERE member = '{victim}')
                  + (SELECT coalesce(sum(amount), 0) FROM capit_credits WHERE member = '{victim}')"
        )))
    };
    wait_for("the victim's lease to be charged", Duration::from_secs(20), || {
        (pg.query(&format!("SELECT lease FROM capit_members WHERE member = '{victim}'")) == "0").then_some(())
    });
    let charged = held_for_victim();
    eprintln!("killed member: billed ${billed} through it; the pool holds ${charged} for it once its lease expired");
    assert!(charged >= billed, "the pool holds {charged} for the dead member, less than the {billed} billed through it");

    // Restarted, it reports its ledger (requests cut by the crash charged at their holds): drawn
    // from what was charged, and the rest given back.
    machines[0].daemon.relaunch();
    report_all(&machines);
    wait_for("the victim to reconcile", Duration::from_secs(20), || {
        (pg.query(&format!("SELECT count(*) FROM capit_credits WHERE member = '{victim}'")) == "0").then_some(())
    });
    let local = machines[0].daemon.spent("agent0");
    let copies = dec(&pg.query(&format!("SELECT coalesce(sum(cost), 0) FROM capit_ledger WHERE member = '{victim}'")));
    eprintln!("after its restart: local ledger ${local}, the pool's copies ${copies}, billed ${billed}");
    assert_eq!(copies, local, "the pool has the victim's ledger, each entry once");
    assert!(local >= billed, "nothing billed is missing from the ledger");
    assert_eq!(pool_spent(&pg), pool_ledger(&pg), "the pool's spend is its ledger: nothing counted twice");
    let survivor = machines[1].fake.bill();
    assert_eq!(pool_ledger(&pg), local + survivor);
}

/// Postgres stopped mid-load: nothing is served beyond the leases the members held, requests
/// past them are refused as "the team budget cannot be reached"; restarted, the pool resumes and
/// its totals are exact.
#[test]
fn with_postgres_stopped_mid_load_nothing_is_served_beyond_the_leases_and_the_totals_come_out_exact() {
    let Some(mut pg) = Postgres::start() else { return };
    let machines = machines(&pg, 2, "1000", "3");
    let rt = runtime();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let all: Vec<&Machine> = machines.iter().collect();
    let tasks = load(&rt, &all, 10, 100_000, stop.clone());
    std::thread::sleep(Duration::from_millis(800));
    pg.stop();
    let bills_at_stop: Vec<Decimal> = machines.iter().map(|m| m.fake.bill()).collect();
    let down = Instant::now();
    // The outage lasts past the leases' time: they serve what they cover, then nothing new.
    std::thread::sleep(Duration::from_secs(5));
    let covers: Vec<Decimal> = machines.iter().map(|m| dec(m.daemon.ctl_json(&["team", "ls"])[0]["cover"].as_str().unwrap())).collect();
    let during: Vec<Decimal> = machines.iter().zip(&bills_at_stop).map(|(m, at)| m.fake.bill() - at).collect();
    let refusals = machines[0].daemon.ctl_json(&["ls"])[0]["refused"].clone();
    eprintln!("Postgres down {:?}: billed meanwhile {during:?}, against the covers held {covers:?}; refusals {refusals}", down.elapsed());
    for (i, (spent, cover)) in during.iter().zip(&covers).enumerate() {
        assert!(spent <= cover, "member {i} had {spent} billed while the database was down, past its cover of {cover}");
    }
    assert!(refusals["team_unreachable"].as_u64().unwrap_or(0) > 0, "requests past the leases are refused: {refusals}");
    let before_restart: Vec<Decimal> = machines.iter().map(|m| m.fake.bill()).collect();
    pg.restart();
    // The pool resumes: requests are served again.
    wait_for("requests to be served again", Duration::from_secs(30), || {
        machines.iter().zip(&before_restart).all(|(m, before)| m.fake.bill() > *before).then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for task in tasks {
        rt.block_on(task).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    report_all(&machines);
    let bill: Decimal = machines.iter().map(|m| m.fake.bill()).sum();
    wait_for("the charged leases to be reconciled", Duration::from_secs(20), || {
        report_all(&machines);
        (pool_spent(&pg) == pool_ledger(&pg)).then_some(())
    });
    assert_eq!(pool_ledger(&pg), bill, "the pool's ledger is the upstreams' bill, exactly");
    assert_eq!(pool_spent(&pg), bill, "and so is its spend");
}
