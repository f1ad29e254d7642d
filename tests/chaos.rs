//! The chaos scenario: PostgreSQL, the S3 test server, two coordinators on one database and three workers,
//! one 2,000-prompt job, while workers are SIGKILLed (five times, each restarted), a coordinator is
//! SIGKILLed and restarted, PostgreSQL restarts, and the S3 server is down for 20 seconds. Then an
//! invariant checker asserts that nothing was lost or duplicated, and prints each fault's recovery time.
#![allow(clippy::unwrap_used)] // test helpers: failing loudly is the point

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fresco_e2e::*;

const PROMPTS: usize = 2000;
const STEPS: &str = "4";
const SWEEP_SECS: f64 = 0.5;
const MAX_ATTEMPTS: i64 = 5;
const MAX_LOST: i64 = 5;

struct Coordinators {
    ports: [u16; 2],
    procs: [Option<Proc>; 2],
    db_url: String,
}

impl Coordinators {
    fn start(&mut self, i: usize, logs: &std::path::Path) {
        let mut cmd = Command::new(fresco_bin());
        cmd.args(["coordinator", "--listen", &format!("127.0.0.1:{}", self.ports[i]), "--database-url", &self.db_url])
            .args(["--lease-ttl-secs", "4", "--heartbeat-secs", "1", "--sweep-secs", &SWEEP_SECS.to_string()])
            .args(["--max-attempts", &MAX_ATTEMPTS.to_string(), "--max-lost", &MAX_LOST.to_string()])
            .env("FRESCO_LOG", "info");
        self.procs[i] = Some(Proc::spawn(&format!("coordinator-{i}-{}", now_ms()), cmd, logs));
        wait_for_port(self.ports[i], Duration::from_secs(30));
    }

    fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[i])
    }
}

fn now_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
}

fn start_worker(i: usize, coordinators: &Coordinators, s3: &S3, models: &std::path::Path, logs: &std::path::Path) -> Proc {
    let mut cmd = Command::new(fresco_bin());
    cmd.args(["worker", "--coordinator", &coordinators.url(i % 2), "--models"])
        .arg(models)
        .args(["--name", &format!("chaos-worker-{i}"), "--max-batch", "8"])
        .envs(s3.env())
        .env("FRESCO_LOG", "info");
    Proc::spawn(&format!("worker-{i}-{}", now_ms()), cmd, logs)
}

/// What the monitor saw: completed prompts over time and the worst overdue lease.
#[derive(Default)]
struct Observed {
    done: u64,
    worst_overdue_secs: f64,
}

fn monitor(db_url: String, job: String, stop: Arc<AtomicBool>, seen: Arc<Mutex<Observed>>) {
    let rt = runtime();
    rt.block_on(async move {
        let mut up_since: Option<Instant> = None;
        while !stop.load(Ordering::Relaxed) {
            let sample = async {
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db_url).await?;
                let done: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM outputs WHERE job_id = '{job}'")).fetch_one(&mut conn).await?;
                let overdue: f64 = sqlx::query_scalar(
                    "SELECT COALESCE(EXTRACT(EPOCH FROM max(now() - lease_expires_at)), 0)::FLOAT8 FROM tasks WHERE state = 'leased' AND lease_expires_at < now()",
                )
                .fetch_one(&mut conn)
                .await?;
                Ok::<_, sqlx::Error>((done, overdue))
            };
            match tokio::time::timeout(Duration::from_secs(2), sample).await {
                Ok(Ok((done, overdue))) => {
                    let up = *up_since.get_or_insert_with(Instant::now);
                    let mut s = seen.lock().unwrap();
                    s.done = done as u64;
                    // Sweeps cannot run while the database is down; judge only once it has been back for
                    // two sweep intervals.
                    if up.elapsed() > Duration::from_secs_f64(2.0 * SWEEP_SECS) {
                        s.worst_overdue_secs = s.worst_overdue_secs.max(overdue);
                    }
                }
                _ => up_since = None,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

/// Seconds from `since` until the job completes `step` more prompts than it had at `since`.
fn recovery(seen: &Mutex<Observed>, since: Instant, step: u64) -> f64 {
    let start = seen.lock().unwrap().done;
    loop {
        let now = seen.lock().unwrap().done;
        if now >= start + step || now as usize >= PROMPTS {
            return since.elapsed().as_secs_f64();
        }
        assert!(since.elapsed() < Duration::from_secs(180), "no progress for 180 s after a fault");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn chaos_loses_nothing_and_duplicates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let prompts = tmp.path().join("prompts.txt");
    let colors = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"];
    let shapes = ["circle", "square", "triangle"];
    std::fs::write(&prompts, (0..PROMPTS).map(|i| format!("a {} {} number {i}\n", colors[i % 8], shapes[i % 3])).collect::<String>())
        .unwrap();
    let models = models_dir(tmp.path());

    // The undisturbed run: the same job through `fresco run` (same worker code, same batches).
    let reference_dir = tmp.path().join("reference");
    let started = Instant::now();
    let r = Command::new(fresco_bin())
        .args(["run", prompts.to_str().unwrap(), "--model"])
        .arg(models.join("tiny-sd15"))
        .args([
            "--out",
            reference_dir.to_str().unwrap(),
            "--steps",
            STEPS,
            "--guidance",
            "0",
            "--seed",
            "42",
            "--batch-size",
            "8",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    println!("undisturbed run: {PROMPTS} images in {:.1}s", started.elapsed().as_secs_f64());

    let pg = OwnPostgres::start();
    let mut s3 = S3::start(&tmp.path().join("s3"), &logs);
    let mut coordinators = Coordinators { ports: [free_port(), free_port()], procs: [None, None], db_url: pg.url() };
    coordinators.start(0, &logs);
    coordinators.start(1, &logs);
    let mut workers: Vec<Proc> = (0..3).map(|i| start_worker(i, &coordinators, &s3, &models, &logs)).collect();

    let submit = Command::new(fresco_bin())
        .args([
            "submit",
            prompts.to_str().unwrap(),
            "--model",
            "tiny-sd15",
            "--output",
            &s3.url("chaos"),
            "--steps",
            STEPS,
            "--guidance",
            "0",
        ])
        .args(["--seed", "42", "--batch-size", "8", "--coordinator", &coordinators.url(0)])
        .output()
        .unwrap();
    assert!(submit.status.success(), "{}", String::from_utf8_lossy(&submit.stderr));
    let job = String::from_utf8(submit.stdout).unwrap().trim().to_string();

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Observed::default()));
    let mon = {
        let (url, job, stop, seen) = (pg.url(), job.clone(), stop.clone(), seen.clone());
        std::thread::spawn(move || monitor(url, job, stop, seen))
    };
    let wait_for = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while seen.lock().unwrap().done < n {
            assert!(Instant::now() < deadline, "no progress");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for(40);

    let mut report = Vec::new();
    for k in 0..5 {
        let i = (k * 7 + 1) % 3;
        workers[i].kill9();
        let t = Instant::now();
        workers[i] = start_worker(i, &coordinators, &s3, &models, &logs);
        report.push((format!("SIGKILL worker {i} (restarted)"), recovery(&seen, t, 16)));
    }
    coordinators.procs[0].as_mut().unwrap().kill9();
    std::thread::sleep(Duration::from_secs(1));
    coordinators.start(0, &logs);
    let t = Instant::now();
    report.push(("SIGKILL coordinator 0 (restarted after 1 s)".into(), recovery(&seen, t, 16)));
    pg.restart();
    let t = Instant::now();
    report.push(("PostgreSQL restart".into(), recovery(&seen, t, 16)));
    s3.proc.as_mut().unwrap().kill9();
    std::thread::sleep(Duration::from_secs(20));
    s3.restart(&logs);
    let t = Instant::now();
    report.push(("S3 server down 20 s".into(), recovery(&seen, t, 16)));
    let progress_after_faults = seen.lock().unwrap().done;
    assert!((progress_after_faults as usize) < PROMPTS, "the job finished before every fault was injected; make it longer");

    // Let it finish.
    let deadline = Instant::now() + Duration::from_secs(600);
    while (seen.lock().unwrap().done as usize) < PROMPTS {
        assert!(Instant::now() < deadline, "job did not finish");
        std::thread::sleep(Duration::from_millis(250));
    }
    stop.store(true, Ordering::Relaxed);
    mon.join().unwrap();

    println!("fault recovery (injection → 16 more images):");
    for (fault, secs) in &report {
        println!("  {fault:<45} {secs:>6.1} s");
    }

    // Invariants.
    let db = |sql: &str| -> i64 {
        runtime().block_on(async {
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&pg.url()).await.unwrap();
            sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap()
        })
    };
    let state = runtime().block_on(async {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&pg.url()).await.unwrap();
        sqlx::query_scalar::<_, String>(&format!("SELECT state FROM jobs WHERE id = '{job}'")).fetch_one(&mut conn).await.unwrap()
    });
    // The last completion and the job's finalisation are separate statements: give it a moment.
    let state = if state == "running" {
        std::thread::sleep(Duration::from_secs(1));
        runtime().block_on(async {
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&pg.url()).await.unwrap();
            sqlx::query_scalar::<_, String>(&format!("SELECT state FROM jobs WHERE id = '{job}'")).fetch_one(&mut conn).await.unwrap()
        })
    } else {
        state
    };
    assert_eq!(state, "succeeded");
    assert_eq!(db(&format!("SELECT count(*) FROM outputs WHERE job_id = '{job}'")), PROMPTS as i64, "one output row per prompt");
    assert_eq!(db(&format!("SELECT count(DISTINCT idx) FROM outputs WHERE job_id = '{job}'")), PROMPTS as i64);
    let max_failures = db("SELECT COALESCE(max(failures), 0)::BIGINT FROM tasks");
    let max_lost = db("SELECT COALESCE(max(lost), 0)::BIGINT FROM tasks");
    assert!(max_failures < MAX_ATTEMPTS && max_lost < MAX_LOST, "attempts exceeded: failures {max_failures}, lost {max_lost}");
    let worst = seen.lock().unwrap().worst_overdue_secs;
    println!(
        "worst lease overdue while the database was up: {worst:.2} s (limit {:.1} s); max failures {max_failures}, max lost {max_lost}",
        2.0 * SWEEP_SECS
    );
    assert!(worst <= 2.0 * SWEEP_SECS + 0.3, "a lease stayed past its expiry for {worst:.2} s");

    let objects = s3.objects("chaos", &job);
    assert_one_object_pair_per_prompt(&objects, PROMPTS);
    let reference_job = std::fs::read_dir(&reference_dir).unwrap().flatten().find(|e| e.path().is_dir()).unwrap().path();
    for (name, bytes) in objects.iter().filter(|(n, _)| n.ends_with(".png")) {
        let want = std::fs::read(reference_job.join(name)).unwrap();
        assert!(*bytes == want, "{name} differs from the undisturbed run's");
    }
}
