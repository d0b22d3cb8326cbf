//! The demo's own clients, run inside the client namespace: each prints `flows sent received`
//! (payload bytes, counted at its own socket) on stdout and a line for people on stderr.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream, UdpSocket},
    process::Command,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail};

/// Datagram sizes of the UDP client.
const UDP_SIZES: [usize; 3] = [100, 200, 300];

/// `demo-udp ADDR`: a few datagrams, each echoed.
pub fn udp(addr: &str) -> Result<()> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = vec![0u8; 65_536];
    let (mut sent, mut got) = (0, 0);
    for size in UDP_SIZES {
        socket.send_to(&vec![b'u'; size], addr)?;
        let (n, from) = socket.recv_from(&mut buf)?;
        if from.to_string() != addr {
            bail!("reply came from {from}, not {addr}");
        }
        sent += size;
        got += n;
    }
    eprintln!(
        "demo client | UDP   {addr}: sent {sent} B, received {got} B in {} datagrams each way \
         (one session; its line appears when it closes)",
        UDP_SIZES.len()
    );
    println!("1 {sent} {got}");
    Ok(())
}

/// Copies `from` to `to` until EOF, adding what it copied to `count`, then half-closes `to`.
fn pump(mut from: TcpStream, mut to: TcpStream, count: &AtomicU64) {
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// `demo-https ADDR NAME`: curl fetches `https://NAME/` over a connection to ADDR that this
/// process makes and meters, so the TLS bytes the client moved are known exactly.
pub fn https(addr: &str, name: &str) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let local = listener.local_addr()?;
    let (sent, got) = (AtomicU64::new(0), AtomicU64::new(0));
    let status = std::thread::scope(|s| -> Result<std::process::ExitStatus> {
        let meter = s.spawn(|| -> Result<()> {
            let (curl, _) = listener.accept()?;
            let server = TcpStream::connect(addr).with_context(|| format!("connecting {addr}"))?;
            let (curl2, server2) = (curl.try_clone()?, server.try_clone()?);
            std::thread::scope(|s| {
                s.spawn(|| pump(curl, server, &sent));
                pump(server2, curl2, &got);
            });
            Ok(())
        });
        let status = Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "--connect-to"])
            .arg(format!("{name}:443:{}:{}", local.ip(), local.port()))
            .arg(format!("https://{name}/"))
            .status()
            .context("curl")?;
        if !status.success() {
            // curl may never have connected: let the meter's accept return.
            let _ = TcpStream::connect(local);
        }
        meter
            .join()
            .map_err(|_| anyhow::anyhow!("the meter panicked"))??;
        Ok(status)
    })?;
    if !status.success() {
        bail!("curl https://{name}/: {status}");
    }
    let (sent, got) = (sent.into_inner(), got.into_inner());
    eprintln!(
        "demo client | HTTPS {name} ({addr}): sent {sent} B, received {got} B of TLS (SNI \
         sniffed by the gateway)"
    );
    println!("1 {sent} {got}");
    Ok(())
}
