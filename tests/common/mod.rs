//! One helper for every integration test: [`TestApp::builder`] gives the
//! service under test its settings, a fresh database (migrated and seeded
//! with campaigns) and optionally a fault proxy in front of PostgreSQL, then
//! starts it in this process ([`TestApp`]: real HTTP on a random port, a
//! drain report at shutdown) or as the real binary ([`TestProcess`]).
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
pub use proxy::PgProxy;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

pub const AD_UNIT: &str = "1b4e28ba-2fa1-41d2-883f-0016d3cca427";
pub const AD_UNIT_2: &str = "0a4a4f0e-9a35-4c39-a6a1-1f8f26a0c0de";
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

/// A campaign with its account, as seeded.
#[derive(Clone, Copy, Debug)]
pub struct Campaign {
    pub id: Uuid,
    pub account: Uuid,
}

/// A direct adjustment of the config.
type Tune = Box<dyn FnOnce(&mut Config) + Send>;

/// Which database the service under test gets.
enum Database {
    /// A new, empty database on the test server (the default).
    Fresh,
    /// An existing database.
    At(String),
    /// A port where no database listens.
    Unreachable,
}

/// Builds the service under test: its settings, its database (fresh by
/// default, migrated and seeded with the campaigns), optionally a fault proxy
/// in front of PostgreSQL; then starts it in this process ([`start`]) or as
/// the real binary ([`start_process`]).
///
/// [`start`]: TestAppBuilder::start
/// [`start_process`]: TestAppBuilder::start_process
pub struct TestAppBuilder {
    campaigns: Vec<Campaign>,
    database: Database,
    seed: bool,
    settings: Vec<(String, String)>,
    tune: Vec<Tune>,
    proxy: bool,
    spool_dir: Option<std::path::PathBuf>,
    wait_ready: bool,
}

impl TestAppBuilder {
    /// Returns as soon as the service listens, without waiting for the
    /// database (for services that are expected never to reach it).
    pub fn no_wait(mut self) -> Self {
        self.wait_ready = false;
        self
    }

    /// Campaigns to insert (with their accounts) before the service starts.
    pub fn campaigns(mut self, campaigns: &[Campaign]) -> Self {
        self.campaigns = campaigns.to_vec();
        self
    }

    /// Runs on an existing database, migrated and seeded unless [`Self::unseeded`].
    pub fn database(mut self, url: impl Into<String>) -> Self {
        self.database = Database::At(url.into());
        self
    }

    /// Leaves the database as it is: the service migrates it itself.
    pub fn unseeded(mut self) -> Self {
        self.seed = false;
        self
    }

    /// Points the service at a port where no database listens.
    pub fn without_database(mut self) -> Self {
        self.database = Database::Unreachable;
        self.seed = false;
        self
    }

    /// A setting by its environment variable, as an operator sets it.
    pub fn setting(mut self, name: &str, value: impl ToString) -> Self {
        self.settings.push((name.to_string(), value.to_string()));
        self
    }

    /// Adjusts the config directly (in-process services only).
    pub fn config(mut self, f: impl FnOnce(&mut Config) + Send + 'static) -> Self {
        self.tune.push(Box::new(f));
        self
    }

    /// Puts a [`PgProxy`] between the service and PostgreSQL (`app.proxy`).
    pub fn through_proxy(mut self) -> Self {
        self.proxy = true;
        self
    }

    /// The spool directory (default: a new temporary one).
    pub fn spool_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.spool_dir = Some(dir.into());
        self
    }

    /// The database (created, migrated and seeded as asked) and the URL the
    /// service should use (through the proxy when there is one).
    async fn prepare(&mut self) -> (String, String, Option<PgProxy>) {
        let db_url = match &self.database {
            Database::Fresh => fresh_database().await,
            Database::At(url) => url.clone(),
            Database::Unreachable => {
                let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                let port = dead.local_addr().expect("addr").port();
                format!("postgres://postgres@127.0.0.1:{port}/nothing")
            }
        };
        if self.seed {
            prepare_database(&db_url, &self.campaigns).await;
        }
        let proxy = if self.proxy {
            Some(PgProxy::start(server_addr(&db_url)).await)
        } else {
            None
        };
        let service_url = proxy
            .as_ref()
            .map_or_else(|| db_url.clone(), |p| p.url_for(&db_url));
        (db_url, service_url, proxy)
    }

    /// Starts the service in this process and, with a database, waits until
    /// it has migrated and loaded its campaign cache. Test defaults: flush
    /// every 200 ms (100 ms without a database), pool of 5, 10 s shutdown,
    /// `/health` rendered fresh for every request (`VIEW_CACHE_MS=0`).
    pub async fn start(mut self) -> TestApp {
        let (db_url, service_url, proxy) = self.prepare().await;
        let unreachable = matches!(self.database, Database::Unreachable);
        let mut config = Config::with_database_url(service_url);
        config.flush_interval = Duration::from_millis(if unreachable { 100 } else { 200 });
        config.pool_max = 5;
        config.shutdown_timeout = Duration::from_secs(10);
        // Tests read /health right after acting: render it fresh every time.
        config.view_cache = Duration::ZERO;
        if unreachable {
            config.connect_timeout = Duration::from_millis(200);
        }
        let spool_dir = self.spool_dir.take().unwrap_or_else(|| temp_dir("spool"));
        config.spool_dir = spool_dir.clone();
        for (k, v) in &self.settings {
            config
                .set(k, v)
                .unwrap_or_else(|e| panic!("test setting {k}={v}: {e}"));
        }
        for f in self.tune.drain(..) {
            f(&mut config);
        }
        // Without a database `db` is a connection to the admin database.
        let db = connect(&if unreachable {
            admin_url()
        } else {
            db_url.clone()
        })
        .await;
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
        let app = TestApp {
            addr,
            db_url,
            db,
            http: browser(),
            proxy,
            spool_dir,
            stop: Some(stop),
            task: Some(task),
        };
        if !unreachable && self.wait_ready {
            app.wait_ready().await;
        }
        app
    }

    /// Starts the real binary with these settings as its environment (plus
    /// `PORT`, `HOST`, `SPOOL_DIR`, `FLUSH_INTERVAL_MS=100`,
    /// `DB_CONNECT_TIMEOUT_MS=300`, `LOG_LEVEL=warn` unless given) and waits
    /// until it listens. Its stderr goes to a file ([`TestProcess::logs`]).
    pub async fn start_process(mut self) -> TestProcess {
        assert!(
            self.tune.is_empty(),
            "a process takes settings, not config closures"
        );
        let (db_url, service_url, proxy) = self.prepare().await;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let spool_dir = self.spool_dir.take().unwrap_or_else(|| temp_dir("spool"));
        let log = temp_dir("log");
        let mut env: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), service_url),
            ("PORT".into(), port.to_string()),
            ("HOST".into(), "127.0.0.1".into()),
            ("SPOOL_DIR".into(), spool_dir.display().to_string()),
            ("FLUSH_INTERVAL_MS".into(), "100".into()),
            ("DB_CONNECT_TIMEOUT_MS".into(), "300".into()),
            ("LOG_LEVEL".into(), "warn".into()),
            ("VIEW_CACHE_MS".into(), "0".into()),
        ];
        for (k, v) in self.settings.drain(..) {
            env.retain(|(name, _)| *name != k);
            env.push((k, v));
        }
        let child = std::process::Command::new(BIN)
            .envs(env)
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start ingest");
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        TestProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
            db_url,
            http: browser(),
            proxy,
            spool_dir,
            log,
        }
    }
}

/// The `ingest` binary built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_ingest");

/// The address of the PostgreSQL server a URL points at.
pub fn server_addr(url: &str) -> SocketAddr {
    let cfg: tokio_postgres::Config = url.split('?').next().unwrap_or(url).parse().expect("url");
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!("127.0.0.1:{port}").parse().expect("addr")
}

/// The service under test, in this process.
pub struct TestApp {
    pub addr: SocketAddr,
    pub db_url: String,
    pub db: Client,
    pub http: reqwest::Client,
    /// The fault proxy in front of PostgreSQL, when asked for.
    pub proxy: Option<PgProxy>,
    pub spool_dir: std::path::PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<DrainReport>>,
}

impl TestApp {
    pub fn builder() -> TestAppBuilder {
        TestAppBuilder {
            campaigns: Vec::new(),
            database: Database::Fresh,
            seed: true,
            settings: Vec::new(),
            tune: Vec::new(),
            proxy: false,
            spool_dir: None,
            wait_ready: true,
        }
    }

    /// A fresh database seeded with `campaigns`, the service with test defaults.
    pub async fn spawn(campaigns: &[Campaign]) -> TestApp {
        Self::builder().campaigns(campaigns).start().await
    }

    /// Waits until the service has loaded its campaign cache.
    async fn wait_ready(&self) {
        for _ in 0..200 {
            if let Ok(h) = self.health().await {
                if h["pipeline"]["migrated"] == true
                    && h["pipeline"]["partitions_ready"] == true
                    && h["database"] == "connected"
                {
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
        let report = self.stop_and_report().await;
        (report, connect(&self.db_url).await)
    }

    /// Stops the service and returns its drain report only.
    pub async fn shutdown_report(mut self) -> DrainReport {
        self.stop_and_report().await
    }

    async fn stop_and_report(&mut self) -> DrainReport {
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

/// The service under test as the real binary, in a child process.
pub struct TestProcess {
    pub child: std::process::Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    pub db_url: String,
    pub http: reqwest::Client,
    pub proxy: Option<PgProxy>,
    pub spool_dir: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl TestProcess {
    /// Polls `/health` until `done` or `timeout`; returns the last document.
    pub async fn wait_health(
        &self,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_health(&self.http, &self.base, timeout, done).await
    }

    /// POSTs an event query to `path` (`/event/impression`…); returns the status.
    pub async fn post(&self, path_and_query: &str) -> u16 {
        self.http
            .post(format!("{}{path_and_query}", self.base))
            .send()
            .await
            .expect("request")
            .status()
            .as_u16()
    }

    /// Sends SIGTERM and waits for the exit; returns the exit code.
    pub fn sigterm(&mut self) -> Option<i32> {
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
        self.child.wait().expect("wait").code()
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }

    /// What the process wrote to stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TestProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// `metrics_hourly` rows that differ from `events` grouped by (account, ad
/// unit, campaign, hour): net counts from valid events, invalid counts from
/// the rest (the service's default, `IVT_FILTER=on`).
pub async fn aggregate_drift(db: &Client) -> i64 {
    db.query_one(
        "SELECT count(*) FROM (
           SELECT account_id, ad_unit_id, campaign_id, date_trunc('hour', timestamp) AS h,
                  count(*) FILTER (WHERE event_type = 'impression' AND invalid_reason IS NULL) AS i,
                  count(*) FILTER (WHERE event_type = 'click' AND invalid_reason IS NULL) AS c,
                  count(*) FILTER (WHERE event_type = 'impression' AND invalid_reason IS NOT NULL) AS ii,
                  count(*) FILTER (WHERE event_type = 'click' AND invalid_reason IS NOT NULL) AS ic
             FROM events GROUP BY 1, 2, 3, 4) e
         FULL JOIN metrics_hourly m
           ON (m.account_id, m.ad_unit_id, m.campaign_id, m.hour_timestamp) = (e.account_id, e.ad_unit_id, e.campaign_id, e.h)
        WHERE m.id IS NULL OR e.h IS NULL OR m.impressions <> e.i OR m.clicks <> e.c
           OR m.invalid_impressions <> e.ii OR m.invalid_clicks <> e.ic",
        &[],
    )
    .await
    .expect("drift query")
    .get(0)
}

/// Runs `ingest verify` against `db_url` and fails the test unless it exits
/// 0 ("every key matches"): every fault test ends with it.
pub fn assert_verified(db_url: &str) {
    let out = std::process::Command::new(BIN)
        .arg("verify")
        .env("DATABASE_URL", db_url)
        .env("LOG_LEVEL", "error")
        .output()
        .expect("run ingest verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("every key matches"),
        "ingest verify: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A desktop Chrome's User-Agent: what the tests' pixels send, so their
/// events are valid traffic (a request without one is `no_user_agent`).
pub const BROWSER_UA: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 \
     (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";

/// An HTTP client that presents itself as [`BROWSER_UA`].
pub fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .user_agent(BROWSER_UA)
        .build()
        .expect("http client")
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

/// What a load run got back.
#[derive(Debug, Default, Clone, Copy)]
pub struct Load {
    /// 2xx answers: events the service acknowledged.
    pub acknowledged: u64,
    /// 503 answers (overloaded, shutting down).
    pub unavailable: u64,
    /// Requests that got no answer (connection refused or closed).
    pub failed: u64,
    /// Any other status.
    pub other: u64,
}

impl Load {
    /// Sends events (two ad units, 1 in 10 a click) from `clients` keep-alive
    /// clients, each one request at a time, until `stop`.
    pub async fn run(
        base: String,
        camps: Vec<Campaign>,
        clients: usize,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Load {
        use std::sync::atomic::Ordering::SeqCst;
        let mut tasks = Vec::new();
        for t in 0..clients {
            let (base, camps, stop) = (base.clone(), camps.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let http = browser();
                let mut tally = Load::default();
                let mut i = t;
                while !stop.load(SeqCst) {
                    let c = camps[i % camps.len()];
                    let au = if i % 2 == 0 { AD_UNIT } else { AD_UNIT_2 };
                    let path = if i % 10 == 0 {
                        "/event/click"
                    } else {
                        "/event/impression"
                    };
                    let r = http
                        .post(format!("{base}{path}?{}", event_query(c.id, au, None)))
                        .send()
                        .await;
                    match r.map(|r| r.status().as_u16()) {
                        Ok(200..=299) => tally.acknowledged += 1,
                        Ok(503) => tally.unavailable += 1,
                        Ok(_) => tally.other += 1,
                        Err(_) => tally.failed += 1,
                    }
                    i += clients;
                }
                tally
            }));
        }
        let mut total = Load::default();
        for t in tasks {
            let one = t.await.expect("client");
            total.acknowledged += one.acknowledged;
            total.unavailable += one.unavailable;
            total.failed += one.failed;
            total.other += one.other;
        }
        total
    }
}
