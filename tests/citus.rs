//! Citus-ready: every table the service writes can be distributed (every
//! primary and unique key contains the distribution column: `account_id`,
//! or `event_id` for the idempotency table) or is declared a reference
//! table, as `deploy/citus/setup.sql` does. Checked against the
//! schema the migrations build; Citus itself is not installed here.

mod common;

use std::collections::BTreeSet;

use common::*;

/// `create_distributed_table('t', …)` and `create_reference_table('t')` calls in setup.sql.
fn declared() -> (BTreeSet<String>, BTreeSet<String>, String) {
    let sql = std::fs::read_to_string("deploy/citus/setup.sql").expect("deploy/citus/setup.sql");
    let tables = |call: &str| {
        sql.lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .filter_map(|l| l.split(call).nth(1))
            .filter_map(|rest| rest.split('\'').nth(1))
            .map(str::to_string)
            .collect::<BTreeSet<_>>()
    };
    (
        tables("create_distributed_table("),
        tables("create_reference_table("),
        sql,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_table_is_distributable_on_account_id_or_a_reference_table() {
    let db_url = fresh_database().await;
    prepare_database(&db_url, &[]).await;
    let db = connect(&db_url).await;
    let (distributed, reference, sql) = declared();
    assert_eq!(
        distributed,
        BTreeSet::from([
            "event_ids".to_string(),
            "events".to_string(),
            "metrics_hourly".to_string()
        ])
    );
    let column = |t: &str| {
        if t == "event_ids" {
            "event_id"
        } else {
            "account_id"
        }
    };
    for table in &distributed {
        let col = column(table);
        assert!(
            sql.contains(&format!("create_distributed_table('{table}', '{col}'")),
            "{table} is distributed on {col}"
        );
    }
    assert!(
        sql.contains("colocate_with => 'events'"),
        "metrics_hourly is co-located with events"
    );
    // Every table the service writes or reads is declared one way or the other.
    let written = [
        "events",
        "event_ids",
        "metrics_hourly",
        "rejected_events",
        "ingest_batches",
        "campaigns",
    ];
    for t in written {
        assert!(
            distributed.contains(t) || reference.contains(t),
            "{t} is neither distributed nor a reference table in setup.sql"
        );
    }
    // The rule Citus enforces: the distribution column in every unique key of a distributed table.
    for t in &distributed {
        let col = column(t);
        let keys = db
            .query(
                "SELECT i.indexrelid::regclass::text, \
                        bool_or(a.attname = $2) \
                   FROM pg_index i \
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                  WHERE i.indrelid = $1::text::regclass AND i.indisunique \
                  GROUP BY 1",
                &[&t, &col],
            )
            .await
            .expect("unique keys");
        assert!(!keys.is_empty(), "{t} has a primary key");
        for k in keys {
            let (name, has): (String, bool) = (k.get(0), k.get(1));
            assert!(has, "unique key {name} of {t} lacks {col}");
        }
        let not_null: bool = db
            .query_one(
                "SELECT attnotnull FROM pg_attribute WHERE attrelid = $1::text::regclass AND attname = $2",
                &[&t, &col],
            )
            .await
            .expect("distribution column")
            .get(0);
        assert!(not_null, "{t}.{col} is NOT NULL");
    }
    // events is partitioned (time), as Citus supports for distributed tables.
    let kind: String = db
        .query_one(
            "SELECT relkind::text FROM pg_class WHERE oid = 'events'::regclass",
            &[],
        )
        .await
        .expect("kind")
        .get(0);
    assert_eq!(kind, "p");
}
