//! Harness for fresco's end-to-end scenarios: each test gets its own PostgreSQL database, its own S3 test
//! server (s3s-fs) and real `fresco` processes on loopback ports. Processes are killed when dropped.

#![allow(clippy::unwrap_used)] // test harness: failing loudly is the point

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const ACCESS_KEY: &str = "fresco-test";
pub const SECRET_KEY: &str = "fresco-test-secret";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The `fresco` binary: $FRESCO_BIN, else target/debug/fresco next to this test executable.
pub fn fresco_bin() -> PathBuf {
    if let Ok(p) = std::env::var("FRESCO_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("fresco");
    assert!(bin.is_file(), "{} is missing: run `cargo build -p fresco-cli` first (scripts/test does)", bin.display());
    bin
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listened on port {port} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A fresh database on the test PostgreSQL server, dropped afterwards.
pub struct Database {
    admin_url: String,
    name: String,
    pub url: String,
}

impl Database {
    pub fn create() -> Self {
        let admin_url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let name = format!("fresco_e2e_{}", uuid::Uuid::new_v4().simple());
        runtime().block_on(async {
            let pool = sqlx::PgPool::connect(&admin_url).await.expect("PostgreSQL is needed for the end-to-end tests (DATABASE_URL)");
            sqlx::query(&format!("CREATE DATABASE {name}")).execute(&pool).await.unwrap();
        });
        let base = admin_url.rsplit_once('/').map(|(b, _)| b.to_string()).unwrap();
        let url = format!("{base}/{name}");
        Self { admin_url, name, url }
    }

    pub fn query_i64(&self, sql: &str) -> i64 {
        runtime().block_on(async {
            let pool = sqlx::PgPool::connect(&self.url).await.unwrap();
            let v: i64 = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
            pool.close().await;
            v
        })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        runtime().block_on(async move {
            if let Ok(pool) = sqlx::PgPool::connect(&url).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&pool).await;
            }
        });
    }
}

/// A child process with its output in a log file; SIGKILLed on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, logs: &Path) -> Self {
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdout(file.try_clone().unwrap()).stderr(file).stdin(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self { name: name.to_string(), child, log }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY-free: libc::kill is a plain syscall wrapper; `pid` is our own child.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// Waits for exit; returns the exit code (None if killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "{} did not exit within {timeout:?}; log:\n{}", self.name, self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The S3 test server on a loopback port, storing into a temp dir, with one bucket.
pub struct S3 {
    pub root: PathBuf,
    pub port: u16,
    pub bucket: String,
    pub proc: Option<Proc>,
}

impl S3 {
    pub fn start(root: &Path, logs: &Path) -> Self {
        let bucket = "fresco".to_string();
        std::fs::create_dir_all(root.join(&bucket)).unwrap();
        let mut s = Self { root: root.to_path_buf(), port: free_port(), bucket, proc: None };
        s.restart(logs);
        s
    }

    pub fn restart(&mut self, logs: &Path) {
        let bin = std::env::var("FRESCO_S3S_FS").unwrap_or_else(|_| "s3s-fs".into());
        let mut cmd = Command::new(bin);
        cmd.args(["--host", "127.0.0.1", "--port", &self.port.to_string(), "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.root);
        self.proc = Some(Proc::spawn("s3s-fs", cmd, logs));
        wait_for_port(self.port, Duration::from_secs(20));
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Environment a worker needs to write to this server through object_store.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
        ]
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// Objects under `prefix/job` as (file name, bytes), read from the server's storage directory.
    pub fn objects(&self, prefix: &str, job: &str) -> Vec<(String, Vec<u8>)> {
        let dir = self.root.join(&self.bucket).join(prefix).join(job);
        let mut out: Vec<(String, Vec<u8>)> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd
                .flatten()
                .filter(|e| e.path().is_file())
                .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
                .collect(),
            Err(_) => Vec::new(),
        };
        out.sort();
        out
    }
}

/// A model folder for workers: holds a link to the tiny SD 1.5 fixture.
pub fn models_dir(tmp: &Path) -> PathBuf {
    let dir = tmp.join("models");
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("tiny-sd15");
    if !link.exists() {
        std::os::unix::fs::symlink(repo_root().join("tests/fixtures/models/tiny-sd15"), &link).unwrap();
    }
    dir
}

pub struct Cluster {
    pub tmp: tempfile::TempDir,
    pub db: Database,
    pub s3: S3,
    pub port: u16,
    pub coordinator: Option<Proc>,
    pub extra_args: Vec<String>,
}

impl Cluster {
    pub fn start(extra_args: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let logs = tmp.path().join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let db = Database::create();
        let s3 = S3::start(&tmp.path().join("s3"), &logs);
        let mut c =
            Self { tmp, db, s3, port: free_port(), coordinator: None, extra_args: extra_args.iter().map(|s| s.to_string()).collect() };
        c.start_coordinator();
        c
    }

    pub fn logs(&self) -> PathBuf {
        self.tmp.path().join("logs")
    }

    pub fn start_coordinator(&mut self) {
        let mut cmd = Command::new(fresco_bin());
        cmd.args(["coordinator", "--listen", &format!("127.0.0.1:{}", self.port), "--database-url", &self.db.url])
            .args(["--lease-ttl-secs", "4", "--heartbeat-secs", "1", "--sweep-secs", "0.5"])
            .args(&self.extra_args)
            .env("FRESCO_LOG", "info");
        self.coordinator = Some(Proc::spawn("coordinator", cmd, &self.logs()));
        wait_for_port(self.port, Duration::from_secs(30));
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn worker(&self, name: &str) -> Proc {
        self.worker_with(name, &[])
    }

    pub fn worker_with(&self, name: &str, extra: &[&str]) -> Proc {
        let mut cmd = Command::new(fresco_bin());
        cmd.args(["worker", "--coordinator", &self.url(), "--models"])
            .arg(models_dir(self.tmp.path()))
            .args(["--name", name, "--max-batch", "4"])
            .args(extra)
            .envs(self.s3.env())
            .env("FRESCO_LOG", "info");
        Proc::spawn(name, cmd, &self.logs())
    }

    /// Runs a client command and returns its stdout.
    pub fn client(&self, args: &[&str]) -> String {
        let out = Command::new(fresco_bin()).args(args).args(["--coordinator", &self.url()]).output().unwrap();
        assert!(out.status.success(), "fresco {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn write_prompts(&self, n: usize) -> PathBuf {
        let path = self.tmp.path().join(format!("prompts-{n}.txt"));
        let colors = ["red", "green", "blue", "yellow", "purple", "orange"];
        let shapes = ["circle", "square", "triangle"];
        let text: String = (0..n).map(|i| format!("a {} {} number {i}\n", colors[i % 6], shapes[i % 3])).collect();
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn submit(&self, prompts: &Path, prefix: &str, steps: u32) -> String {
        let out = self.client(&[
            "submit",
            prompts.to_str().unwrap(),
            "--model",
            "tiny-sd15",
            "--output",
            &self.s3.url(prefix),
            "--steps",
            &steps.to_string(),
            "--seed",
            "42",
            "--batch-size",
            "2",
        ]);
        out.trim().to_string()
    }

    pub fn status(&self, job: &str) -> Value {
        serde_json::from_str(&self.client(&["status", job, "--json"])).unwrap()
    }

    /// Polls until the job ends; returns its final status.
    pub fn wait_done(&self, job: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(out) = Command::new(fresco_bin()).args(["status", job, "--json", "--coordinator", &self.url()]).output() {
                if out.status.success() {
                    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                    if ["succeeded", "failed", "cancelled"].contains(&v["state"].as_str().unwrap_or("")) {
                        return v;
                    }
                }
            }
            assert!(Instant::now() < deadline, "job {job} did not finish within {timeout:?}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits until at least `n` prompts of the job succeeded.
    pub fn wait_progress(&self, job: &str, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.status(job)["succeeded"].as_u64().unwrap_or(0) < n {
            assert!(Instant::now() < deadline, "job {job} made no progress within {timeout:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Every prompt has exactly one image and one sidecar, and no other object exists.
pub fn assert_one_object_pair_per_prompt(objects: &[(String, Vec<u8>)], n: usize) {
    let names: Vec<&str> = objects.iter().map(|(n, _)| n.as_str()).collect();
    let want: Vec<String> = (0..n).flat_map(|i| [format!("{i:08}.json"), format!("{i:08}.png")]).collect();
    assert_eq!(names, want.iter().map(String::as_str).collect::<Vec<_>>());
}

/// Images (not sidecars: those record the worker and timings) equal pairwise.
pub fn assert_same_images(a: &[(String, Vec<u8>)], b: &[(String, Vec<u8>)]) {
    let images = |v: &[(String, Vec<u8>)]| v.iter().filter(|(n, _)| n.ends_with(".png")).cloned().collect::<Vec<_>>();
    let (a, b) = (images(a), images(b));
    assert_eq!(a.len(), b.len());
    for ((na, ba), (nb, bb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ba == bb, "{na} differs from the undisturbed run's");
    }
}

/// A PostgreSQL server of the test's own (initdb in a temp dir, its own port), so a test may restart it.
pub struct OwnPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

impl OwnPostgres {
    fn pg(&self, tool: &str) -> Command {
        // initdb and the server refuse to run as root.
        let mut cmd = if unsafe_is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join(tool));
            c
        } else {
            Command::new(self.bin.join(tool))
        };
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        cmd
    }

    pub fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|rd| rd.flatten().map(|e| e.path().join("bin")).filter(|p| p.join("initdb").is_file()).max())
            .expect("PostgreSQL server binaries (/usr/lib/postgresql/*/bin) are needed");
        let dir = tempfile::Builder::new().prefix("fresco-pg").tempdir().unwrap();
        if unsafe_is_root() {
            Command::new("chown").args(["-R", "postgres"]).arg(dir.path()).status().unwrap();
        }
        let pg = Self { dir, bin, port: free_port() };
        let data = pg.dir.path().join("data");
        assert!(pg.pg("initdb").args(["-U", "postgres", "-A", "trust", "-D"]).arg(&data).status().unwrap().success(), "initdb failed");
        pg.ctl(&["start"]);
        pg
    }

    fn ctl(&self, action: &[&str]) {
        let opts = format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", self.port, self.dir.path().display());
        let ok = self
            .pg("pg_ctl")
            .args(["-D"])
            .arg(self.dir.path().join("data"))
            .args(["-l"])
            .arg(self.dir.path().join("log"))
            .args(["-o", &opts, "-w", "-m", "fast"])
            .args(action)
            .status()
            .unwrap()
            .success();
        assert!(ok, "pg_ctl {action:?} failed: {}", std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default());
    }

    pub fn restart(&self) {
        self.ctl(&["restart"]);
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = self.pg("pg_ctl").args(["-D"]).arg(self.dir.path().join("data")).args(["-m", "immediate", "stop"]).status();
    }
}

fn unsafe_is_root() -> bool {
    // SAFETY-free: geteuid has no preconditions.
    #[allow(unsafe_code)]
    let uid = unsafe { libc::geteuid() };
    uid == 0
}
