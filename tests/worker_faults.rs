//! Workers and the coordinator as real processes over gRPC, with PostgreSQL and the S3 test server:
//! a worker killed mid-job, a worker drained by SIGTERM, and a coordinator restarted mid-job.

use std::time::Duration;

use fresco_e2e::*;

const PROMPTS: usize = 24;
const STEPS: u32 = 25;

#[test]
fn sigkilled_worker_loses_nothing_and_duplicates_nothing() {
    let c = Cluster::start(&[]);
    let prompts = c.write_prompts(PROMPTS);
    let _a = c.worker("worker-a");

    // The undisturbed run.
    let reference = c.submit(&prompts, "reference", STEPS);
    let done = c.wait_done(&reference, Duration::from_secs(300));
    assert_eq!(done["state"], "succeeded", "{done}");
    let reference_objects = c.s3.objects("reference", &reference);
    assert_one_object_pair_per_prompt(&reference_objects, PROMPTS);

    // The same job with two workers, one of them SIGKILLed while it works.
    let mut b = c.worker("worker-b");
    let job = c.submit(&prompts, "disturbed", STEPS);
    c.wait_progress(&job, 4, Duration::from_secs(120));
    b.kill9();
    let done = c.wait_done(&job, Duration::from_secs(300));
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["succeeded"], PROMPTS as u64);
    let objects = c.s3.objects("disturbed", &job);
    assert_one_object_pair_per_prompt(&objects, PROMPTS);
    assert_same_images(&reference_objects, &objects);
    assert_eq!(c.db.query_i64(&format!("SELECT count(*) FROM outputs WHERE job_id = '{job}'")), PROMPTS as i64);
    // The killed worker held a lease that had to expire and be redone.
    assert!(c.db.query_i64(&format!("SELECT COALESCE(SUM(lost), 0)::BIGINT FROM tasks WHERE job_id = '{job}'")) >= 1);
}

#[test]
fn sigterm_drains_the_batch_in_hand_and_exits_zero() {
    let c = Cluster::start(&[]);
    let prompts = c.write_prompts(PROMPTS);
    let mut w = c.worker("drainer");
    let job = c.submit(&prompts, "drain", STEPS);
    c.wait_progress(&job, 2, Duration::from_secs(120));
    w.signal(libc::SIGTERM);
    let code = w.wait_exit(Duration::from_secs(120));
    assert_eq!(code, Some(0), "log:\n{}", w.log_text());
    // Nothing it leased was abandoned: no lease is held, none was lost.
    assert_eq!(c.db.query_i64("SELECT count(*) FROM tasks WHERE state = 'leased'"), 0);
    assert_eq!(c.db.query_i64("SELECT COALESCE(SUM(lost), 0)::BIGINT FROM tasks"), 0);
    let partial = c.status(&job);
    assert_eq!(partial["state"], "running");
    assert!(partial["succeeded"].as_u64().unwrap() < PROMPTS as u64, "drain should stop leasing: {partial}");
    let _next = c.worker("finisher");
    let done = c.wait_done(&job, Duration::from_secs(300));
    assert_eq!(done["state"], "succeeded");
    assert_one_object_pair_per_prompt(&c.s3.objects("drain", &job), PROMPTS);
}

#[test]
fn coordinator_restarted_mid_job_loses_nothing() {
    let mut c = Cluster::start(&[]);
    let prompts = c.write_prompts(PROMPTS);
    let _a = c.worker("worker-a");
    let _b = c.worker("worker-b");
    let job = c.submit(&prompts, "restart", STEPS);
    c.wait_progress(&job, 4, Duration::from_secs(120));
    c.coordinator.as_mut().unwrap().kill9();
    std::thread::sleep(Duration::from_secs(2));
    c.start_coordinator();
    let done = c.wait_done(&job, Duration::from_secs(300));
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["succeeded"], PROMPTS as u64);
    assert_one_object_pair_per_prompt(&c.s3.objects("restart", &job), PROMPTS);
    assert_eq!(c.db.query_i64(&format!("SELECT count(*) FROM outputs WHERE job_id = '{job}'")), PROMPTS as i64);
}
