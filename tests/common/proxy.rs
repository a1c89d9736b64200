//! A TCP proxy in front of PostgreSQL that can lose a commit acknowledgement.
//!
//! It relays bytes both ways and reads the client's protocol messages. When
//! armed, the next simple-query `COMMIT` is forwarded to the server, the
//! server's answer is swallowed, and both sides are closed: the transaction
//! committed, but the client cannot know. That is the ambiguous commit the
//! exactly-once ledger must make harmless.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct CommitCutter {
    pub port: u16,
    armed: Arc<AtomicBool>,
    pub cuts: Arc<AtomicU64>,
}

impl CommitCutter {
    pub async fn start(upstream: SocketAddr) -> CommitCutter {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let armed = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicU64::new(0));
        let (a, c) = (armed.clone(), cuts.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (a, c) = (a.clone(), c.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        relay(client, server, a, c).await;
                    }
                });
            }
        });
        CommitCutter { port, armed, cuts }
    }

    /// Loses the acknowledgement of the next `COMMIT` that passes through.
    pub fn arm(&self) {
        self.armed.store(true, SeqCst);
    }
}

async fn relay(client: TcpStream, server: TcpStream, armed: Arc<AtomicBool>, cuts: Arc<AtomicU64>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let muted = Arc::new(AtomicBool::new(false));
    let m = muted.clone();
    let down = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if m.load(SeqCst) {
                continue; // swallow the server's answer to the cut COMMIT
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
    // Client → server, message by message.
    let mut startup = true;
    loop {
        let msg = if startup {
            let mut len = [0u8; 4];
            if cr.read_exact(&mut len).await.is_err() {
                break;
            }
            let n = u32::from_be_bytes(len) as usize;
            let mut body = vec![0u8; n.saturating_sub(4)];
            if cr.read_exact(&mut body).await.is_err() {
                break;
            }
            // SSLRequest (80877103) is followed by another untyped message.
            startup = body.get(..4) == Some(&80877103u32.to_be_bytes()[..]);
            [&len[..], &body[..]].concat()
        } else {
            let mut head = [0u8; 5];
            if cr.read_exact(&mut head).await.is_err() {
                break;
            }
            let n = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            let mut body = vec![0u8; n.saturating_sub(4)];
            if cr.read_exact(&mut body).await.is_err() {
                break;
            }
            if head[0] == b'Q' && body.starts_with(b"COMMIT") && armed.swap(false, SeqCst) {
                muted.store(true, SeqCst);
                let _ = sw.write_all(&head).await;
                let _ = sw.write_all(&body).await;
                let _ = sw.flush().await;
                // Let the server finish the commit, then drop both sides.
                tokio::time::sleep(Duration::from_millis(300)).await;
                cuts.fetch_add(1, SeqCst);
                down.abort();
                return;
            }
            [&head[..], &body[..]].concat()
        };
        if sw.write_all(&msg).await.is_err() {
            break;
        }
    }
    down.abort();
}
