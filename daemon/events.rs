//! The live event hub and spend alerts. Every settlement and every refusal passes through here
//! (from `State::settle` and `State::note_refusal`): a settlement is logged as one line at info,
//! checked against its grant's alert thresholds, and, only while someone watches, published to
//! the watchers with the refusals and alerts.
//!
//! Invariants:
//! - Nobody watching costs the request path one relaxed atomic load: no event is built.
//! - A watcher never slows the proxy. Events go into a fixed ring (`tokio::sync::broadcast`) that
//!   a publisher never waits on; a watcher that falls behind loses the oldest events and is told
//!   how many it lost.
//! - Events are numbered in the order they are published, under one short lock, so a watcher can
//!   check their order and count any gap.
//! - Each alert threshold fires at most once per grant and spend window. At start, thresholds the
//!   spend has already passed count as fired, so a restart does not repeat them.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use tokio::sync::broadcast;

use crate::grants::{GrantId, Period, money};
use crate::ledger::{EntryStatus, LedgerEntry};
use crate::usage::Usage;

/// How many events a watcher may fall behind before it loses the oldest.
const RING: usize = 4096;

/// How long an `--on-alert` command may run before it is killed.
const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// A grant's spend as it stands (read under its lock), for the event line and the alerts.
#[derive(Clone, Debug)]
pub struct Standing {
    pub id: GrantId,
    pub name: String,
    pub provider: String,
    pub cap: Decimal,
    /// Spend in the current window.
    pub spent: Decimal,
    /// Held by requests in flight.
    pub reserved: Decimal,
    pub period: Period,
    pub window_start: i64,
    /// Alert thresholds in percent of the cap, ascending.
    pub alerts: Vec<u32>,
}

/// One published event; `seq` counts every event published since the daemon started watching.
#[derive(Clone, Debug)]
pub struct Event {
    pub seq: u64,
    pub at_ms: i64,
    pub kind: EventKind,
}

#[derive(Clone, Debug)]
pub enum EventKind {
    Settled(Box<Settled>),
    Refused(Refused),
    Alert(Alert),
}

/// A metered request, with its grant's standing after it.
#[derive(Clone, Debug)]
pub struct Settled {
    pub grant: String,
    pub provider: String,
    pub model: String,
    pub api: String,
    pub usage: Usage,
    pub cost: Decimal,
    pub status: EntryStatus,
    pub http_status: u16,
    /// From admission to settlement.
    pub latency_ms: u64,
    pub spent: Decimal,
    pub cap: Decimal,
    pub reserved: Decimal,
    pub period: Period,
}

/// A request capit refused (or failed) after its grant was known.
#[derive(Clone, Debug)]
pub struct Refused {
    pub grant: String,
    pub model: Option<String>,
    pub reason: &'static str,
    pub message: String,
}

/// A grant's spend reached one of its thresholds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub grant: String,
    pub provider: String,
    pub percent: u32,
    pub spent: Decimal,
    pub cap: Decimal,
    pub period: Period,
}

/// What is done when an alert fires, besides logging it and showing it to watchers.
#[derive(Clone, Debug, Default)]
pub struct AlertActions {
    /// `capitd --on-alert CMD`: run with `sh -c`, the alert in its environment.
    pub hook: Option<String>,
    /// The desktop notification (`--notify-command`, shared with access requests).
    pub notifier: crate::access::Notifier,
}

/// The hub. Owned by `State`; cheap to call when nobody watches.
pub struct Events {
    watchers: Arc<AtomicUsize>,
    hub: Mutex<Hub>,
    /// Thresholds fired per grant, in its current window.
    fired: Mutex<HashMap<GrantId, Fired>>,
    /// The alert worker: hooks and notifications run there, one after another, off the request path.
    alerts: Mutex<Option<mpsc::Sender<Alert>>>,
}

struct Hub {
    seq: u64,
    /// `None` once closed (the daemon is stopping): watch streams end.
    sender: Option<broadcast::Sender<Arc<Event>>>,
}

struct Fired {
    window_start: i64,
    thresholds: Vec<u32>,
}

/// A watcher's place in the ring. Dropping it stops publication once nobody else watches.
pub struct Subscription {
    pub receiver: broadcast::Receiver<Arc<Event>>,
    watchers: Arc<AtomicUsize>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for Events {
    fn default() -> Events {
        Events::new()
    }
}

impl Events {
    pub fn new() -> Events {
        let (sender, _) = broadcast::channel(RING);
        Events {
            watchers: Arc::new(AtomicUsize::new(0)),
            hub: Mutex::new(Hub { seq: 0, sender: Some(sender) }),
            fired: Mutex::new(HashMap::new()),
            alerts: Mutex::new(None),
        }
    }

    /// Starts the worker that runs the `--on-alert` hook and desktop notifications.
    pub fn set_alert_actions(&self, actions: AlertActions) {
        if actions.hook.is_none() && actions.notifier == crate::access::Notifier::None {
            return;
        }
        let (tx, rx) = mpsc::channel::<Alert>();
        let spawned = std::thread::Builder::new().name("capit-alerts".into()).spawn(move || {
            for alert in rx {
                run_actions(&actions, &alert);
            }
        });
        match spawned {
            Ok(_) => *lock(&self.alerts) = Some(tx),
            Err(e) => tracing::error!(error = %e, "cannot start the alert worker; alerts are only logged"),
        }
    }

    /// Subscribes a watcher; `None` once the daemon is stopping.
    pub fn subscribe(&self) -> Option<Subscription> {
        let hub = lock(&self.hub);
        let receiver = hub.sender.as_ref()?.subscribe();
        self.watchers.fetch_add(1, Ordering::Relaxed);
        Some(Subscription { receiver, watchers: self.watchers.clone() })
    }

    /// How many watchers are subscribed now.
    pub fn watchers(&self) -> usize {
        self.watchers.load(Ordering::Relaxed)
    }

    /// Ends every watch stream (after the events already published): the daemon is stopping.
    pub fn close(&self) {
        lock(&self.hub).sender = None;
    }

    fn publish(&self, at_ms: i64, make: impl FnOnce() -> EventKind) {
        if self.watchers.load(Ordering::Relaxed) == 0 {
            return;
        }
        let kind = make();
        let mut hub = lock(&self.hub);
        hub.seq += 1;
        let event = Arc::new(Event { seq: hub.seq, at_ms, kind });
        if let Some(sender) = &hub.sender {
            // Never blocks: a full ring overwrites its oldest event. No receiver left is fine too.
            let _ = sender.send(event);
        }
    }

    /// A settled request: its log line, its event, and any alert it sets off.
    pub fn settled(&self, standing: Standing, entry: &LedgerEntry, latency: Duration) {
        let latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        tracing::info!(
            grant = %standing.name,
            model = %entry.model,
            input_tokens = entry.usage.input_tokens,
            output_tokens = entry.usage.output_tokens,
            cost = %entry.cost,
            status = entry.status.as_str(),
            http_status = entry.http_status,
            latency_ms,
            "settled"
        );
        self.publish(entry.at_ms, || {
            EventKind::Settled(Box::new(Settled {
                grant: standing.name.clone(),
                provider: standing.provider.clone(),
                model: entry.model.clone(),
                api: entry.api.clone(),
                usage: entry.usage.clone(),
                cost: entry.cost,
                status: entry.status,
                http_status: entry.http_status,
                latency_ms,
                spent: standing.spent,
                cap: standing.cap,
                reserved: standing.reserved,
                period: standing.period,
            }))
        });
        self.spend_changed(&standing, entry.at_ms);
    }

    /// Fires the thresholds a grant now stands past: after a settlement, or after its cap or its
    /// thresholds changed (a cap lowered below the spend crosses them without a request).
    pub fn spend_changed(&self, standing: &Standing, at_ms: i64) {
        for alert in self.crossed(standing) {
            self.fire(alert, at_ms);
        }
    }

    /// A refused request (already logged by the caller).
    pub fn refused(&self, grant: String, model: Option<&str>, reason: &'static str, message: &str, at_ms: i64) {
        self.publish(at_ms, || {
            EventKind::Refused(Refused { grant, model: model.map(str::to_string), reason, message: message.to_string() })
        });
    }

    /// Marks the thresholds a grant's spend has already passed as fired, at start.
    pub fn seed(&self, standing: &Standing) {
        let Some(percent) = percent_of_cap(standing) else { return };
        let passed = standing.alerts.iter().copied().filter(|t| Decimal::from(*t) <= percent).collect();
        lock(&self.fired).insert(standing.id, Fired { window_start: standing.window_start, thresholds: passed });
    }

    /// The thresholds this standing reaches that have not fired yet in its window; marks them fired.
    fn crossed(&self, standing: &Standing) -> Vec<Alert> {
        let Some(&lowest) = standing.alerts.first() else { return Vec::new() };
        let Some(percent) = percent_of_cap(standing) else { return Vec::new() };
        if percent < Decimal::from(lowest) {
            return Vec::new();
        }
        let mut fired = lock(&self.fired);
        let grant = fired.entry(standing.id).or_insert_with(|| Fired { window_start: standing.window_start, thresholds: Vec::new() });
        if grant.window_start != standing.window_start {
            *grant = Fired { window_start: standing.window_start, thresholds: Vec::new() };
        }
        let mut out = Vec::new();
        for &threshold in &standing.alerts {
            if Decimal::from(threshold) <= percent && !grant.thresholds.contains(&threshold) {
                grant.thresholds.push(threshold);
                out.push(Alert {
                    grant: standing.name.clone(),
                    provider: standing.provider.clone(),
                    percent: threshold,
                    spent: standing.spent,
                    cap: standing.cap,
                    period: standing.period,
                });
            }
        }
        out
    }

    fn fire(&self, alert: Alert, at_ms: i64) {
        tracing::info!(
            grant = %alert.grant,
            percent = alert.percent,
            spent = %alert.spent,
            cap = %alert.cap,
            "alert: grant {:?} has spent {}% of its cap (${} of ${} {})",
            alert.grant,
            alert.percent,
            money(alert.spent),
            money(alert.cap),
            period_phrase(alert.period)
        );
        self.publish(at_ms, || EventKind::Alert(alert.clone()));
        if let Some(worker) = lock(&self.alerts).as_ref() {
            let _ = worker.send(alert);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Spend as a percentage of the cap; `None` for a cap of zero (which cannot be made).
fn percent_of_cap(standing: &Standing) -> Option<Decimal> {
    if standing.cap <= Decimal::ZERO {
        return None;
    }
    standing.spent.checked_mul(Decimal::ONE_HUNDRED)?.checked_div(standing.cap)
}

/// "this month", "today", ... for alert lines.
pub fn period_phrase(period: Period) -> &'static str {
    match period {
        Period::Day => "today",
        Period::Week => "this week",
        Period::Month => "this month",
        Period::Total => "in total",
    }
}

/// The environment an `--on-alert` command gets.
pub fn hook_environment(alert: &Alert) -> Vec<(&'static str, String)> {
    vec![
        ("CAPIT_GRANT", alert.grant.clone()),
        ("CAPIT_PROVIDER", alert.provider.clone()),
        ("CAPIT_PERCENT", alert.percent.to_string()),
        ("CAPIT_SPENT", money(alert.spent)),
        ("CAPIT_CAP", money(alert.cap)),
        ("CAPIT_PERIOD", alert.period.as_str().to_string()),
    ]
}

fn run_actions(actions: &AlertActions, alert: &Alert) {
    if let Some(hook) = &actions.hook {
        let mut command = Command::new("/bin/sh");
        command.arg("-c").arg(hook).envs(hook_environment(alert)).env_remove("NOTIFY_SOCKET").stdin(Stdio::null());
        run_bounded(command, "the --on-alert command", false);
    }
    let message = format!(
        "grant \"{}\" has spent {}% of its cap: ${} of ${} {} ({})",
        alert.grant,
        alert.percent,
        money(alert.spent),
        money(alert.cap),
        period_phrase(alert.period),
        alert.provider
    );
    if let Some(mut command) = crate::notify::command(&actions.notifier, &message) {
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // Where there is no desktop (a container, a server) this fails every time: quietly.
        run_bounded(command, "the desktop notification", true);
    }
}

/// Runs a command to its end, killing it after [`HOOK_TIMEOUT`]; failures are logged (at debug
/// when `quiet`), never fatal.
fn run_bounded(mut command: Command, what: &str, quiet: bool) {
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) if quiet => {
            tracing::debug!(error = %e, "{what} could not be started");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "{what} could not be started");
            return;
        }
    };
    let deadline = Instant::now() + HOOK_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return,
            Ok(Some(status)) => {
                if quiet {
                    tracing::debug!(%status, "{what} failed");
                } else {
                    tracing::warn!(%status, "{what} failed");
                }
                return;
            }
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!("{what} ran longer than {} s and was stopped", HOOK_TIMEOUT.as_secs());
                return;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                tracing::warn!(error = %e, "waiting for {what} failed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing(spent: &str, window_start: i64) -> Standing {
        Standing {
            id: GrantId(7),
            name: "claude".into(),
            provider: "anthropic".into(),
            cap: Decimal::from(10),
            spent: spent.parse().unwrap(),
            reserved: Decimal::ZERO,
            period: Period::Day,
            window_start,
            alerts: vec![50, 80, 100],
        }
    }

    #[track_caller]
    fn check(events: &Events, spent: &str, window_start: i64, expected: &[u32]) {
        let fired: Vec<u32> = events.crossed(&standing(spent, window_start)).iter().map(|a| a.percent).collect();
        assert_eq!(fired, expected, "at ${spent}");
    }

    #[test]
    fn each_threshold_fires_once_per_window() {
        let events = Events::new();
        check(&events, "4.99", 0, &[]);
        check(&events, "5", 0, &[50]);
        check(&events, "6", 0, &[]);
        check(&events, "10.5", 0, &[80, 100]);
        check(&events, "10.6", 0, &[]);
        // The next day starts from nothing.
        check(&events, "0.1", 86_400, &[]);
        check(&events, "9", 86_400, &[50, 80]);
    }

    #[test]
    fn a_restart_does_not_repeat_what_the_spend_had_already_passed() {
        let events = Events::new();
        events.seed(&standing("8.5", 0));
        check(&events, "9", 0, &[]);
        check(&events, "10", 0, &[100]);
    }

    #[test]
    fn nothing_is_built_or_numbered_while_nobody_watches() {
        let events = Events::new();
        let mut built = false;
        events.publish(1, || {
            built = true;
            EventKind::Refused(Refused { grant: "g".into(), model: None, reason: "rpm", message: String::new() })
        });
        assert!(!built);
        let mut sub = events.subscribe().unwrap();
        events.refused("g".into(), Some("m"), "rpm", "slow down", 2);
        let event = sub.receiver.try_recv().unwrap();
        assert_eq!((event.seq, event.at_ms), (1, 2));
        drop(sub);
        assert_eq!(events.watchers.load(Ordering::Relaxed), 0);
        events.close();
        assert!(events.subscribe().is_none());
    }

    #[test]
    fn a_slow_watcher_loses_the_oldest_and_learns_how_many() {
        let events = Events::new();
        let mut sub = events.subscribe().unwrap();
        for i in 0..(RING as i64 + 10) {
            events.refused("g".into(), None, "rpm", "", i);
        }
        match sub.receiver.try_recv() {
            Err(broadcast::error::TryRecvError::Lagged(n)) => assert_eq!(n, 10),
            other => panic!("expected a lag, got {other:?}"),
        }
        assert_eq!(sub.receiver.try_recv().unwrap().seq, 11);
    }

    #[test]
    fn the_hook_gets_the_alert_in_its_environment() {
        let dir = std::env::temp_dir().join(format!("capit-hook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("env");
        let alert = Alert {
            grant: "claude".into(),
            provider: "anthropic".into(),
            percent: 80,
            spent: "4.0125".parse().unwrap(),
            cap: "5".parse().unwrap(),
            period: Period::Month,
        };
        let hook =
            format!("echo \"$CAPIT_GRANT $CAPIT_PROVIDER $CAPIT_PERCENT $CAPIT_SPENT $CAPIT_CAP $CAPIT_PERIOD\" > {}", out.display());
        run_actions(&AlertActions { hook: Some(hook), notifier: crate::access::Notifier::None }, &alert);
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(text, "claude anthropic 80 4.0125 5.00 month\n");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The whole path on the daemon's own clock: settlements through `State`, a day passing.
    #[test]
    fn a_threshold_fires_again_in_the_next_period_and_not_before() {
        use crate::admission::Demand;
        use crate::state::{Clock, GrantSpec, State};
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = std::env::temp_dir().join(format!("capit-events-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (store, snapshot) = crate::store::Store::open(&dir.join("capit.redb")).unwrap();
        let clock = Clock::default();
        let state = State::with_clock(store, snapshot, dir.clone(), clock.clone()).unwrap();
        let spec = GrantSpec {
            name: "g".into(),
            provider: "openai".into(),
            cap: Decimal::ONE,
            period: Period::Day,
            expires_at: None,
            models: vec![],
            note: String::new(),
            created_by: "t".into(),
            limits: crate::grants::Limits::default(),
            apis: vec![],
            provider_key: None,
            direct: false,
            alerts: Some(vec![50]),
            team: None,
        };
        runtime.block_on(state.create_grant(spec)).unwrap();
        let slot = state.find_grant("g").unwrap();
        let mut watcher = state.events().subscribe().unwrap();
        let mut spend = |cost: &str| {
            let cost: Decimal = cost.parse().unwrap();
            let demand = Demand { input_cost: cost, input_tokens: 0, output_tokens: 0, output_rate: Decimal::ZERO, fit_at_least: None };
            let (reservation, _) = state.admit_now(&slot, "m", &demand).unwrap();
            let entry = LedgerEntry {
                grant: slot.id,
                at_ms: clock.now_millis(),
                model: "m".into(),
                api: "chat.completions".into(),
                usage: Usage::default(),
                cost,
                status: EntryStatus::Metered,
                http_status: 200,
                error: None,
            };
            drop(state.settle(reservation, entry));
            let mut alerts = Vec::new();
            while let Ok(event) = watcher.receiver.try_recv() {
                if let EventKind::Alert(alert) = &event.kind {
                    alerts.push(alert.spent.to_string());
                }
            }
            alerts
        };
        assert_eq!(spend("0.30"), Vec::<String>::new());
        assert_eq!(spend("0.25"), ["0.55"]);
        assert_eq!(spend("0.10"), Vec::<String>::new());
        let midnight = state.grant_view(&slot).window.end.unwrap();
        clock.advance(Duration::from_secs((midnight - clock.now_seconds()) as u64));
        assert_eq!(spend("0.45"), Vec::<String>::new(), "a new day starts from nothing");
        assert_eq!(spend("0.05"), ["0.50"]);
        assert_eq!(spend("0.40"), Vec::<String>::new());
        state.store().close();
        let _ = std::fs::remove_dir_all(dir);
    }
}
