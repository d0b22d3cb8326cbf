//! tpacct: a transparent proxy daemon that accounts for every byte it relays.
//!
//! Modules in data-flow order: [`config`] → [`accounting`] (with [`cgroup`]) → [`app`], which
//! wires them together. See `ARCHITECTURE.md` for the whole map.

pub mod accounting;
pub mod app;
pub mod cgroup;
pub mod config;
pub mod logging;
