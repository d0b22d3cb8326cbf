//! Client → gateway → server network namespaces joined by veth pairs, for the demo and the
//! benchmarks; removed on drop.

use std::process::{Command, Stdio};

use anyhow::Result;

use crate::process;

/// Three namespaces named `<prefix>-client`, `-gw`, `-server` on subnets `10.<net>.1.0/24`
/// (client side) and `10.<net>.2.0/24` (server side).
#[derive(Debug)]
pub struct Topology {
    pub client: String,
    pub gateway: String,
    pub server: String,
    pub net: u8,
}

fn ip(args: &[&str]) -> Result<()> {
    process::run_quiet("ip", args)
}

impl Topology {
    pub fn up(prefix: &str, net: u8) -> Result<Topology> {
        let topo = Topology {
            client: format!("{prefix}-client"),
            gateway: format!("{prefix}-gw"),
            server: format!("{prefix}-server"),
            net,
        };
        topo.clean();
        for ns in [&topo.client, &topo.gateway, &topo.server] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let veth = |a: &str, ans: &str, b: &str, bns: &str| {
            ip(&[
                "link", "add", a, "netns", ans, "type", "veth", "peer", "name", b, "netns", bns,
            ])
        };
        veth("cl-eth0", &topo.client, "gw-lan", &topo.gateway)?;
        veth("sv-eth0", &topo.server, "gw-wan", &topo.gateway)?;
        for (ns, dev, host) in [
            (&topo.client, "cl-eth0", "1.2"),
            (&topo.gateway, "gw-lan", "1.1"),
            (&topo.gateway, "gw-wan", "2.1"),
            (&topo.server, "sv-eth0", "2.2"),
        ] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("10.{net}.{host}/24"),
                "dev",
                dev,
            ])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        ip(&[
            "-n",
            &topo.client,
            "route",
            "add",
            "default",
            "via",
            &format!("10.{net}.1.1"),
        ])?;
        ip(&[
            "-n",
            &topo.server,
            "route",
            "add",
            "default",
            "via",
            &format!("10.{net}.2.1"),
        ])?;
        ip(&[
            "netns",
            "exec",
            &topo.gateway,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])?;
        Ok(topo)
    }

    /// The gateway's address on the client's side.
    pub fn gateway_lan_ip(&self) -> String {
        format!("10.{}.1.1", self.net)
    }

    /// The server's address.
    pub fn server_ip(&self) -> String {
        format!("10.{}.2.2", self.net)
    }

    /// `ip netns exec <ns> program`.
    pub fn exec(ns: &str, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(program);
        cmd
    }

    fn clean(&self) {
        for ns in [&self.client, &self.gateway, &self.server] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.clean();
    }
}
