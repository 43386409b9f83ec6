//! What a crash left behind is charged before the daemon serves anything.
//!
//! A grant's admission lease covered every request whose body may have gone upstream, and
//! every settlement not yet in the ledger; so charging the whole lease, as one `interrupted`
//! entry, never charges less than was billed, and over-charges by at most the lease. Holds that
//! an older capitd kept one per request are charged the same way.

use super::*;

/// Charges every lease and every per-request hold a crash left in the store at its amount, as
/// `interrupted` ledger entries, and clears them, in one transaction, before the daemon loads
/// spend and serves anything.
pub(super) fn charge_interrupted(
    store: &Store,
    grants: &[Grant],
    holds: Vec<(u64, StoredReservation)>,
    leases: Vec<(GrantId, Decimal)>,
    now: i64,
) -> Result<(), StateError> {
    if holds.is_empty() && leases.is_empty() {
        return Ok(());
    }
    let window_of = |id: GrantId| grants.iter().find(|g| g.id == id).map(|g| local_window(g.period, now).start);
    let interrupted = |grant: GrantId, model: String, api: String, cost: Decimal, why: &str| LedgerEntry {
        grant,
        at_ms: now.saturating_mul(1000),
        model,
        api,
        usage: crate::usage::Usage::default(),
        cost,
        status: crate::ledger::EntryStatus::Interrupted,
        http_status: 0,
        error: Some(why.into()),
    };
    let mut ops = Vec::with_capacity(holds.len() + 2 * leases.len());
    let mut charged = Decimal::ZERO;
    for (grant, amount) in leases {
        if let Some(window_start) = window_of(grant).filter(|_| !amount.is_zero()) {
            let why = "capitd stopped with requests in flight; charged at the lease that covered them";
            let entry = interrupted(grant, "requests in flight".into(), "lease".into(), amount, why);
            ops.push(WriteOp::AppendEntry { entry, window_start, reservation: None });
            charged = charged.saturating_add(amount);
        }
        ops.push(WriteOp::PutLease { grant, amount: Decimal::ZERO });
    }
    for (id, hold) in holds {
        if let Some(window_start) = window_of(hold.grant) {
            let why = "capitd stopped while the request was in flight; charged at its reservation";
            let entry = interrupted(hold.grant, hold.model, hold.api, hold.amount, why);
            ops.push(WriteOp::AppendEntry { entry, window_start, reservation: Some(id) });
            charged = charged.saturating_add(hold.amount);
        } else {
            ops.push(WriteOp::DeleteReservation { id });
        }
    }
    tracing::warn!(charged = %charged, "charging what requests in flight when capitd last stopped were held for");
    store.apply_now(&ops)?;
    Ok(())
}
