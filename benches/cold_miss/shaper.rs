//! A WAN-like link for the cold-miss benchmark: a TCP proxy on loopback that sits between the
//! caches and their upstream and forwards every connection to the upstream, with two changes:
//!
//! - **Bandwidth**: each direction is one shared link of `rate` bytes per second for all
//!   connections together (like one access link to a remote registry). Bytes are forwarded in
//!   pieces of at most 64 KiB; each piece books its transmission time on that direction's
//!   virtual clock and is written when the clock says it has been sent, less a 4 ms allowance
//!   (so the rate holds on average without a timer per kilobyte).
//! - **Latency**: every response waits `latency` before its first byte is forwarded. A
//!   "response" begins whenever the upstream sends bytes after the client sent new bytes on
//!   that connection (a request): the first response on a new connection is held too, the rest
//!   of a streaming body is not. Nothing else is delayed (connecting is immediate).
//!
//! It counts the connections it made to the upstream and the bytes the upstream sent through
//! it, so a benchmark reads how much a cache fetched without parsing the upstream's log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

const PIECE: usize = 64 << 10;
/// How far sending may run ahead of a link's virtual clock.
const ALLOWANCE: Duration = Duration::from_millis(4);

/// The running proxy; it stops (its runtime and every connection) when dropped.
pub struct Shaper {
    pub port: u16,
    stats: Arc<Stats>,
    _rt: tokio::runtime::Runtime,
}

#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    upstream_bytes: AtomicU64,
}

/// One direction of the link: the instant at which everything booked so far has been sent.
struct Link {
    secs_per_byte: f64,
    free_at: std::sync::Mutex<Option<Instant>>,
}

impl Link {
    fn new(rate: u64) -> Self {
        Self {
            secs_per_byte: 1.0 / rate.max(1) as f64,
            free_at: std::sync::Mutex::new(None),
        }
    }

    /// Waits until `n` more bytes have had time to cross the link.
    async fn pass(&self, n: usize) {
        let sent_at = {
            let mut free_at = self.free_at.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            // An idle link does not save up credit: the piece starts now at the earliest.
            let start = free_at.map_or(now, |t| t.max(now));
            let done = start + Duration::from_secs_f64(n as f64 * self.secs_per_byte);
            *free_at = Some(done);
            done
        };
        tokio::time::sleep_until(sent_at.checked_sub(ALLOWANCE).unwrap_or(sent_at)).await;
    }
}

struct Links {
    upstream: SocketAddr,
    latency: Duration,
    to_upstream: Link,
    from_upstream: Link,
    stats: Arc<Stats>,
}

impl Shaper {
    /// Starts the proxy on an ephemeral loopback port, in front of `upstream`.
    pub fn start(upstream: SocketAddr, rate: u64, latency: Duration) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("shaper")
            .enable_all()
            .build()
            .expect("shaper runtime");
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("shaper listener");
        let port = listener.local_addr().expect("shaper address").port();
        let stats = Arc::new(Stats::default());
        let links = Arc::new(Links {
            upstream,
            latency,
            to_upstream: Link::new(rate),
            from_upstream: Link::new(rate),
            stats: stats.clone(),
        });
        rt.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, links.clone()));
            }
        });
        Self {
            port,
            stats,
            _rt: rt,
        }
    }

    /// Connections made to the upstream so far.
    pub fn connections(&self) -> u64 {
        self.stats.connections.load(Ordering::Relaxed)
    }

    /// Bytes the upstream has sent through the proxy so far.
    pub fn upstream_bytes(&self) -> u64 {
        self.stats.upstream_bytes.load(Ordering::Relaxed)
    }
}

async fn relay(client: TcpStream, links: Arc<Links>) {
    let Ok(upstream) = TcpStream::connect(links.upstream).await else {
        return;
    };
    links.stats.connections.fetch_add(1, Ordering::Relaxed);
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_r, client_w) = client.into_split();
    let (upstream_r, upstream_w) = upstream.into_split();
    // Bumped for every piece the client sends: a response starts when the upstream answers
    // after a bump it has not answered yet.
    let requests = AtomicU64::new(0);
    let mut answered = 0;
    let up = pump(
        client_r,
        upstream_w,
        &links.to_upstream,
        || None,
        |_| {
            requests.fetch_add(1, Ordering::Relaxed);
        },
    );
    let down = pump(
        upstream_r,
        client_w,
        &links.from_upstream,
        || {
            let asked = requests.load(Ordering::Relaxed);
            (std::mem::replace(&mut answered, asked) != asked).then_some(links.latency)
        },
        |n| {
            links
                .stats
                .upstream_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
        },
    );
    tokio::join!(up, down);
}

/// Forwards `from` to `to` piece by piece: `hold` says how long to hold a piece before it
/// goes on the link, `sent` hears of every piece written.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    link: &Link,
    mut hold: impl FnMut() -> Option<Duration>,
    sent: impl Fn(usize),
) {
    let mut buf = vec![0u8; PIECE];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        if let Some(wait) = hold() {
            tokio::time::sleep(wait).await;
        }
        link.pass(n).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        sent(n);
    }
    let _ = to.shutdown().await;
}
