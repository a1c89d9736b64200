//! The accept loop: one hyper HTTP/1.1 connection task per socket.
//!
//! Owns connection-level policy (keep-alive, the slow-loris guard in
//! `server::stall`, buffer size) and the first half of shutdown: when told to stop
//! it closes the listener, lets in-flight requests finish and closes idle
//! keep-alive connections, waiting at most until the deadline.

mod stall;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::http::{self, AppState, Listener};

/// Largest request head hyper buffers (request line + headers); past it: `431`.
/// Request targets over `http::MAX_URI_BYTES` but within this get `414`.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Connection-level limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Open connections at most; the next client waits in the listen backlog.
    pub max_connections: usize,
    /// Time a connection may wait for a complete request head, idle
    /// keep-alive included (slow-loris guard, `server::stall`).
    pub header_read_timeout: Duration,
}

/// Serves connections on `listener` (as `on`) until `shutdown` resolves, then
/// closes the listener and lets open connections finish their requests for
/// `drain_for` at most (idle keep-alive connections are closed at once).
/// Returns the number of connections still open then; their requests go on,
/// and an event among them is refused once the shards are closed.
pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    on: Listener,
    shutdown: impl Future<Output = ()>,
    drain_for: Duration,
    limits: Limits,
) -> usize {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    // No timer: hyper's per-request header timeout is replaced by the
    // per-connection watchdog in `stall`.
    builder
        .keep_alive(true)
        .header_read_timeout(None)
        .max_buf_size(MAX_HEAD_BYTES);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = accept(&listener, &slots) => match accepted {
                Ok((stream, slot)) => {
                    let _ = stream.set_nodelay(true);
                    let state = state.clone();
                    let peer = stream
                        .peer_addr()
                        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
                    let progress = stall::Progress::new();
                    let steps = progress.clone();
                    let conn = builder.serve_connection(
                        TokioIo::new(stream),
                        service_fn(move |req| {
                            steps.head_in();
                            let steps = steps.clone();
                            let answer = http::handle(state.clone(), on, peer, req);
                            async move {
                                let response = answer.await;
                                steps.response_out();
                                response
                            }
                        }),
                    );
                    let conn = graceful.watch(conn);
                    let timeout = limits.header_read_timeout;
                    tokio::spawn(async move {
                        // Client resets and timeouts end a connection; nothing to report.
                        stall::guard(conn, &progress, timeout).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    // Out of file descriptors or similar: back off briefly, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
    drop(listener);
    let deadline = Instant::now() + drain_for;
    let open = graceful.count();
    tokio::select! {
        _ = graceful.shutdown() => 0,
        _ = tokio::time::sleep_until(deadline) => {
            tracing::warn!(connections = open, "connections still open at the shutdown deadline");
            open
        }
    }
}

/// Waits for a free connection slot, then for a client.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<tokio::sync::Semaphore>,
) -> std::io::Result<(tokio::net::TcpStream, tokio::sync::OwnedSemaphorePermit)> {
    let slot = slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| std::io::Error::other("connection slots closed"))?;
    let (stream, _peer) = listener.accept().await?;
    Ok((stream, slot))
}
