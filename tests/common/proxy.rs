//! A TCP proxy in front of PostgreSQL that makes network faults for real.
//!
//! It relays bytes both ways and reads the client's protocol messages, and on
//! command it:
//! - **loses a commit acknowledgement**: the next simple-query `COMMIT` is
//!   forwarded, the server's answer swallowed and both sides closed (the
//!   transaction committed, but the client cannot know);
//! - **freezes**: every open connection stops relaying without closing (a
//!   partition, or a primary that hangs), and new connections are accepted
//!   and never answered;
//! - **fails over**: new connections go to another server; the frozen ones
//!   stay frozen, as they would behind a managed database's failover.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

struct Shared {
    upstream: Mutex<SocketAddr>,
    cut_armed: AtomicBool,
    cuts: AtomicU64,
    /// Incremented by every freeze: a connection opened before the current
    /// generation is frozen.
    generation: watch::Sender<u64>,
    /// New connections hang while true.
    frozen: AtomicBool,
    connections: AtomicU64,
}

pub struct PgProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

impl PgProxy {
    /// On a free port of 127.0.0.1.
    pub async fn start(upstream: SocketAddr) -> PgProxy {
        Self::start_on(0, upstream).await.expect("bind proxy")
    }

    /// On 127.0.0.1:`port` (0 = any free one).
    pub async fn start_on(port: u16, upstream: SocketAddr) -> std::io::Result<PgProxy> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            cut_armed: AtomicBool::new(false),
            cuts: AtomicU64::new(0),
            generation: watch::channel(0).0,
            frozen: AtomicBool::new(false),
            connections: AtomicU64::new(0),
        });
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let (s, t) = (shared.clone(), tasks.clone());
        tasks.lock().expect("tasks").spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let s = s.clone();
                s.connections.fetch_add(1, SeqCst);
                t.lock().expect("tasks").spawn(async move {
                    if s.frozen.load(SeqCst) {
                        // A black-holed host: the connection is open, nobody answers.
                        let _hold = &client;
                        std::future::pending::<()>().await;
                    }
                    let upstream = *s.upstream.lock().expect("upstream");
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        relay(client, server, s).await;
                    }
                });
            }
        });
        Ok(PgProxy {
            addr,
            shared,
            tasks,
        })
    }

    /// `url` (a `postgres://…/db` URL) pointed at this proxy instead.
    pub fn url_for(&self, url: &str) -> String {
        let db = url.rsplit('/').next().unwrap_or("postgres");
        format!("postgres://postgres@{}/{db}", self.addr)
    }

    /// Loses the acknowledgement of the next `COMMIT` that passes through.
    pub fn cut_next_commit(&self) {
        self.shared.cut_armed.store(true, SeqCst);
    }

    /// Commits whose acknowledgement was lost so far.
    pub fn cuts(&self) -> u64 {
        self.shared.cuts.load(SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(SeqCst)
    }

    /// Stops relaying on every open connection (they stay open) and leaves
    /// new ones unanswered.
    pub fn freeze(&self) {
        self.shared.frozen.store(true, SeqCst);
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// New connections go to `upstream`; connections frozen before stay frozen.
    pub fn fail_over(&self, upstream: SocketAddr) {
        *self.shared.upstream.lock().expect("upstream") = upstream;
        self.shared.frozen.store(false, SeqCst);
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        if let Ok(mut t) = self.tasks.lock() {
            t.abort_all();
        }
    }
}

/// Copies `from` to `to` until either closes, or forever once frozen.
async fn pipe(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut generation: watch::Receiver<u64>,
    born: u64,
    muted: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if *generation.borrow() > born {
            std::future::pending::<()>().await;
        }
        tokio::select! {
            r = from.read(&mut buf) => {
                let n = match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if *generation.borrow() > born {
                    std::future::pending::<()>().await;
                }
                if muted.load(SeqCst) {
                    continue;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            _ = generation.changed() => {}
        }
    }
}

async fn relay(client: TcpStream, server: TcpStream, s: Arc<Shared>) {
    let born = *s.generation.borrow();
    let (mut cr, cw) = client.into_split();
    let (sr, mut sw) = server.into_split();
    let muted = Arc::new(AtomicBool::new(false));
    // Aborted with this task (the proxy dropped) or when the relay ends.
    let down = AbortOnDrop(tokio::spawn(pipe(
        sr,
        cw,
        s.generation.subscribe(),
        born,
        muted.clone(),
    )));
    let mut generation = s.generation.subscribe();
    // Client → server, message by message.
    let mut startup = true;
    loop {
        if *generation.borrow() > born {
            std::future::pending::<()>().await;
        }
        let msg = tokio::select! {
            m = read_message(&mut cr, startup) => m,
            _ = generation.changed() => continue,
        };
        let Some((msg, still_startup)) = msg else {
            break;
        };
        startup = still_startup;
        if *generation.borrow() > born {
            std::future::pending::<()>().await;
        }
        let is_commit = msg.first() == Some(&b'Q') && msg.get(5..11) == Some(&b"COMMIT"[..]);
        if !startup && is_commit && s.cut_armed.swap(false, SeqCst) {
            muted.store(true, SeqCst);
            let _ = sw.write_all(&msg).await;
            let _ = sw.flush().await;
            // Let the server finish the commit, then drop both sides.
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.cuts.fetch_add(1, SeqCst);
            return;
        }
        if sw.write_all(&msg).await.is_err() {
            break;
        }
    }
    drop(down);
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads one protocol message; returns it and whether the next one is still
/// an untyped startup message (after an SSLRequest).
async fn read_message(r: &mut (impl AsyncRead + Unpin), startup: bool) -> Option<(Vec<u8>, bool)> {
    if startup {
        let mut len = [0u8; 4];
        r.read_exact(&mut len).await.ok()?;
        let n = u32::from_be_bytes(len) as usize;
        let mut body = vec![0u8; n.saturating_sub(4)];
        r.read_exact(&mut body).await.ok()?;
        // SSLRequest (80877103) is followed by another untyped message.
        let again = body.get(..4) == Some(&80877103u32.to_be_bytes()[..]);
        Some(([&len[..], &body[..]].concat(), again))
    } else {
        let mut head = [0u8; 5];
        r.read_exact(&mut head).await.ok()?;
        let n = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; n.saturating_sub(4)];
        r.read_exact(&mut body).await.ok()?;
        Some(([&head[..], &body[..]].concat(), false))
    }
}
