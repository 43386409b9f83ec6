//! The money of one member's transaction on a pool, decided in memory with checked arithmetic
//! (the database layer loads these figures under the pool's row lock and writes back what
//! changed). Pure: no IO, and it cannot panic on input.
//!
//! Terms: a member's **lease** is room set aside for it (holds in flight, spend not reported
//! yet); a **credit** is a lease that expired and was charged as spend: it stays in the spend of
//! the window it was charged in, and the member's later reports draw on it first, so nothing is
//! counted twice. A member's **cover** is its lease plus its credits: what the pool has set
//! aside for what this member may owe and has not reported. Reports lower the cover by what
//! they record; a raise needs room; a lowering always succeeds (from a credit it is a refund).
//!
//! Invariant, for every window `w` the pool is checked in: `spent[w] + sum(leases) <= cap`
//! after any raise (a report or a lowering can only make the left side smaller). With each
//! member's obligations within its cover, the upstreams' bill stays within the cap.

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use super::TeamError;
use crate::lease::LeaseError;

/// What one transaction of one member works on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Books {
    pub cap: Decimal,
    /// The current window's start, by the member's clock, in the pool's time zone.
    pub window: i64,
    /// The pool's spend per window, for every window this transaction reads or changes.
    pub spent: BTreeMap<i64, Decimal>,
    /// The live leases of every other member (after expired ones were charged).
    pub others_leases: Decimal,
    /// This member's lease.
    pub lease: Decimal,
    /// This member's credits by the window they were charged in.
    pub credits: BTreeMap<i64, Decimal>,
}

fn add(a: Decimal, b: Decimal) -> Result<Decimal, TeamError> {
    a.checked_add(b).ok_or(TeamError::Overflow)
}

fn sub(a: Decimal, b: Decimal) -> Result<Decimal, TeamError> {
    a.checked_sub(b).ok_or(TeamError::Overflow)
}

/// An expired lease charged as spend in `window`: the lease becomes a credit of the same size,
/// so the member's cover is unchanged and its requests in flight stay covered.
pub fn charge_expired(spent: &mut Decimal, credit: &mut Decimal, lease: Decimal) -> Result<(), TeamError> {
    *spent = add(*spent, lease)?;
    *credit = add(*credit, lease)?;
    Ok(())
}

impl Books {
    fn spent_mut(&mut self, window: i64) -> &mut Decimal {
        self.spent.entry(window).or_insert(Decimal::ZERO)
    }

    pub fn spent_now(&self) -> Decimal {
        self.spent.get(&self.window).copied().unwrap_or_default()
    }

    fn credit_now(&self) -> Decimal {
        self.credits.get(&self.window).copied().unwrap_or_default()
    }

    /// What the pool has set aside for this member.
    pub fn cover(&self) -> Result<Decimal, TeamError> {
        self.credits.values().try_fold(self.lease, |sum, c| add(sum, *c))
    }

    /// What this member could still raise its cover by, now.
    fn headroom(&self) -> Decimal {
        let used = self.spent_now().checked_add(self.others_leases).and_then(|u| u.checked_add(self.lease));
        used.and_then(|u| self.cap.checked_sub(u)).map_or(Decimal::ZERO, |left| left.max(Decimal::ZERO))
    }

    /// The most this member's cover could be now: what it has and the room left.
    pub fn room(&self) -> Result<Decimal, TeamError> {
        add(self.cover()?, self.headroom())
    }

    /// Credits charged in an earlier window become lease again: the earlier window gets its
    /// charge back, and the room is held in every window from now on, as a lease is (a credit
    /// counts only in the window it was charged in, and the requests it covers may settle
    /// later).
    pub fn carry_credits(&mut self) -> Result<(), TeamError> {
        let old: Vec<(i64, Decimal)> = self.credits.iter().filter(|(w, _)| **w != self.window).map(|(w, c)| (*w, *c)).collect();
        for (window, credit) in old {
            let spent = self.spent_mut(window);
            *spent = sub(*spent, credit)?.max(Decimal::ZERO);
            self.lease = add(self.lease, credit)?;
            self.credits.remove(&window);
        }
        Ok(())
    }

    /// Records reported spend: `cost` settled in `window`. It draws on the credit first (which
    /// is already in the current window's spend), then lowers the lease. Call after
    /// [`carry_credits`](Self::carry_credits), so the only credit is the current window's.
    /// Spend beyond the cover (which the member's bookkeeping never lets happen) is recorded in
    /// full all the same, with the lease at zero.
    pub fn record(&mut self, window: i64, cost: Decimal) -> Result<(), TeamError> {
        if cost.is_sign_negative() {
            return Err(TeamError::Invalid("a ledger copy with a negative cost".into()));
        }
        let credit = self.credit_now();
        let from_credit = credit.min(cost);
        if !from_credit.is_zero() {
            self.credits.insert(self.window, sub(credit, from_credit)?);
            let now = self.spent_mut(self.window);
            *now = sub(*now, from_credit)?;
        }
        let spent = self.spent_mut(window);
        *spent = add(*spent, cost)?;
        self.lease = sub(self.lease, sub(cost, from_credit)?)?.max(Decimal::ZERO);
        self.credits.retain(|_, c| !c.is_zero());
        Ok(())
    }

    /// Makes this member's cover `target`. A raise takes room and succeeds only if the pool's
    /// spend now, every lease and the raise fit the cap; a lowering always succeeds, from the
    /// lease first, then from the credit (a refund of what was charged).
    pub fn set_cover(&mut self, target: Decimal) -> Result<(), TeamError> {
        if target.is_sign_negative() {
            return Err(TeamError::Invalid("a lease cannot be negative".into()));
        }
        let cover = self.cover()?;
        if target > cover {
            let raise = sub(target, cover)?;
            let headroom = self.headroom();
            if raise > headroom {
                return Err(LeaseError::NoRoom { available: add(cover, headroom)? }.into());
            }
            self.lease = add(self.lease, raise)?;
            return Ok(());
        }
        let mut lower = sub(cover, target)?;
        let from_lease = self.lease.min(lower);
        self.lease = sub(self.lease, from_lease)?;
        lower = sub(lower, from_lease)?;
        // Newest credit first: only the current window's remains after `carry_credits`.
        let windows: Vec<i64> = self.credits.keys().rev().copied().collect();
        for window in windows {
            if lower.is_zero() {
                break;
            }
            let credit = self.credits[&window];
            let refund = credit.min(lower);
            self.credits.insert(window, sub(credit, refund)?);
            let spent = self.spent_mut(window);
            *spent = sub(*spent, refund)?.max(Decimal::ZERO);
            lower = sub(lower, refund)?;
        }
        self.credits.retain(|_, c| !c.is_zero());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    fn books(cap: &str, spent: &str, others: &str, lease: &str) -> Books {
        Books {
            cap: d(cap),
            window: 100,
            spent: BTreeMap::from([(100, d(spent))]),
            others_leases: d(others),
            lease: d(lease),
            credits: BTreeMap::new(),
        }
    }

    #[test]
    fn a_raise_fits_only_inside_what_spend_and_every_lease_leave() {
        let mut b = books("10", "4", "3", "1");
        assert_eq!(b.headroom(), d("2"));
        // The refusal says what the member could hold in all: its lease and the room left.
        assert!(matches!(b.set_cover(d("3.01")), Err(TeamError::Lease(LeaseError::NoRoom { available })) if available == d("3")));
        assert_eq!(b.lease, d("1"), "a refused raise changes nothing");
        b.set_cover(d("3")).unwrap();
        assert_eq!((b.lease, b.headroom()), (d("3"), d("0")), "exactly the cap fits");
        b.set_cover(d("0.5")).unwrap();
        assert_eq!(b.lease, d("0.5"), "a lowering always succeeds");
    }

    #[test]
    fn a_report_moves_spend_from_the_lease_to_the_window() {
        let mut b = books("10", "4", "3", "2");
        b.record(100, d("1.25")).unwrap();
        assert_eq!((b.spent_now(), b.lease), (d("5.25"), d("0.75")));
        // Spend settled just before the window turned counts in its own window.
        b.record(99, d("0.25")).unwrap();
        assert_eq!((b.spent[&99], b.spent_now(), b.lease), (d("0.25"), d("5.25"), d("0.50")));
        // More than the lease (never with the member's bookkeeping): recorded whole, lease 0.
        b.record(100, d("1")).unwrap();
        assert_eq!((b.spent_now(), b.lease), (d("6.25"), d("0")));
    }

    #[test]
    fn an_expired_lease_is_charged_and_its_member_reconciles_without_counting_twice() {
        // The member held 2 (1.5 of it for requests in flight) and went silent: charged.
        let mut b = books("10", "4", "0", "0");
        let (mut spent, mut credit) = (b.spent_now(), Decimal::ZERO);
        charge_expired(&mut spent, &mut credit, d("2")).unwrap();
        b.spent.insert(100, spent);
        b.credits.insert(100, credit);
        assert_eq!((b.spent_now(), b.cover().unwrap()), (d("6"), d("2")), "charged, and its cover unchanged");
        // It comes back and reports what its requests cost: drawn from the credit.
        b.record(100, d("1.5")).unwrap();
        assert_eq!((b.spent_now(), b.cover().unwrap()), (d("6"), d("0.5")), "nothing counted twice");
        // Nothing more is in flight: it lowers its cover to 0, and the rest is refunded.
        b.set_cover(Decimal::ZERO).unwrap();
        assert_eq!((b.spent_now(), b.credits.len()), (d("5.5"), 0), "the pool's spend is exactly what was billed");
    }

    #[test]
    fn a_credit_from_an_earlier_window_is_given_back_there_and_held_as_lease() {
        let mut b = books("10", "0", "0", "0");
        b.spent.insert(90, d("7"));
        b.credits.insert(90, d("2"));
        b.carry_credits().unwrap();
        assert_eq!((b.spent[&90], b.lease, b.cover().unwrap()), (d("5"), d("2"), d("2")));
        // Its requests settle in the new window.
        b.record(100, d("1.5")).unwrap();
        assert_eq!((b.spent_now(), b.lease), (d("1.5"), d("0.5")));
    }

    /// Random reports, raises, lowerings and expiries, against the invariant: every request that
    /// could be billed is in a window's spend or within its member's cover, and after a raise
    /// spend plus leases fit the cap.
    #[test]
    fn the_cap_holds_in_any_order_of_raises_reports_and_expiries() {
        let cap = d("5");
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        // Three members; each owes `owed` (held or settled, not reported), within its cover.
        let mut spent = Decimal::ZERO;
        let mut members = [(Decimal::ZERO, Decimal::ZERO, Decimal::ZERO); 3]; // (lease, credit, owed)
        let mut billed = Decimal::ZERO;
        let mut recorded = Decimal::ZERO;
        for step in 0..5000 {
            let who = next(3) as usize;
            let others: Decimal = members.iter().enumerate().filter(|(i, _)| *i != who).map(|(_, m)| m.0).sum();
            let (lease, credit, owed) = members[who];
            let mut b = Books {
                cap,
                window: 1,
                spent: BTreeMap::from([(1, spent)]),
                others_leases: others,
                lease,
                credits: if credit.is_zero() { BTreeMap::new() } else { BTreeMap::from([(1, credit)]) },
            };
            let mut owed = owed;
            match next(4) {
                0 => {
                    // A request held under the cover, if it fits; its cost is billed at once.
                    let want = Decimal::new(next(200) as i64, 2);
                    let target = owed + want;
                    if target > b.cover().unwrap() && b.set_cover(target).is_err() {
                        continue;
                    }
                    owed += want;
                    billed += want;
                }
                1 if !owed.is_zero() => {
                    let part = owed * Decimal::new(next(101) as i64, 2);
                    b.record(1, part).unwrap();
                    owed -= part;
                    recorded += part;
                }
                2 => {
                    let target = owed + Decimal::new(next(100) as i64, 2);
                    let _ = b.set_cover(target);
                }
                _ => {
                    let (mut s, mut c) = (b.spent_now(), b.credit_now());
                    charge_expired(&mut s, &mut c, b.lease).unwrap();
                    b.spent.insert(1, s);
                    b.credits = BTreeMap::from([(1, c)]);
                    b.lease = Decimal::ZERO;
                }
            }
            spent = b.spent_now();
            members[who] = (b.lease, b.credits.get(&1).copied().unwrap_or_default(), owed);
            let leases: Decimal = members.iter().map(|m| m.0).sum();
            assert!(owed <= b.cover().unwrap(), "step {step}: a member owes more than its cover");
            assert!(spent + leases <= cap, "step {step}: spend {spent} and leases {leases} pass the cap");
            let outstanding: Decimal = members.iter().map(|m| m.2).sum();
            assert_eq!(billed, recorded + outstanding, "step {step}");
            assert!(billed <= cap, "step {step}: billed {billed}");
        }
    }
}
