//! The dispatcher's rounds, driven one at a time with `run_once`, on a real database: how
//! many claim statements a wake-up costs, and who gets which task.

use std::time::Duration;

use sqlx::PgPool;
use taskexec_api::dispatch::{DispatchLoop, Dispatcher, Handover, Notifier, Reply, Round};
use taskexec_api::tasks::store::{self, Claimed, Fate, NewRow, Picker};
use taskexec_protocol::{LeaseTerms, NewTask, TaskId, TaskStatus};
use taskexec_tests::{TestApp, TestDb};
use tokio::time::Instant;

const TERMS: LeaseTerms =
    LeaseTerms { lease_secs: 15, kill_grace_secs: 10, max_output_bytes: 1 << 20 };

/// A dispatcher and its loop without a rescan timer: only what a test does wakes it.
fn dispatcher(pool: &PgPool) -> (Notifier, Dispatcher, DispatchLoop) {
    let notifier = Notifier::default();
    let (dispatcher, dispatch) =
        DispatchLoop::new(pool.clone(), notifier.clone(), Duration::from_secs(3600), TERMS);
    (notifier, dispatcher, dispatch)
}

async fn migrated() -> (TestDb, PgPool) {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    sqlx::migrate!("../migrations").run(&pool).await.expect("migrations apply");
    (db, pool)
}

/// One claim statement for untagged agents named `agents`, oldest first.
async fn claim(pool: &PgPool, agents: &[&str]) -> Vec<Claimed> {
    let pickers: Vec<Picker> = agents.iter().map(|agent| Picker { agent, tags: "" }).collect();
    store::claim(pool, &pickers, &TERMS).await.unwrap().claimed
}

/// Starts the notifier's LISTEN connection and waits until it is up: "empty" is trusted only
/// while notifications can arrive to say otherwise.
async fn listening(db: &TestDb, notifier: &Notifier) {
    tokio::spawn(notifier.clone().listen(db.url.clone(), Duration::from_secs(15)));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !notifier.is_listening() {
        assert!(Instant::now() < deadline, "the listener never connected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn park(dispatcher: &Dispatcher, agent: &str) -> Reply {
    park_tagged(dispatcher, agent, &[])
}

/// A pick of an agent with `tags` (sorted), parked for a minute.
fn park_tagged(dispatcher: &Dispatcher, agent: &str, tags: &[&str]) -> Reply {
    let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    dispatcher.park(agent.to_owned(), &tags, 1, Instant::now() + Duration::from_secs(60)).unwrap()
}

/// The one task a pick without `max` got.
fn single(mut handed: Vec<Handover>) -> Handover {
    assert_eq!(handed.len(), 1, "a pick of one task gets one");
    handed.pop().unwrap()
}

/// A queued task with `tags` (sorted) and `priority`.
async fn insert_tagged(pool: &PgPool, tags: &[&str], priority: i32) -> TaskId {
    let task = NewTask {
        tags: tags.iter().map(|t| t.to_string()).collect(),
        priority: Some(priority),
        ..NewTask::new("true")
    };
    let row = NewRow { task: &task, timeout_secs: 60, owner: "tester" };
    store::insert_many(pool, &[row]).await.unwrap()[0].id
}

/// The task each reply got, by agent, in the order given.
async fn received(replies: Vec<(&str, Reply)>) -> Vec<(String, TaskId)> {
    let mut got = Vec::new();
    for (agent, reply) in replies {
        let picked = single(reply.await.unwrap()).delivered();
        assert_eq!(picked.task.agent.as_deref(), Some(agent));
        got.push((agent.to_owned(), picked.task.id));
    }
    got
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handover_that_never_reached_its_agent_goes_back_to_the_queue() {
    // Its client left in the instant the task was handed over, before the response went out
    // (a pick that leaves earlier is let go and gets nothing): the handover is dropped
    // undelivered, and the next round puts the task back, its attempt given back.
    let (_db, pool) = migrated().await;
    let (_, dispatcher, mut dispatch) = dispatcher(&pool);
    let reply = park(&dispatcher, "gone");
    let task = store::insert(&pool, "echo back", 60, "tester").await.unwrap().id;
    let round = dispatch.run_once().await;
    assert_eq!(round, Round { claims: 1, delivered: 1, returned: 0, expired: 0 });
    drop(single(reply.await.unwrap()));

    let round = dispatch.run_once().await;

    assert_eq!(round.returned, 1, "{round:?}");
    let back = store::get(&pool, task, None).await.unwrap().unwrap();
    assert_eq!(back.status, TaskStatus::Queued);
    assert_eq!(back.attempts, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_claim_serves_all_parked_picks_oldest_waiter_first() {
    let (_db, pool) = migrated().await;
    let (_, dispatcher, mut dispatch) = dispatcher(&pool);
    let mut replies: Vec<Reply> =
        (0..5).map(|n| park(&dispatcher, &format!("agent-{n}"))).collect();
    let mut tasks = Vec::new();
    for n in 0..3 {
        tasks.push(store::insert(&pool, &format!("echo {n}"), 60, "tester").await.unwrap().id);
    }

    let round = dispatch.run_once().await;

    assert_eq!(round, Round { claims: 1, delivered: 3, returned: 0, expired: 0 });
    for (n, reply) in replies.drain(..3).enumerate() {
        let picked = single(reply.await.unwrap()).delivered();
        assert_eq!(picked.task.id, tasks[n], "waiter {n} gets the {n}th oldest task");
        assert_eq!(picked.task.agent.as_deref(), Some(format!("agent-{n}").as_str()));
    }
    assert_eq!(dispatcher.parked(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pick_of_several_takes_up_to_its_max_in_the_same_claim_as_the_others() {
    let (db, pool) = migrated().await;
    let (notifier, dispatcher, mut dispatch) = dispatcher(&pool);
    // Listening, so that a queue found empty is known empty (the inserts send no hint).
    listening(&db, &notifier).await;
    let forever = Instant::now() + Duration::from_secs(60);
    let slots = dispatcher.park("slots".into(), &[], 3, forever).unwrap();
    let single_pick = park(&dispatcher, "single");
    let mut tasks = Vec::new();
    for n in 0..5 {
        tasks.push(store::insert(&pool, &format!("echo {n}"), 60, "tester").await.unwrap().id);
    }

    let round = dispatch.run_once().await;

    assert_eq!(round, Round { claims: 1, delivered: 4, returned: 0, expired: 0 });
    let got: Vec<_> = slots.await.unwrap().into_iter().map(Handover::delivered).collect();
    let ids: Vec<TaskId> = got.iter().map(|a| a.task.id).collect();
    assert_eq!(ids, tasks[..3], "the older pick takes the three oldest, in order");
    let leases: std::collections::HashSet<_> = got.iter().map(|a| a.lease).collect();
    assert_eq!(leases.len(), 3, "each task has a lease of its own");
    assert!(got.iter().all(|a| a.task.agent.as_deref() == Some("slots")));
    assert_eq!(single(single_pick.await.unwrap()).delivered().task.id, tasks[3]);

    // A pick of 4 with one task left gets that one at once, and the queue is known empty.
    let rest = dispatcher.park("slots".into(), &[], 4, forever).unwrap();
    let round = dispatch.run_once().await;
    assert_eq!(round, Round { claims: 1, delivered: 1, returned: 0, expired: 0 });
    assert_eq!(single(rest.await.unwrap()).delivered().task.id, tasks[4]);
    let _parked = dispatcher.park("slots".into(), &[], 4, forever).unwrap();
    assert_eq!(dispatch.run_once().await.claims, 0, "no claim on a queue known empty");
}

#[tokio::test(flavor = "multi_thread")]
async fn parking_on_a_known_empty_queue_costs_no_query() {
    let (db, pool) = migrated().await;
    let (notifier, dispatcher, mut dispatch) = dispatcher(&pool);
    listening(&db, &notifier).await;
    let _first = park(&dispatcher, "a");
    assert_eq!(dispatch.run_once().await.claims, 1, "the first look queries");

    let _more: Vec<Reply> = (0..1000).map(|n| park(&dispatcher, &format!("idle-{n}"))).collect();
    let round = dispatch.run_once().await;

    assert_eq!(round.claims, 0, "1,000 more parked picks cost the database nothing");
    assert_eq!(dispatcher.parked(), 1001);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_claim_serves_every_tag_set_higher_priority_first() {
    let (_db, pool) = migrated().await;
    let (_, dispatcher, mut dispatch) = dispatcher(&pool);
    let low = insert_tagged(&pool, &[], -5).await;
    let gpu_later = insert_tagged(&pool, &["gpu"], 0).await;
    let gpu_first = insert_tagged(&pool, &["gpu"], 5).await;
    let linux = insert_tagged(&pool, &["linux"], 0).await;
    let untagged = insert_tagged(&pool, &[], -1).await;
    let replies = vec![
        ("plain", park(&dispatcher, "plain")),
        ("plain-too", park(&dispatcher, "plain-too")),
        ("gpu", park_tagged(&dispatcher, "gpu", &["gpu"])),
        ("linux", park_tagged(&dispatcher, "linux", &["linux"])),
    ];

    let round = dispatch.run_once().await;

    assert_eq!(round, Round { claims: 1, delivered: 4, returned: 0, expired: 0 });
    let got = received(replies).await;
    let expected = [("plain", untagged), ("plain-too", low), ("gpu", gpu_first), ("linux", linux)];
    assert_eq!(got, expected.map(|(agent, id)| (agent.to_owned(), id)));
    let left = store::get(&pool, gpu_later, None).await.unwrap().unwrap();
    assert_eq!(left.status, TaskStatus::Queued);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_several_tag_sets_could_take_goes_to_the_oldest_pick_and_the_others_look_again() {
    let (_db, pool) = migrated().await;
    let (_, dispatcher, mut dispatch) = dispatcher(&pool);
    let plain_old = insert_tagged(&pool, &[], 0).await;
    let gpu = insert_tagged(&pool, &["gpu"], 0).await;
    let plain_urgent = insert_tagged(&pool, &[], 5).await;
    let linux = insert_tagged(&pool, &["linux"], 0).await;
    let both = insert_tagged(&pool, &["gpu", "linux"], -1).await;
    let replies = vec![
        ("plain", park(&dispatcher, "plain")),
        ("plain-too", park(&dispatcher, "plain-too")),
        ("gpu", park_tagged(&dispatcher, "gpu", &["gpu"])),
        ("gpu-linux", park_tagged(&dispatcher, "gpu-linux", &["gpu", "linux"])),
    ];

    let round = dispatch.run_once().await;

    // Every pick could have had the urgent untagged task: the oldest one did, and the others
    // were served by the statements that followed, within the same round.
    assert_eq!(round.delivered, 4, "{round:?}");
    assert!((2..=4).contains(&round.claims), "{round:?}");
    let got = received(replies).await;
    let expected =
        [("plain", plain_urgent), ("plain-too", plain_old), ("gpu", gpu), ("gpu-linux", linux)];
    assert_eq!(got, expected.map(|(agent, id)| (agent.to_owned(), id)));
    let left = store::get(&pool, both, None).await.unwrap().unwrap();
    assert_eq!(left.status, TaskStatus::Queued);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lone_task_that_every_tag_set_could_take_costs_one_claim() {
    // Each tag set listed fewer tasks than it has picks: it saw all there is for it, and
    // needs no second look though the task went to another. (A tag set with one pick that
    // listed the task could have had another beyond it, and would look again.)
    let (_db, pool) = migrated().await;
    let (_, dispatcher, mut dispatch) = dispatcher(&pool);
    let task = insert_tagged(&pool, &[], 0).await;
    let mut replies = vec![
        ("gpu", park_tagged(&dispatcher, "gpu", &["gpu"])),
        ("plain", park(&dispatcher, "plain")),
        ("linux", park_tagged(&dispatcher, "linux", &["linux"])),
        ("plain-too", park(&dispatcher, "plain-too")),
        ("gpu-too", park_tagged(&dispatcher, "gpu-too", &["gpu"])),
        ("linux-too", park_tagged(&dispatcher, "linux-too", &["linux"])),
    ];

    let round = dispatch.run_once().await;

    assert_eq!(round, Round { claims: 1, delivered: 1, returned: 0, expired: 0 });
    let got = received(replies.drain(..1).collect()).await;
    assert_eq!(got, [("gpu".to_owned(), task)], "the oldest pick");
}

#[tokio::test(flavor = "multi_thread")]
async fn parked_picks_of_many_tag_sets_on_a_queue_with_nothing_for_them_cost_no_query() {
    let (db, pool) = migrated().await;
    let (notifier, dispatcher, mut dispatch) = dispatcher(&pool);
    listening(&db, &notifier).await;
    // A task no parked agent can take stays queued, and costs nothing either.
    insert_tagged(&pool, &["arm64"], 0).await;
    let tag_sets: [&[&str]; 4] = [&[], &["gpu"], &["linux"], &["gpu", "linux"]];
    let _first: Vec<Reply> = tag_sets
        .iter()
        .enumerate()
        .map(|(n, tags)| park_tagged(&dispatcher, &format!("first-{n}"), tags))
        .collect();
    assert_eq!(dispatch.run_once().await.claims, 1, "one look for all four tag sets");

    let _more: Vec<Reply> = (0..1000)
        .map(|n| park_tagged(&dispatcher, &format!("idle-{n}"), tag_sets[n % 4]))
        .collect();
    let round = dispatch.run_once().await;

    assert_eq!(round.claims, 0, "1,000 more parked picks over 4 tag sets cost nothing");
    assert_eq!(dispatcher.parked(), 1004);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_parked_picks_and_a_hundred_tasks_pair_up_one_to_one() {
    let (_db, pool) = migrated().await;
    let (_, dispatcher, mut dispatch) = dispatcher(&pool);
    for n in 0..100 {
        store::insert(&pool, &format!("echo {n}"), 60, "tester").await.unwrap();
    }
    let replies: Vec<Reply> = (0..100).map(|n| park(&dispatcher, &format!("agent-{n}"))).collect();

    let round = dispatch.run_once().await;

    assert_eq!(round.delivered, 100);
    let mut ids = std::collections::HashSet::new();
    for reply in replies {
        let picked = single(reply.await.unwrap()).delivered();
        assert!(ids.insert(picked.task.id));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pick_past_its_deadline_is_answered_with_nothing() {
    let (_db, pool) = migrated().await;
    let (_, dispatcher, mut dispatch) = dispatcher(&pool);
    let reply = dispatcher.park("late".into(), &[], 1, Instant::now()).unwrap();

    let round = dispatch.run_once().await;

    assert_eq!(round.expired, 1);
    assert!(reply.await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dispatcher_listens_again_after_its_connection_is_killed() {
    // No fallback rescan within the test: only a notification can wake the pick.
    let app = TestApp::spawn_with(|f| f.merge(("dispatch_rescan_secs", 3600))).await;
    let peer = app.spawn_peer().await;
    let admin = PgPool::connect(&std::env::var("DATABASE_URL").unwrap()).await.unwrap();
    let pids = listeners_until(&admin, &app.db.name, |pids| pids.len() == 2).await;

    for pid in &pids {
        sqlx::query("SELECT pg_terminate_backend($1)").bind(pid).execute(&admin).await.unwrap();
    }
    listeners_until(&admin, &app.db.name, |now| {
        now.len() == 2 && now.iter().all(|pid| !pids.contains(pid))
    })
    .await;
    let pick = {
        let app = app.api.clone();
        tokio::spawn(async move { app.pick("parked", 20).await })
    };
    app.until_parked(1).await;

    let task = peer.submit("echo after reconnect").await;

    let picked = pick.await.unwrap().unwrap().expect("the parked pick gets the task");
    assert_eq!(picked.task.id, task.id);
}

/// The backends LISTENing on database `name`, once `done` holds for them (30 s at most): each
/// API process opens its LISTEN connection in the background, so it is awaited, not assumed.
async fn listeners_until(admin: &PgPool, name: &str, done: impl Fn(&[i32]) -> bool) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND query LIKE 'LISTEN%'",
        )
        .bind(name)
        .fetch_all(admin)
        .await
        .unwrap();
        if done(&pids) {
            return pids;
        }
        assert!(Instant::now() < deadline, "the LISTEN connections never settled: {pids:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reapers_racing_on_one_database_handle_each_expired_lease_once() {
    let (_db, pool) = migrated().await;
    for n in 0..200 {
        store::insert(&pool, &format!("echo {n}"), 60, "tester").await.unwrap();
    }
    let agents: Vec<String> = (0..200).map(|n| format!("lost-{n}")).collect();
    let agents: Vec<&str> = agents.iter().map(String::as_str).collect();
    assert_eq!(claim(&pool, &agents).await.len(), 200);
    sqlx::query("UPDATE tasks SET lease_expires_at = now() - interval '1 second'")
        .execute(&pool)
        .await
        .unwrap();

    let reapers: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn({
                let pool = pool.clone();
                async move { store::reap(&pool, 3, 40).await.unwrap() }
            })
        })
        .collect();
    let mut requeued = 0;
    for reaper in reapers {
        requeued += reaper.await.unwrap().requeued();
    }

    assert_eq!(requeued, 200, "each expiry handled exactly once across the reapers");
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status = 'queued'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(queued, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_lease_on_the_last_attempt_fails_the_task_as_agent_lost() {
    let (_db, pool) = migrated().await;
    let task = store::insert(&pool, "echo x", 60, "tester").await.unwrap();
    for attempt in 1..=3 {
        let claimed = claim(&pool, &["a"]).await;
        assert_eq!(claimed[0].task.attempts, attempt);
        // The agent confirmed the pick with a heartbeat, then vanished.
        sqlx::query(
            "UPDATE tasks SET running_at = now(), lease_expires_at = now() - interval '1 second'",
        )
        .execute(&pool)
        .await
        .unwrap();
        let reaped = store::reap(&pool, 3, 40).await.unwrap();
        let outcome = (reaped.requeued(), reaped.count(Fate::Lost));
        assert_eq!(outcome, if attempt < 3 { (1, 0) } else { (0, 1) });
    }

    let lost = store::get(&pool, task.id, None).await.unwrap().unwrap();
    assert_eq!(lost.status, TaskStatus::Failed);
    assert_eq!(lost.error.as_deref(), Some("agent lost"));
}

#[tokio::test(flavor = "multi_thread")]
async fn picks_never_confirmed_are_refunded_but_only_max_attempts_times() {
    let (_db, pool) = migrated().await;
    let task = store::insert(&pool, "echo x", 60, "tester").await.unwrap();
    let mut fates = Vec::new();
    for _ in 0..6 {
        claim(&pool, &["gone"]).await;
        sqlx::query("UPDATE tasks SET lease_expires_at = now() - interval '1 second'")
            .execute(&pool)
            .await
            .unwrap();
        let reaped = store::reap(&pool, 3, 40).await.unwrap();
        fates.push((reaped.count(Fate::Refunded), reaped.requeued(), reaped.count(Fate::Lost)));
    }

    // Three refunds (a parked pick whose agent had gone), then three counted attempts.
    assert_eq!(fates, [(1, 1, 0), (1, 1, 0), (1, 1, 0), (0, 1, 0), (0, 1, 0), (0, 0, 1)]);
    let lost = store::get(&pool, task.id, None).await.unwrap().unwrap();
    assert_eq!(lost.error.as_deref(), Some("agent lost"));
    assert_eq!(lost.attempts, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn hand_backs_are_refunded_only_max_attempts_times_then_fail_the_task() {
    let (_db, pool) = migrated().await;
    let task = store::insert(&pool, "kill -TERM $agent", 60, "tester").await.unwrap();
    let mut statuses = Vec::new();
    loop {
        let claimed = claim(&pool, &["draining"]).await;
        let Some(claimed) = claimed.into_iter().next() else { break };
        let released = claimed.lease.release(&pool, 3).await.unwrap().unwrap();
        statuses.push((released.status, released.attempts));
        assert!(statuses.len() <= 10, "released forever: {statuses:?}");
    }

    use TaskStatus::{Failed, Queued};
    assert_eq!(
        statuses,
        [(Queued, 0), (Queued, 0), (Queued, 0), (Queued, 1), (Queued, 2), (Failed, 3)]
    );
    let failed = store::get(&pool, task.id, None).await.unwrap().unwrap();
    assert_eq!(failed.error.as_deref(), Some("handed back by its agents too often"));
}
