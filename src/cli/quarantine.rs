//! `ingest quarantine list` and `ingest quarantine retry`: the rows both
//! `events` and `rejected_events` refused, kept in `SPOOL_DIR/quarantine/`.
//!
//! `list` prints each file with its events and the database's error (and the
//! damaged spool segments kept there, whose good records were replayed).
//! `retry` sends each quarantined row through the same retry path as the
//! service (so a row that commits lands exactly once, through the ledger),
//! and deletes a file only once its rows are stored; a row refused again
//! stays, with the new error. Neither needs the spool's lock, so both can run
//! beside the service.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Config;
use crate::spool::{list_quarantine, read_segment, remove_quarantined};
use crate::writer::quarantine::SpoolQuarantine;
use crate::writer::retry::{Delivery, KeepRetrying, RetryPolicy};

/// `ingest quarantine list`.
pub fn list(config: &Config) -> ExitCode {
    match list_quarantine(&config.spool_dir) {
        Ok(files) if files.is_empty() => {
            println!(
                "quarantine is empty ({})",
                config.spool_dir.join("quarantine").display()
            );
            ExitCode::SUCCESS
        }
        Ok(files) => {
            let events: usize = files.iter().map(|f| f.events).sum();
            for f in &files {
                println!("{}\t{} events\t{}", f.path.display(), f.events, f.note);
            }
            println!("{} files, {events} events", files.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cannot read the quarantine: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `ingest quarantine retry`: exits 0 when every quarantined row is stored.
pub async fn retry(config: &Config, give_up_after: Duration) -> ExitCode {
    let writer = match super::writer(config) {
        Ok(w) => w,
        Err(code) => return code,
    };
    if let Err(e) = writer.ensure_ready().await {
        eprintln!("database not ready: {e}");
        return ExitCode::FAILURE;
    }
    let files = match list_quarantine(&config.spool_dir) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cannot read the quarantine: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stats = Arc::new(crate::stats::Stats::new());
    stats
        .db_up
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let delivery = Delivery::new(
        writer,
        KeepRetrying,
        SpoolQuarantine {
            dir: config.spool_dir.clone(),
        },
        RetryPolicy::new(config.write_timeout, config.batch_max_rows),
        stats,
        true,
    );
    let (stop_tx, mut stop) = watch::channel(false);
    tokio::spawn(async move {
        tokio::time::sleep(give_up_after).await;
        let _ = stop_tx.send(true);
    });
    let (mut stored, mut still) = (0usize, 0usize);
    for f in files {
        let damaged = f
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("damaged-"));
        if damaged {
            println!(
                "{}\tkept: a damaged spool segment (its good records were replayed)",
                f.path.display()
            );
            continue;
        }
        let contents = match read_segment(&f.path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{}\tcannot read: {e}", f.path.display());
                still += f.events;
                continue;
            }
        };
        let mut ok = contents.damage.is_empty();
        for batch in contents.batches {
            let n = batch.len();
            let out = delivery.deliver(batch, &mut stop).await;
            ok &= out.quarantined == 0 && out.returned.is_empty();
            if out.quarantined == 0 && out.returned.is_empty() {
                stored += n;
            } else {
                still += n;
            }
        }
        if ok {
            match remove_quarantined(&f.path) {
                Ok(()) => println!("{}\tstored", f.path.display()),
                Err(e) => eprintln!(
                    "{}\tstored, but cannot delete the file: {e}",
                    f.path.display()
                ),
            }
        } else {
            println!("{}\tstill refused: see its .error file", f.path.display());
        }
    }
    println!("{stored} events stored, {still} still in the quarantine");
    if still == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
