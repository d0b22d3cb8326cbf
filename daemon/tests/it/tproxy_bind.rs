//! `bind-address` and the managed firewall agree: with the listener on the gateway's LAN
//! address the rules send captured traffic there, and TCP and UDP still flow with exact totals.

use tpacct::config::{AccountingMode, BindAddress};

use crate::common::topo::{SERVER4, with_gateway};

fn a_specific_bind_address_still_captures() {
    with_gateway(
        "bind",
        AccountingMode::Ebpf,
        |c| c.bind_address = BindAddress::One("10.91.1.1".parse().expect("ip")),
        |topo, gw| {
            assert_eq!(gw.listening, ["10.91.1.1:7893".parse().expect("addr")]);
            crate::tproxy_tcp::exchange(topo, gw, SERVER4, 100_000, 300_000);
            crate::tproxy_udp::request_response(topo, gw, SERVER4);
        },
    );
}

crate::tests![root a_specific_bind_address_still_captures];
