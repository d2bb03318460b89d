//! The six scenarios. Each starts from a fresh database and a fresh API process, measures
//! taskexec, measures its reference in the same run, and returns table rows.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use taskexec_protocol::{NewTask, TaskId};
use taskexec_tests::Api;

use crate::report::{percentile, Row};
use crate::system::{self, Database, Env, Process, TOKEN};

/// Waits until `parked` picks are parked on the API.
async fn until_parked(api: &Process, parked: usize) {
    for _ in 0..3000 {
        let health = api.api.health().await.unwrap();
        if health["parked_picks"].as_u64() == Some(parked as u64) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{parked} picks never parked");
}

/// Waits until task `id` has ended (polling the database, which costs the API nothing).
async fn until_done(db: &Database, id: TaskId) {
    loop {
        let done: bool =
            sqlx::query_scalar("SELECT finished_at IS NOT NULL FROM tasks WHERE id = $1")
                .bind(id.as_uuid())
                .fetch_one(&db.pool)
                .await
                .unwrap();
        if done {
            return;
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// created -> picked and created -> running, in milliseconds, of every finished task.
async fn latencies(db: &Database) -> (Vec<f64>, Vec<f64>) {
    let rows: Vec<(f64, f64)> = sqlx::query_as(
        "SELECT (extract(epoch FROM started_at - created_at) * 1000)::float8,
                (extract(epoch FROM running_at - created_at) * 1000)::float8
           FROM tasks WHERE status = 'finished' AND running_at IS NOT NULL",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    rows.into_iter().unzip()
}

/// Runs `count` tasks `true` one after another (each created once the previous has finished)
/// with 8 long-polling agents.
async fn sequential_tasks(env: &Env, count: usize) -> (Vec<f64>, Vec<f64>) {
    let db = env.database("bench_latency").await;
    let api = env.api(&db, &[]).await;
    let workers = env.workers(&api, 8, &[]);
    until_parked(&api, 8).await;
    for _ in 0..count {
        let id = api.api.submit("true").await.id;
        until_done(&db, id).await;
    }
    workers.stop().await;
    api.stop().await;
    latencies(&db).await
}

/// The original design: 8 agents started together, each polling every 5 s without a long
/// poll. `count` tasks `true` arrive at random moments over `span` (fewer than the agents can
/// take, so none waits for a free agent), as they would relative to the agents' polls.
async fn polled_tasks(env: &Env, count: usize, span: Duration) -> (Vec<f64>, Vec<f64>) {
    let db = env.database("bench_latency_ref").await;
    let api = env.api(&db, &[]).await;
    let workers = env.workers(&api, 8, &[("PICK_WAIT", "0"), ("POLL_INTERVAL", "5s")]);
    let mut arrivals: Vec<Duration> = (0..count).map(|_| span.mul_f64(random_fraction())).collect();
    arrivals.sort();
    let started = Instant::now();
    let mut ids = Vec::new();
    for arrival in arrivals {
        tokio::time::sleep_until((started + arrival).into()).await;
        ids.push(api.api.submit("true").await.id);
    }
    for id in ids {
        until_done(&db, id).await;
    }
    workers.stop().await;
    api.stop().await;
    latencies(&db).await
}

/// A number in [0, 1) from the OS's randomness (no random number crate for one number).
fn random_fraction() -> f64 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    u64::from_le_bytes(bytes[..8].try_into().unwrap()) as f64 / (u64::MAX as f64 + 1.0)
}

/// 1. Pick latency: the long poll against the original design's 5 s polling.
pub async fn pick_latency(env: &Env, quick: bool) -> Vec<Row> {
    let (count, reference_count, span) = if quick { (100, 8, 5) } else { (500, 40, 30) };
    println!("1. pick latency: {count} sequential tasks, 8 long-polling agents ...");
    let (mut picked, mut running) = sequential_tasks(env, count).await;
    println!("   reference: {reference_count} tasks over {span} s, 8 agents polling every 5 s ...");
    let (mut ref_picked, mut ref_running) =
        polled_tasks(env, reference_count, Duration::from_secs(span)).await;
    let mut rows = Vec::new();
    for (what, ours, theirs) in [
        ("created→picked", &mut picked, &mut ref_picked),
        ("created→started", &mut running, &mut ref_running),
    ] {
        for p in [50.0, 90.0, 99.0] {
            let (value, reference) = (percentile(ours, p), percentile(theirs, p));
            let mut row =
                Row::new("1 pick latency", format!("{what} p{p}"), format!("{value:.2} ms"))
                    .reference(format!("{reference:.0} ms (5 s poll)"), reference / value);
            if what == "created→started" && p == 50.0 {
                row =
                    row.target("≤ 5 ms, ≥ 500× faster", value <= 5.0 && reference / value >= 500.0);
            }
            if what == "created→started" && p == 99.0 {
                row = row.target("≤ 25 ms", value <= 25.0);
            }
            rows.push(row);
        }
    }
    rows
}

/// The lifecycle of a task in pgbench: the three statements taskexec runs per task.
const LIFECYCLE: &str = "\
INSERT INTO tasks (id, command, timeout_secs) VALUES (gen_random_uuid(), 'true', 3600);
WITH locked AS (SELECT id FROM tasks WHERE status = 'queued' ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED)
UPDATE tasks t SET status = 'in_progress', started_at = now(), attempts = t.attempts + 1,
       lease = gen_random_uuid(), agent = 'pgbench', lease_expires_at = now() + interval '30 s'
  FROM locked WHERE t.id = locked.id RETURNING t.id AS claimed, t.lease AS lease \\gset
UPDATE tasks SET status = 'finished', exit_code = 0, stdout = '', stderr = '', finished_at = now(),
       lease_expires_at = NULL WHERE id = ':claimed' AND lease = ':lease' AND status = 'in_progress';
";

/// One drain of the queue: how fast, and the CPU each part spent per task.
struct Drain {
    tasks_per_sec: f64,
    /// Milliseconds of CPU per task: the API, the agents (their guards and `sh` included),
    /// PostgreSQL, and the whole machine.
    api_ms: f64,
    agents_ms: f64,
    postgres_ms: f64,
    machine_ms: f64,
    /// Statements per task, the inserts included.
    statements: f64,
}

/// Drains `tasks` queued `true` tasks with `agents` agents of `slots` slots each.
async fn drain(env: &Env, tasks: usize, agents: usize, slots: usize) -> Drain {
    let db = env.database("bench_throughput").await;
    let api = env.api(&db, &[]).await;
    db.reset_statements().await;
    submit_concurrently(&api, tasks, 16).await;
    let concurrency = slots.to_string();
    let (api_cpu, pg_cpu, machine_cpu) =
        (api.cpu_seconds(), system::postgres_cpu_seconds(&db).await, system::machine_cpu_seconds());
    let workers = env.workers(&api, agents, &[("CONCURRENCY", &concurrency)]);
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE finished_at IS NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let statements = db.api_statements().await as f64 / tasks as f64;
    for (calls, query) in db.top_statements(6).await {
        println!("   {:>6.2}/task  {}", calls as f64 / tasks as f64, query);
    }
    let per_task = |seconds: f64| seconds * 1000.0 / tasks as f64;
    let (api_ms, agents_ms, postgres_ms, machine_ms) = (
        per_task(api.cpu_seconds() - api_cpu),
        per_task(workers.cpu_seconds_with_children()),
        per_task(system::postgres_cpu_seconds(&db).await - pg_cpu),
        per_task(system::machine_cpu_seconds() - machine_cpu),
    );
    let seconds: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(finished_at) - min(started_at))::float8 FROM tasks",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    workers.stop().await;
    api.stop().await;
    let tasks_per_sec = tasks as f64 / seconds;
    Drain { tasks_per_sec, api_ms, agents_ms, postgres_ms, machine_ms, statements }
}

/// 2. End-to-end throughput: a queue of `true` tasks drained by agents of one slot and of
///    several (`CONCURRENCY`), against the machine's two limits, measured in the same run:
///    `sh -c true` spawned back to back on every core (no guard, no API, no database), and
///    pgbench running taskexec's three statements per task.
pub async fn throughput(env: &Env, quick: bool) -> Vec<Row> {
    let (tasks, configs, clients, secs): (usize, &[(usize, usize)], &[usize], u64) = if quick {
        (1000, &[(4, 1), (2, 8)], &[4, 16], 3)
    } else {
        (5000, &[(2, 1), (4, 1), (8, 1), (16, 1), (1, 16), (2, 8), (4, 8)], &[2, 4, 8, 16], 8)
    };
    let mut drains = Vec::new();
    for &(agents, slots) in configs {
        println!("2. throughput: {tasks} tasks `true`, {agents} agents × {slots} slots ...");
        drains.push(((agents, slots), drain(env, tasks, agents, slots).await));
    }
    let mut lifecycles = Vec::new();
    for &clients in clients {
        println!("   reference: pgbench lifecycle, {clients} clients, {secs} s ...");
        let reference = env.database("bench_pgbench").await;
        prefill(&reference, tasks).await;
        lifecycles.push((clients, env.pgbench(&reference, LIFECYCLE, clients, secs).await));
    }
    println!("   the spawn bound: `sh -c true`, back to back on every core, {secs} s ...");
    let spawns = env.spawn_rate(Duration::from_secs(secs), false).await;
    let guarded = env.spawn_rate(Duration::from_secs(secs), true).await;
    let (best_clients, pgbench) =
        lifecycles
            .iter()
            .copied()
            .fold((0, 0.0), |best, run| if run.1 > best.1 { run } else { best });
    let bound = spawns.min(pgbench);
    let bounds = format!("{bound:.0}/s: min(spawn {spawns:.0}, pgbench {pgbench:.0})");

    let mut rows = Vec::new();
    for &(clients, rate) in &lifecycles {
        rows.push(Row::new(
            "2 end-to-end",
            format!("pgbench lifecycle, {clients} clients"),
            format!("{rate:.0}/s"),
        ));
    }
    rows.push(Row::new(
        "2 end-to-end",
        "spawn bound: `sh -c true` per core",
        format!("{spawns:.0}/s"),
    ));
    rows.push(
        Row::new(
            "2 end-to-end",
            "the agent's path for `true` (its guard forks `sh`) per core",
            format!("{guarded:.0}/s"),
        )
        .reference(format!("{spawns:.0}/s `sh -c true` alone"), guarded / spawns),
    );
    let mut best: Option<&((usize, usize), Drain)> = None;
    for entry in &drains {
        let ((agents, slots), drain) = entry;
        rows.push(
            Row::new(
                "2 end-to-end",
                format!("{agents} agents × {slots} slots: tasks/s"),
                format!("{:.0}", drain.tasks_per_sec),
            )
            .reference(bounds.clone(), drain.tasks_per_sec / bound),
        );
        if best.is_none_or(|b| drain.tasks_per_sec > b.1.tasks_per_sec) {
            best = Some(entry);
        }
    }
    if let Some(((agents, slots), drain)) = best {
        rows.push(
            Row::new(
                "2 end-to-end",
                format!("best: {agents} × {slots}, against the lower bound"),
                format!("{:.0} tasks/s", drain.tasks_per_sec),
            )
            .reference(bounds.clone(), drain.tasks_per_sec / bound)
            .target("≥ 0.5 × min(spawn, pgbench)", drain.tasks_per_sec >= 0.5 * bound),
        );
        rows.push(
            Row::new(
                "2 end-to-end",
                "best, against the spawn bound",
                format!("{:.0} tasks/s", drain.tasks_per_sec),
            )
            .reference(format!("{spawns:.0} `sh -c true`/s"), drain.tasks_per_sec / spawns),
        );
        rows.push(
            Row::new(
                "2 end-to-end",
                "best, against pgbench",
                format!("{:.0} tasks/s", drain.tasks_per_sec),
            )
            .reference(
                format!("{pgbench:.0} lifecycles/s ({best_clients} clients)"),
                drain.tasks_per_sec / pgbench,
            ),
        );
        // Each bound has every core to itself; a task needs both a spawn and a lifecycle, on
        // the same cores: with nothing else to pay, at most 1 / (1/spawn + 1/pgbench).
        let shared = 1.0 / (1.0 / spawns + 1.0 / pgbench);
        rows.push(
            Row::new(
                "2 end-to-end",
                "best, against both bounds sharing the cores",
                format!("{:.0} tasks/s", drain.tasks_per_sec),
            )
            .reference(
                format!("{shared:.0}/s: 1 / (1/spawn + 1/pgbench)"),
                drain.tasks_per_sec / shared,
            ),
        );
        // Where a task's time goes: CPU per task, by process, in the best drain.
        let spawn_ms =
            1000.0 * std::thread::available_parallelism().map_or(1, |n| n.get()) as f64 / guarded;
        rows.push(Row::new(
            "2 end-to-end",
            "statements per task (best), the submit's included",
            format!("{:.2}", drain.statements),
        ));
        rows.push(
            Row::new(
                "2 end-to-end",
                "CPU per task (best): API / agents / PostgreSQL / machine",
                format!(
                    "{:.2} / {:.2} / {:.2} / {:.2} ms",
                    drain.api_ms, drain.agents_ms, drain.postgres_ms, drain.machine_ms
                ),
            )
            .reference(
                format!("guard + sh alone {spawn_ms:.2} ms (of the agents' share)"),
                spawn_ms / drain.machine_ms,
            ),
        );
    }
    rows
}

/// Queued tasks for pgbench's claims to find, as deep as taskexec's queue.
async fn prefill(db: &Database, tasks: usize) {
    sqlx::query(
        "INSERT INTO tasks (id, command, timeout_secs)
         SELECT gen_random_uuid(), 'true', 3600 FROM generate_series(1, $1)",
    )
    .bind(tasks as i32)
    .execute(&db.pool)
    .await
    .unwrap();
}

async fn submit_concurrently(api: &Process, tasks: usize, clients: usize) {
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let api = api.api.clone();
            let share = tasks / clients + usize::from(c < tasks % clients);
            tokio::spawn(async move {
                for _ in 0..share {
                    api.submit("true").await;
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }
}

/// 3. Submit throughput: POST /tasks from 8 and 32 clients, against pgbench inserting into the
///    same table.
pub async fn submit(env: &Env, quick: bool) -> Vec<Row> {
    let secs = if quick { 3 } else { 10 };
    let mut rows = Vec::new();
    for clients in [8usize, 32] {
        println!("3. submit: {clients} clients for {secs} s ...");
        let db = env.database("bench_submit").await;
        let api = env.api(&db, &[]).await;

        let running = Arc::new(AtomicBool::new(true));
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let (api, running) = (api.api.clone(), running.clone());
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while running.load(Ordering::Relaxed) {
                        let sent = Instant::now();
                        api.submit("true").await;
                        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                    }
                    latencies
                })
            })
            .collect();
        let started = Instant::now();

        tokio::time::sleep(Duration::from_secs(secs)).await;
        running.store(false, Ordering::Relaxed);

        let mut latencies = Vec::new();
        for handle in handles {
            latencies.extend(handle.await.unwrap());
        }
        let rate = latencies.len() as f64 / started.elapsed().as_secs_f64();

        let p99 = percentile(&mut latencies, 99.0);
        api.stop().await;
        println!("   reference: pgbench inserts, {clients} clients ...");
        let reference = env.database("bench_submit_ref").await;
        let insert = "INSERT INTO tasks (id, command, timeout_secs) VALUES (gen_random_uuid(), 'true', 3600);\n";
        let inserts = env.pgbench(&reference, insert, clients, secs).await;
        let ratio = rate / inserts;
        rows.push(
            Row::new("3 submit", format!("{clients} clients: requests/s"), format!("{rate:.0}"))
                .reference(format!("{inserts:.0} inserts/s (pgbench)"), ratio)
                .target("≥ 0.6 of pgbench", ratio >= 0.6),
        );
        rows.push(Row::new(
            "3 submit",
            format!("{clients} clients: p99 latency"),
            format!("{p99:.1} ms"),
        ));
    }
    rows
}

/// What parked polls cost while nothing happens, and what one task then costs.
struct Idle {
    /// API CPU seconds over the hold.
    cpu: f64,
    rss_growth_mib: f64,
    statements_per_sec: f64,
    connections: i64,
    /// Claim statements run for the one task submitted after the hold.
    claims: i64,
}

/// `polls` long polls parked for `hold` seconds, the n-th with the tags `tag_sets[n % len]`;
/// then one untagged task (which every tag set could take).
async fn idle(env: &Env, name: &str, polls: usize, hold: u64, tag_sets: &[&'static str]) -> Idle {
    let db = env.database(name).await;
    let api = env.api(&db, &[]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = api.rss_mib();
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let pollers = Api::with_http(&api.url, TOKEN, TOKEN, client);
    let handles: Vec<_> = (0..polls)
        .map(|n| {
            let pollers = pollers.clone();
            let tags = tag_sets[n % tag_sets.len()];
            tokio::spawn(async move {
                match pollers.pick_tagged(&format!("idle-{n}"), tags, 60).await {
                    Ok(Some(assignment)) => Some(assignment.task.id),
                    _ => None,
                }
            })
        })
        .collect();
    until_parked(&api, polls).await;
    // pg_stat_database would also count, late, what happened before the window (backends
    // flush their counters up to 10 s after the fact); pg_stat_statements counts at once.
    db.reset_statements().await;
    let cpu_before = api.cpu_seconds();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(hold)).await;
    let seconds = started.elapsed().as_secs_f64();
    let statements_per_sec = db.api_statements().await as f64 / seconds;
    let cpu = api.cpu_seconds() - cpu_before;
    let rss_growth_mib = api.rss_mib() - rss_before;
    let connections = db.connections().await;
    db.reset_statements().await;
    api.api.submit("true").await;
    let mut delivered = 0;
    let waited = Instant::now();
    while delivered == 0 && waited.elapsed() < Duration::from_secs(10) {
        delivered =
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM tasks WHERE status = 'in_progress'")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Let any echo of the notification arrive before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let claims: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements WHERE query LIKE 'WITH waiters AS%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    api.stop().await;
    for handle in handles {
        handle.abort();
    }
    Idle { cpu, rss_growth_mib, statements_per_sec, connections, claims }
}

/// 4. Idle cost: 1,000 parked long polls held for 30 s; then one task, and the claim
///    statements it caused.
pub async fn idle_cost(env: &Env, quick: bool) -> Vec<Row> {
    let (polls, hold) = (1000usize, if quick { 5 } else { 30 });
    println!("4. idle cost: {polls} parked polls held {hold} s ...");
    let idle = idle(env, "bench_idle", polls, hold, &[""]).await;
    vec![
        Row::new(
            "4 idle",
            format!("API CPU, {polls} polls for {hold} s"),
            format!("{:.2} s", idle.cpu),
        ),
        Row::new("4 idle", "API RSS growth", format!("{:.1} MiB", idle.rss_growth_mib))
            .target("≤ 64 MiB", idle.rss_growth_mib <= 64.0),
        Row::new(
            "4 idle",
            "database statements (transactions)/s",
            format!("{:.2}", idle.statements_per_sec),
        )
        .target("≤ 1", idle.statements_per_sec <= 1.0),
        Row::new("4 idle", "database connections", format!("{}", idle.connections)),
        Row::new("4 idle", "claim statements for 1 task", format!("{}", idle.claims))
            .target("≤ 2", idle.claims <= 2),
    ]
}

/// The agents' tag sets of scenario 6, and the tags of its tasks (each taken by some agent).
const TAG_SETS: [&str; 4] = ["", "gpu", "linux", "gpu,linux"];

/// 6. Routing: tasks of 4 tag sets and 3 priorities run one after another by agents of each
///    kind (2 of each, parked); then 1,000 parked polls spread over the 4 tag sets, idle.
pub async fn routing(env: &Env, quick: bool) -> Vec<Row> {
    let (count, hold) = if quick { (100, 5) } else { (500, 30) };
    println!("6. routing: {count} sequential tasks of 4 tag sets and 3 priorities, 8 agents ...");
    let db = env.database("bench_routing").await;
    let api = env.api(&db, &[]).await;
    let mut workers = Vec::new();
    for (n, tags) in TAG_SETS.iter().enumerate() {
        workers.push(env.workers_named(&api, 2, &format!("tags{n}"), &[("AGENT_TAGS", tags)]));
    }
    until_parked(&api, 8).await;
    for n in 0..count {
        let task = NewTask {
            tags: TAG_SETS[n % 4].split(',').filter(|t| !t.is_empty()).map(String::from).collect(),
            priority: Some([-1, 0, 1][n % 3]),
            ..NewTask::new("true")
        };
        let id = api.api.create(&task).await.unwrap().id;
        until_done(&db, id).await;
    }
    for group in workers {
        group.stop().await;
    }
    api.stop().await;
    let (_, mut running) = latencies(&db).await;
    let (p50, p99) = (percentile(&mut running, 50.0), percentile(&mut running, 99.0));

    println!("   1,000 parked polls over 4 tag sets held {hold} s ...");
    let idle = idle(env, "bench_routing_idle", 1000, hold, &TAG_SETS).await;
    vec![
        Row::new("6 routing", "created→started p50", format!("{p50:.2} ms"))
            .target("≤ 5 ms", p50 <= 5.0),
        Row::new("6 routing", "created→started p99", format!("{p99:.2} ms"))
            .target("≤ 25 ms", p99 <= 25.0),
        Row::new(
            "6 routing",
            "idle: database statements/s, 1,000 polls over 4 tag sets",
            format!("{:.2}", idle.statements_per_sec),
        )
        .target("≤ 1", idle.statements_per_sec <= 1.0),
        Row::new("6 routing", "idle: API CPU", format!("{:.2} s over {hold} s", idle.cpu)),
        Row::new("6 routing", "claim statements for 1 untagged task", format!("{}", idle.claims))
            .target("≤ 3", idle.claims <= 3),
    ]
}

/// 5. Wake fairness: 100 parked polls and 100 tasks created at once.
pub async fn wake_fairness(env: &Env, _quick: bool) -> Vec<Row> {
    println!("5. wake fairness: 100 parked polls, 100 tasks at once ...");
    let db = env.database("bench_fairness").await;
    let api = env.api(&db, &[]).await;
    let polls: Vec<_> = (0..100)
        .map(|n| {
            let api = api.api.clone();
            tokio::spawn(async move {
                let picked = api.pick(&format!("fair-{n}"), 30).await.unwrap();
                picked.map(|assignment| (assignment.task.id, Instant::now()))
            })
        })
        .collect();
    until_parked(&api, 100).await;
    let created = Instant::now();
    let creates: Vec<_> = (0..100)
        .map(|_| {
            let api = api.api.clone();
            tokio::spawn(async move { api.create(&NewTask::new("true")).await.is_ok() })
        })
        .collect();
    for create in creates {
        assert!(create.await.unwrap(), "a task was refused");
    }
    let mut delivered = Vec::new();
    for poll in polls {
        if let Some(got) = poll.await.unwrap() {
            delivered.push(got);
        }
    }
    let distinct: HashSet<&TaskId> = delivered.iter().map(|(id, _)| id).collect();
    let last = delivered
        .iter()
        .map(|(_, at)| *at)
        .max()
        .map_or(0.0, |at| (at - created).as_secs_f64() * 1000.0);
    api.stop().await;
    drop(db);
    vec![Row::new(
        "5 fairness",
        "polls served / distinct tasks",
        format!("{} / {} (last after {last:.0} ms)", delivered.len(), distinct.len()),
    )
    .target("100 / 100", delivered.len() == 100 && distinct.len() == 100)]
}
