//! The bench's own servers and clients, run inside the namespaces as `xtask bench-serve`,
//! `bench-sink` and `bench-client`.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// `bench-serve ADDR`: echoes; for churn, answers one byte and closes first (so the clients'
/// ports never wait in TIME_WAIT).
pub fn serve(addr: &str) -> Result<()> {
    let listener = TcpListener::bind(addr)?;
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_nodelay(true);
        std::thread::spawn(move || {
            let mut buf = [0u8; 1];
            // First byte: 'c' = churn (answer and close), 'd' = discard until EOF and answer
            // the count (8 bytes), anything else = echo until EOF.
            let Ok(1) = conn.read(&mut buf) else { return };
            if buf[0] == b'd' {
                let mut chunk = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                while let Ok(n @ 1..) = conn.read(&mut chunk) {
                    total += n as u64;
                }
                let _ = conn.write_all(&total.to_be_bytes());
                return;
            }
            let churn = buf[0] == b'c';
            if conn.write_all(&buf).is_err() || churn {
                return;
            }
            while let Ok(1) = conn.read(&mut buf) {
                if conn.write_all(&buf).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

/// `bench-sink ADDR`: accepts and keeps connections, idle, without a thread each; a reaper
/// drops those whose peer has closed (so a proxy's half-close towards us ends its relay).
pub fn sink(addr: &str) -> Result<()> {
    let listener = TcpListener::bind(addr)?;
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::<TcpStream>::new()));
    let reaper = held.clone();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let mut held = reaper.lock().unwrap_or_else(|p| p.into_inner());
            let mut b = [0u8; 1];
            // Keep a connection while it is open: data or nothing-yet; drop it at EOF or error.
            held.retain(|c| match c.peek(&mut b) {
                Ok(n) => n > 0,
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            });
        }
    });
    for conn in listener.incoming().flatten() {
        let _ = conn.set_nonblocking(true);
        held.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
    }
    Ok(())
}

/// A TCP connection to `target` (an IPv4 `ip:port`) through the SOCKS5 proxy at `proxy`.
fn socks5(proxy: &str, target: &str) -> std::io::Result<TcpStream> {
    let target: std::net::SocketAddrV4 = target
        .parse()
        .map_err(|_| std::io::Error::other("target: not an IPv4 address and port"))?;
    let mut c = TcpStream::connect(proxy)?;
    c.set_nodelay(true)?;
    let mut request = vec![5, 1, 0, 5, 1, 0, 1];
    request.extend_from_slice(&target.ip().octets());
    request.extend_from_slice(&target.port().to_be_bytes());
    // Greeting and request in one write: the server answers both in order.
    c.write_all(&request)?;
    let mut reply = [0u8; 2 + 10];
    c.read_exact(&mut reply)?;
    if reply[..2] != [5, 0] || reply[3] != 0 {
        return Err(std::io::Error::other(format!("SOCKS5 refused: {reply:?}")));
    }
    Ok(c)
}

/// `bench-client churn ADDR SECS` prints connections per second; `bench-client latency ADDR
/// N` prints p50 and p99 round-trip microseconds; `socks-stream PROXY@ADDR SECS` prints the
/// bytes per second one stream moved through a SOCKS5 proxy; `socks-churn PROXY@ADDR SECS`
/// prints SOCKS5 connections per second.
pub fn client_main(kind: &str, addr: &str, arg: &str) -> Result<()> {
    let n: u64 = arg.parse().context("count")?;
    let (proxy, target) = addr.split_once('@').unwrap_or(("", addr));
    match kind {
        "ws" => println!("{}", super::ws::follow(addr, n)?),
        "socks-stream" => {
            let mut c = socks5(proxy, target)?;
            let chunk = vec![0x5au8; 256 * 1024];
            c.write_all(b"d")?;
            let started = Instant::now();
            let until = started + Duration::from_secs(n);
            while Instant::now() < until {
                c.write_all(&chunk)?;
            }
            c.shutdown(Shutdown::Write)?;
            let mut count = [0u8; 8];
            c.read_exact(&mut count)?;
            let secs = started.elapsed().as_secs_f64();
            println!("{}", u64::from_be_bytes(count) as f64 / secs);
        }
        "socks-churn" => {
            let until = Instant::now() + Duration::from_secs(n);
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let (proxy, target) = (proxy.to_owned(), target.to_owned());
                    std::thread::spawn(move || {
                        let mut done = 0u64;
                        while Instant::now() < until {
                            let Ok(mut c) = socks5(&proxy, &target) else {
                                continue;
                            };
                            let mut b = [0u8; 1];
                            if c.write_all(b"c").is_ok() && c.read_exact(&mut b).is_ok() {
                                let _ = c.read(&mut b);
                                done += 1;
                            }
                        }
                        done
                    })
                })
                .collect();
            let total: u64 = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
            println!("{}", total as f64 / n as f64);
        }
        "churn" => {
            // Prints connections per second, then the payload bytes that went up and down
            // (what the gateway must have counted, to the byte).
            let until = Instant::now() + Duration::from_secs(n);
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let addr = addr.to_owned();
                    std::thread::spawn(move || {
                        let (mut done, mut up, mut down) = (0u64, 0u64, 0u64);
                        while Instant::now() < until {
                            let Ok(mut c) = TcpStream::connect(&addr) else {
                                continue;
                            };
                            let mut b = [0u8; 1];
                            if c.write_all(b"c").is_ok() {
                                up += 1;
                                if c.read_exact(&mut b).is_ok() {
                                    down += 1;
                                    let _ = c.read(&mut b); // the server's FIN
                                    done += 1;
                                }
                            }
                            let _ = c.shutdown(Shutdown::Both);
                        }
                        (done, up, down)
                    })
                })
                .collect();
            let (mut total, mut up, mut down) = (0u64, 0u64, 0u64);
            for t in threads {
                let (d, u, w) = t.join().unwrap_or((0, 0, 0));
                (total, up, down) = (total + d, up + u, down + w);
            }
            println!("{} {up} {down}", total as f64 / n as f64);
        }
        "latency" => {
            let mut c = TcpStream::connect(addr)?;
            c.set_nodelay(true)?;
            let mut rtts = Vec::with_capacity(n as usize);
            let mut b = [0u8; 1];
            for _ in 0..n {
                let t = Instant::now();
                c.write_all(b"p")?;
                c.read_exact(&mut b)?;
                rtts.push(t.elapsed().as_secs_f64() * 1e6);
            }
            rtts.sort_by(f64::total_cmp);
            let at = |q: f64| rtts[((rtts.len() as f64 - 1.0) * q) as usize];
            println!("{} {}", at(0.50), at(0.99));
        }
        "hold" => {
            let mut held = Vec::with_capacity(n as usize);
            // A gateway out of descriptors leaves connects hanging: stop at the first that
            // does not complete in 5 s and report how many are held.
            let target: std::net::SocketAddr = addr.parse()?;
            for _ in 0..n {
                match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
                    Ok(c) => held.push(c),
                    Err(_) => break,
                }
            }
            println!("{}", held.len());
            std::io::stdout().flush()?;
            // Held until the bench kills us.
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        other => bail!("unknown bench client {other}"),
    }
    Ok(())
}
