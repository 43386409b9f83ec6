//! Grants that draw on a team pool: their requests take a hold under the pool's lease book
//! ([`crate::team::pool_lease`]) as well as under their own grant, and go only once both
//! committed leases cover them. The pools' books are registered here by the team service.

use super::*;
use crate::team::pool_lease::{PoolLease, PoolRefusal};

impl From<PoolRefusal> for Refusal {
    fn from(refusal: PoolRefusal) -> Refusal {
        let unreachable = matches!(refusal, PoolRefusal::Unreachable { .. });
        Refusal::Team { message: refusal.to_string(), unreachable }
    }
}

impl State {
    /// Registers (or, with `None`, forgets) the lease book of a pool this daemon has joined.
    pub fn set_pool_lease(&self, pool: &str, lease: Option<Arc<PoolLease>>) {
        let mut pools = self.pools.write().unwrap_or_else(|p| p.into_inner());
        match lease {
            Some(lease) => pools.insert(pool.to_string(), lease),
            None => pools.remove(pool),
        };
    }

    pub(super) fn pool_lease(&self, pool: &str) -> Result<Arc<PoolLease>, Refusal> {
        let pools = self.pools.read().unwrap_or_else(|p| p.into_inner());
        pools.get(pool).cloned().ok_or_else(|| Refusal::Team {
            message: format!("capit: the team budget cannot be reached (this capitd is not running as a member of pool \"{pool}\")"),
            unreachable: true,
        })
    }

    /// The room a grant's request may be fitted into, narrowed to what its pool has left when
    /// the pool is the tighter of the two (and its figure is fresh). Returns the pool's lease
    /// and whether the pool binds.
    pub(super) fn pool_room(&self, grant: &Grant, room: &mut Room) -> Result<Option<(Arc<PoolLease>, bool)>, Refusal> {
        let Some(pool) = grant.team.as_deref() else { return Ok(None) };
        let lease = self.pool_lease(pool)?;
        let grant_free = room.free_now();
        let binds = match lease.free_if_fresh() {
            Some(pool_free) if pool_free < grant_free => {
                room.cap = room.spent.saturating_add(room.reserved).saturating_add(pool_free);
                true
            }
            _ => false,
        };
        Ok(Some((lease, binds)))
    }

    /// An admission's outcome once the pool's committed lease covers the request's hold (a
    /// pool's raise is one short transaction; until it lands nothing is sent).
    pub(super) async fn with_pool(&self, admitted: Result<(Reservation, Hold), Refusal>) -> Result<(Reservation, Hold), Refusal> {
        let (reservation, hold) = admitted?;
        if let Some(pool) = &reservation.pool {
            pool.pool().wait(pool).await.map_err(Refusal::from)?;
        }
        Ok((reservation, hold))
    }
}
