//! One helper for every integration test: a fresh database, the real service
//! on a random port, a real HTTP client, and a way to stop the service and
//! read its drain report.
//!
//! Needs `TEST_DATABASE_URL` (an admin connection to a PostgreSQL server);
//! `scripts/test.sh` starts a throw-away cluster and sets it.

#![allow(dead_code)]

pub mod pg;
pub mod proxy;

use std::net::SocketAddr;
use std::time::Duration;

use ingest::config::Config;
use ingest::DrainReport;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

pub const AD_UNIT: &str = "1b4e28ba-2fa1-41d2-883f-0016d3cca427";
pub const CREATIVE: &str = "6f1a9e0c-3d2b-4c5e-9f7a-8b6c5d4e3f21";

pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .expect("TEST_DATABASE_URL is not set: run the suite with scripts/test.sh, which starts a throw-away PostgreSQL")
}

/// Connects (in plain text: the test's own view of the database; TLS
/// parameters of the service's URL are dropped) and drives the connection.
pub async fn connect(url: &str) -> Client {
    let url = url.split('?').next().unwrap_or(url);
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Creates an empty database and returns its URL.
pub async fn fresh_database() -> String {
    let admin = admin_url();
    let name = format!("t_{}", Uuid::new_v4().simple());
    connect(&admin)
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    match admin.rfind('/') {
        Some(i) => format!("{}/{}", &admin[..i], name),
        None => panic!("TEST_DATABASE_URL has no database part: {admin}"),
    }
}

/// The service under test.
pub struct TestApp {
    pub addr: SocketAddr,
    pub db_url: String,
    pub db: Client,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<DrainReport>>,
}

/// A campaign with its account, as seeded.
#[derive(Clone, Copy, Debug)]
pub struct Campaign {
    pub id: Uuid,
    pub account: Uuid,
}

impl TestApp {
    /// Fresh database, migrated, `campaigns` seeded, service started with test
    /// defaults (flush interval 200 ms) adjusted by `tune`.
    pub async fn spawn_with(campaigns: &[Campaign], tune: impl FnOnce(&mut Config)) -> TestApp {
        let db_url = fresh_database().await;
        Self::spawn_on(db_url, campaigns, tune).await
    }

    /// Like `spawn_with`, on an existing (empty) database.
    pub async fn spawn_on(
        db_url: String,
        campaigns: &[Campaign],
        tune: impl FnOnce(&mut Config),
    ) -> TestApp {
        let mut config = Config::with_database_url(db_url.clone());
        config.flush_interval = Duration::from_millis(200);
        config.pool_max = 5;
        config.shutdown_timeout = Duration::from_secs(10);
        config.spool_dir = temp_dir("spool");
        tune(&mut config);
        prepare_database(&db_url, campaigns).await;
        let db = connect(&db_url).await;
        Self::start(db_url, db, config).await
    }

    /// Like `spawn_with`, with the test defaults unchanged.
    pub async fn spawn(campaigns: &[Campaign]) -> TestApp {
        Self::spawn_with(campaigns, |_| {}).await
    }

    /// The service on an existing database (no seeding, the service migrates it).
    pub async fn start_on(db_url: String, tune: impl FnOnce(&mut Config)) -> TestApp {
        let mut config = Config::with_database_url(db_url.clone());
        config.flush_interval = Duration::from_millis(200);
        config.pool_max = 5;
        config.spool_dir = temp_dir("spool");
        tune(&mut config);
        let db = connect(&db_url).await;
        Self::start(db_url, db, config).await
    }

    async fn start(db_url: String, db: Client, config: Config) -> TestApp {
        let app = Self::launch(db_url, db, config).await;
        app.wait_ready().await;
        app
    }

    /// Binds a random port and runs the service on it.
    async fn launch(db_url: String, db: Client, config: Config) -> TestApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            ingest::serve(config, listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("serve")
        });
        TestApp {
            addr,
            db_url,
            db,
            http: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The service pointed at a port where no database listens.
    pub async fn spawn_without_database(tune: impl FnOnce(&mut Config)) -> TestApp {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = dead.local_addr().expect("addr").port();
        drop(dead);
        let db_url = format!("postgres://postgres@127.0.0.1:{port}/nothing");
        let mut config = Config::with_database_url(db_url.clone());
        config.connect_timeout = Duration::from_millis(200);
        config.flush_interval = Duration::from_millis(100);
        config.spool_dir = temp_dir("spool");
        tune(&mut config);
        // Nothing to query: `db` is a connection to the admin database.
        let db = connect(&admin_url()).await;
        Self::launch(db_url, db, config).await
    }

    /// Waits until the service has loaded its campaign cache.
    async fn wait_ready(&self) {
        for _ in 0..200 {
            if let Ok(h) = self.health().await {
                if h["pipeline"]["migrated"] == true && h["database"] == "connected" {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("service did not become ready");
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    pub async fn health(&self) -> Result<serde_json::Value, reqwest::Error> {
        self.http
            .get(self.url("/health"))
            .send()
            .await?
            .json()
            .await
    }

    /// POSTs an event and returns the status code.
    pub async fn post(&self, path_and_query: &str) -> u16 {
        self.http
            .post(self.url(path_and_query))
            .send()
            .await
            .expect("request")
            .status()
            .as_u16()
    }

    /// POSTs a valid event (`kind`: "impression" or "click") for `campaign`; returns the status.
    pub async fn post_event(&self, kind: &str, campaign: Uuid) -> u16 {
        self.post(&format!(
            "/event/{kind}?{}",
            event_query(campaign, AD_UNIT, None)
        ))
        .await
    }

    /// Stops the service (as SIGTERM would) and returns its drain report.
    pub async fn shutdown(mut self) -> (DrainReport, Client) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let report = self
            .task
            .take()
            .expect("running")
            .await
            .expect("serve task");
        (report, connect(&self.db_url).await)
    }

    /// Stops the service and returns its drain report only.
    pub async fn shutdown_report(mut self) -> DrainReport {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task
            .take()
            .expect("running")
            .await
            .expect("serve task")
    }

    /// `SELECT count(*)` of a table.
    pub async fn count(&self, table: &str) -> i64 {
        count(&self.db, table).await
    }

    /// Polls until `table` has at least `n` rows or `timeout` passes; returns the count.
    pub async fn wait_rows(&self, table: &str, n: i64, timeout: Duration) -> i64 {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let c = self.count(table).await;
            if c >= n || tokio::time::Instant::now() >= until {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub async fn count(db: &Client, table: &str) -> i64 {
    db.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0)
}

/// Migrates `db_url` and inserts `campaigns`.
pub async fn prepare_database(db_url: &str, campaigns: &[Campaign]) {
    let pool = ingest::db::pool(&Config::with_database_url(db_url)).expect("pool");
    ingest::db::migrate(&pool).await.expect("migrate");
    pool.close();
    let db = connect(db_url).await;
    for c in campaigns {
        db.execute(
            "INSERT INTO campaigns (id, account_id) VALUES ($1, $2)",
            &[&c.id, &c.account],
        )
        .await
        .expect("seed campaign");
    }
}

/// Polls `/health` at `base` until `done(health)` or `timeout`; returns the last document.
pub async fn wait_health(
    http: &reqwest::Client,
    base: &str,
    timeout: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let until = tokio::time::Instant::now() + timeout;
    let mut last = serde_json::Value::Null;
    loop {
        if let Ok(r) = http.get(format!("{base}/health")).send().await {
            if let Ok(h) = r.json::<serde_json::Value>().await {
                if done(&h) {
                    return h;
                }
                last = h;
            }
        }
        if tokio::time::Instant::now() >= until {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `metrics_hourly` rows that differ from `events` grouped by (account, ad unit, campaign, hour).
pub async fn aggregate_drift(db: &Client) -> i64 {
    db.query_one(
        "SELECT count(*) FROM (
           SELECT account_id, ad_unit_id, campaign_id, date_trunc('hour', timestamp) AS h,
                  count(*) FILTER (WHERE event_type = 'impression') AS i,
                  count(*) FILTER (WHERE event_type = 'click') AS c
             FROM events GROUP BY 1, 2, 3, 4) e
         FULL JOIN metrics_hourly m
           ON (m.account_id, m.ad_unit_id, m.campaign_id, m.hour_timestamp) = (e.account_id, e.ad_unit_id, e.campaign_id, e.h)
        WHERE m.id IS NULL OR e.h IS NULL OR m.impressions <> e.i OR m.clicks <> e.c",
        &[],
    )
    .await
    .expect("drift query")
    .get(0)
}

/// `n` campaigns spread over `accounts` accounts.
pub fn campaigns(n: usize, accounts: usize) -> Vec<Campaign> {
    let accts: Vec<Uuid> = (0..accounts.max(1)).map(|_| Uuid::new_v4()).collect();
    (0..n)
        .map(|i| Campaign {
            id: Uuid::new_v4(),
            account: accts[i % accts.len()],
        })
        .collect()
}

/// A valid event query for `campaign`.
pub fn event_query(campaign: Uuid, ad_unit: &str, ts_ms: Option<i64>) -> String {
    let mut q = format!(
        "ad_unit_id={ad_unit}&campaign_id={campaign}&creative_id={CREATIVE}&page_url=https%3A%2F%2Fnews.example.com%2Fa%3Fx%3D1"
    );
    if let Some(ts) = ts_ms {
        q.push_str(&format!("&timestamp={ts}"));
    }
    q
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// A fresh, not yet existing directory under the system temp dir.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("ingest-test-{tag}-{}", Uuid::new_v4().simple()))
}
