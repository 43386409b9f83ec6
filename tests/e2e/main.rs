//! End-to-end tests: the real capitd and capitctl over the real socket and proxy, against fake
//! upstreams that speak each provider's wire format. Only the upstream is fake.

mod support;

mod access;
mod agents;
mod alerts;
mod audit;
mod backstop;
mod budget;
mod cli;
mod consumers;
mod durability;
mod edge;
mod keys_at_rest;
mod lifecycle;
mod limits;
mod metering;
mod outage;
mod prices;
mod providers;
mod refusals;
mod sdk;
mod service;
mod soak;
mod team;
mod watch;
