//! A TCP forwarder from this host into a network namespace: how the demo's controller (inside
//! the gateway namespace) becomes reachable at `127.0.0.1:9090` from the host's browser.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    sync::mpsc,
};

use anyhow::{Context, Result};

/// Listens on `local` (or, if taken, on a free port of the same address) and forwards each
/// connection to `target` as seen from inside network namespace `ns`. Returns the address
/// actually listened on; the forwarder runs until the process exits.
pub fn start(local: SocketAddr, ns: &str, target: SocketAddr) -> Result<SocketAddr> {
    let listener = TcpListener::bind(local)
        .or_else(|_| TcpListener::bind(SocketAddr::new(local.ip(), 0)))
        .with_context(|| format!("listening on {local}"))?;
    let bound = listener.local_addr()?;
    // One thread lives in the namespace and makes the connections there; the sockets it
    // makes belong to that namespace whichever thread uses them later.
    let (ask, asked) = mpsc::channel::<mpsc::Sender<std::io::Result<TcpStream>>>();
    let netns = std::fs::File::open(format!("/var/run/netns/{ns}"))
        .with_context(|| format!("opening network namespace {ns}"))?;
    std::thread::spawn(move || {
        if let Err(e) = nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET) {
            eprintln!("forwarder: entering {target}'s namespace: {e}");
            return;
        }
        for reply in asked {
            let _ = reply.send(TcpStream::connect(target));
        }
    });
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            let (tx, rx) = mpsc::channel();
            if ask.send(tx).is_err() {
                return;
            }
            if let Ok(Ok(upstream)) = rx.recv() {
                splice_threads(client, upstream);
            }
        }
    });
    Ok(bound)
}

/// Copies each way on its own thread, passing half-closes on.
fn splice_threads(a: TcpStream, b: TcpStream) {
    for (mut from, mut to) in [
        (a.try_clone(), b.try_clone()),
        (b.try_clone(), a.try_clone()),
    ]
    .into_iter()
    .filter_map(|(f, t)| Some((f.ok()?, t.ok()?)))
    {
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n @ 1..) = from.read(&mut buf) {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
    }
}
