//! Live TCP counters stay fresh: during a 10 s one-way stream, each end's live counter is never
//! behind what the receiving application had read one second earlier. Covers a send-only and a
//! receive-only socket in each direction, read one socket at a time and through a batch read
//! of the whole map.

use std::{
    cell::Cell,
    rc::Rc,
    time::{Duration, Instant},
};

use crate::common::{GRACE, Pair, counters, pattern, tcp_pair, with_ebpf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tpacct::accounting::Accounting;

const STREAM: Duration = Duration::from_secs(10);
const MAX_LAG: Duration = Duration::from_secs(1);
const SAMPLE: Duration = Duration::from_millis(100);
/// Paced at 16 MiB/s: a steady stream, not a benchmark.
const CHUNK: usize = 64 * 1024;
const TICK: Duration = Duration::from_millis(4);

async fn stream_one_way(acc: Accounting, upload: bool) {
    let Pair {
        client,
        server,
        client_t,
        server_t,
    } = tcp_pair(&acc, "127.0.0.1").await;
    let (mut tx_s, tx_t, mut rx_s, rx_t) = if upload {
        (client, client_t, server, server_t)
    } else {
        (server, server_t, client, client_t)
    };
    let read_total = Rc::new(Cell::new(0u64));
    let start = Instant::now();

    let sender = async move {
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        let mut tick = tokio::time::interval(TICK);
        while start.elapsed() < STREAM {
            tick.tick().await;
            pattern(sent, &mut buf);
            tx_s.write_all(&buf).await.expect("write");
            sent += CHUNK as u64;
        }
        tx_s.shutdown().await.expect("shutdown");
        sent
    };
    let total = read_total.clone();
    let receiver = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = rx_s.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            total.set(total.get() + n as u64);
        }
    };
    // history[i] = bytes the receiver had read at sample i.
    let sampler = async {
        let mut history: Vec<u64> = Vec::new();
        let lag_samples = (MAX_LAG.as_millis() / SAMPLE.as_millis()) as usize;
        let mut tick = tokio::time::interval(SAMPLE);
        let mut worst = (0u64, 0u64);
        while start.elapsed() < STREAM {
            tick.tick().await;
            let truth = read_total.get();
            // Every other sample through one batch read of the kernel's maps, as the API and
            // the sampler read them.
            let seen = (history.len() % 2 == 1).then(|| {
                acc.observe(usize::MAX, usize::MAX)
                    .expect("batch map reads on this kernel")
            });
            let (tx_live, rx_live) = (
                acc.live_in(seen.as_ref(), &tx_t).tx,
                acc.live_in(seen.as_ref(), &rx_t).rx,
            );
            if let Some(&then) = history.len().checked_sub(lag_samples).map(|i| &history[i]) {
                assert!(
                    tx_live >= then && rx_live >= then,
                    "live counters more than {MAX_LAG:?} behind at {:?}: sender tx {tx_live}, \
                     receiver rx {rx_live}, receiver had read {then} one second earlier",
                    start.elapsed()
                );
                worst.0 = worst.0.max(truth.saturating_sub(tx_live));
                worst.1 = worst.1.max(truth.saturating_sub(rx_live));
            }
            history.push(truth);
        }
        eprintln!(
            "upload={upload}: {} samples; largest shortfall vs. bytes read now: sender {} B, \
             receiver {} B",
            history.len(),
            worst.0,
            worst.1
        );
        (tx_t, rx_t)
    };
    let (sent, (), (tx_t, rx_t)) = tokio::join!(sender, receiver, sampler);
    let (tx_final, rx_final) = tokio::join!(acc.finish(&tx_t, GRACE), acc.finish(&rx_t, GRACE));
    assert_eq!(tx_final, counters(0, sent));
    assert_eq!(rx_final, counters(sent, 0));
}

async fn live_upload(acc: Accounting) {
    stream_one_way(acc, true).await;
}

async fn live_download(acc: Accounting) {
    stream_one_way(acc, false).await;
}

fn live_upload_ebpf() {
    with_ebpf("live_up", live_upload);
}

fn live_download_ebpf() {
    with_ebpf("live_down", live_download);
}

crate::tests![root live_upload_ebpf, root live_download_ebpf];
