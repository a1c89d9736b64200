//! A bare hyper 1.x server answering `204` to everything: the control that
//! separates what hyper and tokio cost from what the service adds.
//!
//! ```text
//! taskset -c 0 cargo run --release --example hyper204 -- 127.0.0.1:18110 [multi] [timer]
//! ```
//! `multi` uses tokio's multi-thread scheduler with one worker (as the service
//! did with WORKER_THREADS=1 before it moved to a current-thread runtime); the
//! default is a current-thread runtime. `timer` arms hyper's per-request header
//! read timeout (10 s), as the service's slow-loris guard did before it moved to
//! a per-connection watchdog.

use std::convert::Infallible;
use std::time::Duration;

use http_body_util::Empty;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:18110".into());
    let timer = args.iter().skip(2).any(|a| a == "timer");
    let runtime = if args.iter().skip(2).any(|a| a == "multi") {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
    .expect("runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let mut builder = http1::Builder::new();
                if timer {
                    builder
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10));
                }
                let _ = builder
                    .serve_connection(
                        TokioIo::new(stream),
                        service_fn(|_req| async {
                            let mut r = Response::new(Empty::<bytes::Bytes>::new());
                            *r.status_mut() = StatusCode::NO_CONTENT;
                            Ok::<_, Infallible>(r)
                        }),
                    )
                    .await;
            });
        }
    });
}
