//! Settled requests per second: admission and settlement through the real state and store
//! (group commit, fsync), from 1, 16 and 256 concurrent requesters for 3 s each, first each
//! waiting for its own commit, then settling as the proxy does (nobody waits for the commit:
//! the lease covers a crash) and counting what is durable at the end. Printed, never asserted.
//!
//! Run: cargo bench --bench ledger

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use capit::admission::Demand;
use capit::grants::{GrantId, Limits, Period};
use capit::ledger::{EntryStatus, LedgerEntry};
use capit::state::{GrantSpec, State};
use capit::store::{Store, WriteOp};
use capit::usage::Usage;
use rust_decimal::Decimal;

fn demand() -> Demand {
    Demand { input_cost: Decimal::new(5, 3), input_tokens: 2000, output_tokens: 0, output_rate: Decimal::ZERO, fit_at_least: None }
}

fn entry(state: &State, grant: GrantId) -> LedgerEntry {
    LedgerEntry {
        grant,
        at_ms: state.clock().now_millis(),
        model: "gpt-5-mini".into(),
        api: "chat.completions".into(),
        usage: Usage { input_tokens: 1200, cached_input_tokens: 1024, output_tokens: 300, ..Usage::default() },
        cost: Decimal::new(6696, 7),
        status: EntryStatus::Metered,
        http_status: 200,
        error: None,
    }
}

fn main() {
    let dir = std::env::temp_dir().join(format!("capit-ledger-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (store, snapshot) = Store::open(&dir.join("capit.redb")).unwrap();
    let state = Arc::new(State::new(store, snapshot, dir.clone()).unwrap());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let spec = GrantSpec {
            name: "bench".into(),
            provider: "openai".into(),
            cap: Decimal::from(1_000_000),
            period: Period::Month,
            expires_at: None,
            models: vec![],
            note: String::new(),
            created_by: "bench".into(),
            limits: Limits::default(),
            apis: vec![],
            provider_key: None,
            direct: false,
            alerts: None,
            team: None,
        };
        state.create_grant(spec).await.unwrap();
        let slot = state.find_grant("bench").unwrap();
        for wait_for_commit in [true, false] {
            if wait_for_commit {
                println!("settled requests per second (admit, settle, wait for the durable commit):");
            } else {
                println!("settled requests per second as the proxy settles (no wait; all durable at the end):");
            }
            for requesters in [1usize, 16, 256] {
                let done = Arc::new(AtomicU64::new(0));
                let started = Instant::now();
                let tasks: Vec<_> = (0..requesters)
                    .map(|_| {
                        let (state, slot, done) = (state.clone(), slot.clone(), done.clone());
                        tokio::spawn(async move {
                            while started.elapsed() < Duration::from_secs(3) {
                                let (reservation, _) = state.admit_now(&slot, "gpt-5-mini", &demand()).unwrap();
                                let committed = state.settle(reservation, entry(&state, slot.id));
                                if wait_for_commit {
                                    committed.await.unwrap().unwrap();
                                } else {
                                    tokio::task::yield_now().await;
                                }
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
                state.store().write(WriteOp::Barrier).await.unwrap();
                let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
                println!("  {requesters:>4} concurrent: {rate:>9.0} settled/s");
            }
        }
    });
    state.store().close();
    let _ = std::fs::remove_dir_all(dir);
}
