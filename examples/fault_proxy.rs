//! The tests' fault proxy as a program, for `scripts/drill.sh failover`.
//!
//! `cargo run --release --example fault_proxy -- LISTEN_PORT UPSTREAM_ADDR`
//! relays 127.0.0.1:LISTEN_PORT to UPSTREAM_ADDR, and reads commands on stdin:
//! `freeze` (every open connection stops relaying without closing, new ones
//! hang) and `failover ADDR` (new connections go to ADDR; frozen ones stay).
//! It is the same code as `tests/common/proxy.rs`, included, not copied.

#[path = "../tests/common/proxy.rs"]
#[allow(dead_code)]
mod proxy;

use tokio::io::AsyncBufReadExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: fault_proxy LISTEN_PORT UPSTREAM_ADDR";
    let port: u16 = args.next().ok_or(usage)?.parse()?;
    let upstream: std::net::SocketAddr = args.next().ok_or(usage)?.parse()?;
    let p = proxy::PgProxy::start_on(port, upstream).await?;
    println!("relaying {} -> {upstream}", p.addr);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["freeze"] => {
                p.freeze();
                println!("frozen");
            }
            ["failover", addr] => {
                p.fail_over(addr.parse()?);
                println!("failed over to {addr}");
            }
            [] => {}
            other => eprintln!("unknown command {other:?}: freeze | failover ADDR"),
        }
    }
    // stdin closed: keep relaying until killed.
    std::future::pending::<()>().await;
    Ok(())
}
