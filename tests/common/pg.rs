//! A private PostgreSQL cluster for tests that stop and start the database
//! (outage tests), so they never disturb the shared test server.
//!
//! Uses the binaries in `PGBIN` (set by `scripts/test.sh`), or the Debian
//! default. As root the server runs as OS user `postgres`.

use std::path::PathBuf;
use std::process::Command;

pub struct PgCluster {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    /// Extra server settings (TLS).
    extra: String,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

impl PgCluster {
    fn cmd(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    /// initdb + start on a free port; the database `ingest` exists afterwards.
    pub fn start_new() -> PgCluster {
        Self::start_with(false)
    }

    /// Like `start_new`, with TLS on: a throw-away CA (`ca_cert()`) signs a
    /// server certificate for IP 127.0.0.1 (not for the name `localhost`).
    pub fn start_new_with_tls() -> PgCluster {
        Self::start_with(true)
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    fn make_certs(dir: &std::path::Path) -> String {
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=ingest-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("san");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "server.crt",
            "-extfile",
            "san.ext",
        ]);
        if is_root() {
            let ok = Command::new("chown")
                .arg("postgres:")
                .arg(dir.join("server.key"))
                .arg(dir.join("server.crt"))
                .status()
                .expect("chown");
            assert!(ok.success());
        }
        let ok = Command::new("chmod")
            .arg("600")
            .arg(dir.join("server.key"))
            .status()
            .expect("chmod");
        assert!(ok.success());
        format!(
            " -c ssl=on -c ssl_cert_file='{}' -c ssl_key_file='{}'",
            dir.join("server.crt").display(),
            dir.join("server.key").display()
        )
    }

    fn start_with(tls: bool) -> PgCluster {
        let bin = PathBuf::from(
            std::env::var("PGBIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
        );
        let dir = super::temp_dir("pg");
        std::fs::create_dir_all(&dir).expect("cluster dir");
        if is_root() {
            let ok = Command::new("chown")
                .arg("postgres:")
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(ok.success(), "chown postgres {dir:?}");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let extra = if tls {
            Self::make_certs(&dir)
        } else {
            String::new()
        };
        let c = PgCluster {
            dir,
            port,
            bin,
            extra,
        };
        let out = c
            .cmd("initdb")
            .args(["-D"])
            .arg(c.dir.join("data"))
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        c.start();
        let out = Command::new(c.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &c.port.to_string(),
                "-U",
                "postgres",
                "ingest",
            ])
            .output()
            .expect("createdb");
        assert!(
            out.status.success(),
            "createdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        c
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/ingest", self.port)
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A streaming-replication standby of `primary` (`pg_basebackup -R`),
    /// started on its own port. Make it synchronous on the primary with
    /// `synchronous_standby_names`, so a commit the service saw acknowledged
    /// is on both.
    pub fn standby_of(primary: &PgCluster) -> PgCluster {
        let dir = super::temp_dir("pg-standby");
        std::fs::create_dir_all(&dir).expect("standby dir");
        if is_root() {
            let ok = Command::new("chown")
                .arg("postgres:")
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(ok.success());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let c = PgCluster {
            dir,
            port,
            bin: primary.bin.clone(),
            extra: String::new(),
        };
        let out = c
            .cmd("pg_basebackup")
            .arg("-D")
            .arg(c.dir.join("data"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "--checkpoint=fast",
            ])
            .output()
            .expect("pg_basebackup");
        assert!(
            out.status.success(),
            "pg_basebackup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        c.start();
        c
    }

    /// Promotes a standby to primary (waits until it accepts writes).
    pub fn promote(&self) {
        let out = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "promote"])
            .output()
            .expect("pg_ctl promote");
        assert!(
            out.status.success(),
            "pg_ctl promote: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn start(&self) {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories='{}' -c fsync=off{}",
            self.port,
            self.dir.display(),
            self.extra
        );
        let out = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("postgres.log"))
            .args(["-w", "-t", "60", "-o", &opts, "start"])
            .output()
            .expect("pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl stop -m immediate`: the server dies without a clean shutdown.
    pub fn stop_immediate(&self) {
        let out = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output()
            .expect("pg_ctl stop");
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
