//! What a crash left behind is charged before the daemon serves anything.

use super::*;

/// Charges every hold a crash left in the store at its amount, as `interrupted` ledger entries,
/// in one transaction, before the daemon loads spend and serves anything.
pub(super) fn charge_interrupted(
    store: &Store,
    grants: &[Grant],
    holds: Vec<(u64, StoredReservation)>,
    now: i64,
) -> Result<(), StateError> {
    if holds.is_empty() {
        return Ok(());
    }
    let mut ops = Vec::with_capacity(holds.len());
    for (id, hold) in holds {
        let Some(grant) = grants.iter().find(|g| g.id == hold.grant) else {
            ops.push(WriteOp::DeleteReservation { id });
            continue;
        };
        let entry = LedgerEntry {
            grant: hold.grant,
            at_ms: now.saturating_mul(1000),
            model: hold.model,
            api: hold.api,
            usage: crate::usage::Usage::default(),
            cost: hold.amount,
            status: crate::ledger::EntryStatus::Interrupted,
            http_status: 0,
            error: Some("capitd stopped while the request was in flight; charged at its reservation".into()),
        };
        ops.push(WriteOp::AppendEntry { entry, window_start: local_window(grant.period, now).start, reservation: Some(id) });
    }
    tracing::warn!(requests = ops.len(), "charging requests that were in flight when capitd last stopped at their reservations");
    store.apply_now(&ops)?;
    Ok(())
}
