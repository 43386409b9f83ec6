//! capit: a user-level daemon that holds a person's LLM provider keys and lets agents spend
//! them only through capped, metered virtual keys.
//!
//! Code map (see ARCHITECTURE.md for the flow and the invariants):
//! - [`app`] wires everything and stops it in order; [`config`] validates flags; [`paths`] says
//!   where files live; [`shutdown`] is the signal.
//! - Domain, free of IO and of hyper, tonic and redb types: [`grants`] (limits and refusals),
//!   [`ledger`] (entries and totals), [`pricing`] (the cost formula and price table), [`usage`]
//!   (response parsers: bytes in, token counts out), [`providers`] (the upstream table and the
//!   route allowlist), [`request_path`] (paths decoded and normalised before the allowlist),
//!   [`secret`] (keys), [`request_fields`] (a billable body read once), [`admission`] (the hold
//!   maths), [`lease`] (admission leases: the source trait and the in-memory book), [`codec`]
//!   (binary ledger records).
//! - [`keyring`]: master keys at rest, sealed under a data key in the OS keyring.
//! - [`store`]: the only module that knows redb; one writer thread, batched commits.
//! - [`state`]: live state over the store, shared by the proxy and the control service.
//! - [`backstop`]: provider-side caps (OpenRouter keys with a limit, one per grant), kept in step
//!   with the grants; [`access`]: access requests from local programs, answered by the owner;
//!   [`when`]: times as people write them; [`notify`]: desktop notifications.
//! - [`events`]: the per-request log line, live events for watchers, spend alerts. [`audit`]:
//!   the durable record of control-plane changes. [`readiness`]: systemd's `READY=1`.
//! - [`team`]: team budgets shared by many daemons through Postgres ([`team::pg`] is the only
//!   module that knows tokio-postgres).
//! - [`proxy`]: the only module that knows hyper. [`control`]: the only one that knows protobuf.

pub mod access;
pub mod admission;
pub mod app;
pub mod audit;
pub mod backstop;
pub mod codec;
pub mod config;
pub mod control;
pub mod events;
pub mod grants;
pub mod keyring;
pub mod lease;
pub mod ledger;
pub mod log_throttle;
pub mod notify;
pub mod paths;
pub mod pricing;
pub mod providers;
pub mod proxy;
pub mod readiness;
pub mod request_fields;
pub mod request_path;
pub mod secret;
pub mod shutdown;
pub mod state;
pub mod store;
pub mod team;
pub mod usage;
pub mod when;

/// The generated protobuf types and gRPC stubs of `proto/capit/v1/control.proto`.
pub mod proto {
    pub mod v1 {
        tonic::include_proto!("capit.v1");
    }
}
