//! tpacct: a transparent proxy daemon that accounts for every byte it relays.
//!
//! Modules in data-flow order: [`config`] → [`inbound`] → [`sniff`] → [`route`] →
//! [`outbound`] → [`relay`] → [`accounting`] (with [`cgroup`]) → [`registry`] → [`speed`] →
//! [`snapshot`] → [`api`]; [`firewall`] steers traffic in, [`state`] keeps what outlives a run,
//! and [`app`] wires it all together. See `ARCHITECTURE.md` at the repository's root.

pub mod accounting;
pub mod api;
pub mod app;
pub mod cgroup;
pub mod config;
pub mod devices;
pub mod fastpath;
pub mod fetch;
pub mod firewall;
pub mod flow;
pub mod inbound;
pub mod killswitch;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod outbound;
pub mod process;
pub mod proto;
pub mod registry;
pub mod relay;
pub mod reload;
pub mod route;
pub mod snapshot;
pub mod sniff;
pub mod speed;
pub mod state;
pub mod store;
pub mod tls;
pub mod top;
