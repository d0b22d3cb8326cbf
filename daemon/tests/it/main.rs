//! Integration tests, one binary: real namespaces, real eBPF programs, real sockets and the
//! real `tpacctd`. Tests that need root are reported as ignored without it.

#[path = "../common/mod.rs"]
mod common;

mod api_e2e;
mod api_flood;
mod api_router;
mod api_routes;
mod api_secret;
mod api_ws;
mod capabilities;
mod churn;
mod cli;
mod devices;
mod events;
mod fastpath;
mod fastpath_life;
mod firewall;
mod groups;
mod groups_checks;
mod history;
mod history_load;
mod killswitch;
mod marked;
mod metrics;
mod mixed;
mod process;
mod ring_full;
mod routing;
mod routing_data;
mod routing_reload;
mod side_by_side;
mod sniffing;
mod systemd;
mod tcp_live;
mod tcp_totals;
mod top;
mod tproxy_bind;
mod tproxy_scale;
mod tproxy_tcp;
mod tproxy_udp;
mod tproxy_udp_scale;
mod udp_totals;
mod ui;

fn main() {
    let trials = [
        api_e2e::tests(),
        api_flood::tests(),
        api_router::tests(),
        api_routes::tests(),
        api_secret::tests(),
        api_ws::tests(),
        capabilities::tests(),
        churn::tests(),
        cli::tests(),
        devices::tests(),
        events::tests(),
        fastpath::tests(),
        fastpath_life::tests(),
        firewall::tests(),
        groups::tests(),
        groups_checks::tests(),
        history::tests(),
        history_load::tests(),
        killswitch::tests(),
        marked::tests(),
        metrics::tests(),
        mixed::tests(),
        process::tests(),
        ring_full::tests(),
        routing::tests(),
        routing_data::tests(),
        routing_reload::tests(),
        systemd::tests(),
        side_by_side::tests(),
        sniffing::tests(),
        tcp_live::tests(),
        tcp_totals::tests(),
        top::tests(),
        tproxy_bind::tests(),
        tproxy_scale::tests(),
        tproxy_tcp::tests(),
        tproxy_udp::tests(),
        tproxy_udp_scale::tests(),
        udp_totals::tests(),
        ui::tests(),
    ]
    .into_iter()
    .flatten()
    .collect();
    common::harness::main(trials);
}
