//! Nothing lost or counted twice on a crash: every settled request is in the ledger, and a
//! request in flight when capitd is killed is charged at its reservation on the next start.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::metering::{chat_url, setup};
use crate::support::http::{self, client};
use crate::support::{dec, runtime};

#[test]
fn kill_9_at_random_moments_never_loses_or_double_counts() {
    let (mut daemon, fake) = setup();
    let key = daemon.grant("load", "1000", &["--provider", "openai", "--period", "total"]);
    let body = r#"{"model":"test-model","stream":true,"max_tokens":500,"messages":[{"role":"user","content":"hi"}]}"#;
    let bound = (dec(&(body.len() as u64 + 1024).to_string()) * dec("1.10") + dec("2200")) / dec("1000000");
    fake.script(|s| {
        s.prompt_tokens = 1000;
        s.completion_tokens = 500;
        // Like a real upstream's time to first token: the hold commits while it waits.
        s.head_delay = Duration::from_millis(30);
        s.chunk_delay = Duration::from_millis(3);
    });
    const CLIENTS: usize = 6;
    let rt = runtime();
    let mut seed = 0x9E37_79B9u64;
    let mut excess_before = dec("0");
    let mut leases_before = dec("0");
    for round in 0..6 {
        let stop = Arc::new(AtomicBool::new(false));
        let completed = Arc::new(AtomicUsize::new(0));
        let url = chat_url(&daemon);
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (url, key, stop, completed) = (url.clone(), key.clone(), stop.clone(), completed.clone());
                rt.spawn(async move {
                    let client = client();
                    let auth = format!("Bearer {key}");
                    while !stop.load(Ordering::SeqCst) {
                        let request = http::request(::http::Method::POST, &url, &[("authorization", &auth)], body);
                        let Ok(response) = client.request(request).await else { break };
                        if http_body_util::BodyExt::collect(response.into_body()).await.is_ok() {
                            completed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(60 + seed % 400));
        stop.store(true, Ordering::SeqCst);
        daemon.crash_and_restart();
        for task in tasks {
            rt.block_on(task).unwrap();
        }
        // Requests the fake was still answering finish there (and are billed) meanwhile.
        std::thread::sleep(Duration::from_millis(150));
        let usage = daemon.ctl_json(&["usage", "load"]);
        let ledger = dec(usage["spent"].as_str().unwrap());
        let bill = fake.bill();
        assert!(ledger >= bill, "round {round}: ledger {ledger} < upstream bill {bill}: a billed request was lost");
        // The crash charged the grant's committed lease, once; what it added beyond the bill is
        // at most that lease, and the lease is at most twice the peak of what it covers: each
        // client's request in flight, and its last settlement while that is not yet durable.
        let leases = usage["by_model"].as_array().unwrap().iter().find(|r| r["model"] == "requests in flight");
        let leases = leases.map_or(dec("0"), |r| dec(r["spent"].as_str().unwrap()));
        let lease = leases - leases_before;
        leases_before = leases;
        let excess = ledger - bill;
        let over = excess - excess_before;
        assert!(over <= lease, "round {round}: the ledger grew {over} past the bill, more than the lease {lease} it charged");
        assert!(
            lease <= bound * dec(&(4 * CLIENTS).to_string()),
            "round {round}: a lease of {lease} is more than twice {} holds of {bound}",
            2 * CLIENTS
        );
        excess_before = excess;
        assert!(completed.load(Ordering::SeqCst) > 0 || round > 0, "the load ran");
        eprintln!("round {round}: ledger {ledger}, bill {bill}; this crash charged a lease of {lease} and over-charged {over}");
    }
    // A clean stop after the last round leaves no holds behind: nothing more is charged.
    let before = daemon.spent("load");
    daemon.restart();
    assert_eq!(daemon.spent("load"), before);
}
