//! Submissions coalesced: concurrent `POST /tasks` share one multi-row INSERT (a group commit).
//! An idle server inserts each task at once, alone; under load, every statement carries all
//! the submissions that arrived while the previous one ran, which saves the database a round
//! trip, a statement and a commit per task.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rocket::fairing::AdHoc;
use sqlx::PgPool;
use taskexec_protocol::{NewTask, Task};
use tokio::sync::{mpsc, oneshot};

use super::store::{self, NewRow, WithinQuota};
use crate::db::required;
use crate::error::ApiError;

/// The most submissions one statement carries.
const MAX_BATCH: usize = 256;

struct Submission {
    task: NewTask,
    timeout_secs: u32,
    owner: String,
    reply: oneshot::Sender<Result<Task, ApiError>>,
}

/// The handle request handlers use (managed state).
pub struct Intake {
    submissions: mpsc::UnboundedSender<Submission>,
}

/// The most tasks one owner may have queued (`max_queued_per_owner`).
#[derive(Clone, Copy)]
struct Quota(u64);

impl Intake {
    /// Inserts a queued task owned by `owner`; returns once it is committed.
    ///
    /// # Errors
    /// `QuotaExceeded` when the owner has `max_queued_per_owner` tasks queued already
    /// (nothing is inserted); `Unavailable` when the database cannot be reached (or the server is
    /// stopping).
    pub async fn submit(
        &self,
        task: NewTask,
        timeout_secs: u32,
        owner: String,
    ) -> Result<Task, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.submissions
            .send(Submission { task, timeout_secs, owner, reply })
            .map_err(|_| ApiError::Unavailable)?;
        answer.await.map_err(|_| ApiError::Unavailable)?
    }
}

/// Takes whatever submissions are waiting, up to `MAX_BATCH`, and inserts them, until the
/// channel closes. One batch at a time: while it is inserted, the next gathers. (Two in flight
/// split the batches and measured slower on two cores.)
async fn run(pool: PgPool, quota: Quota, mut submissions: mpsc::UnboundedReceiver<Submission>) {
    let mut seen = Seen::default();
    while let Some(first) = submissions.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match submissions.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        insert(&pool, quota, &mut seen, batch).await;
    }
}

/// How often an owner's queue is counted again at the least, while this process inserts for it.
const RECOUNT: Duration = Duration::from_secs(2);

/// The most owners remembered; past it, every owner is counted afresh.
const MAX_SEEN: usize = 10_000;

/// What this process knows of each owner's queue: the count at its last check, plus what it
/// has inserted since (the picks since only lower the real count), and when it counted.
#[derive(Default)]
struct Seen(HashMap<String, (u64, Instant)>);

impl Seen {
    /// Whether `n` more tasks of `owner` may go in without a count: counted within `RECOUNT`
    /// and, with them, still at most half of the quota.
    fn room(&self, owner: &str, n: u64, Quota(max): Quota) -> bool {
        self.0
            .get(owner)
            .is_some_and(|(queued, at)| at.elapsed() < RECOUNT && queued + n <= max / 2)
    }

    fn counted(&mut self, owner: &str, queued: u64) {
        if self.0.len() >= MAX_SEEN {
            self.0.clear();
        }
        self.0.insert(owner.to_owned(), (queued, Instant::now()));
    }

    fn added(&mut self, owner: &str, n: u64) {
        if let Some((queued, _)) = self.0.get_mut(owner) {
            *queued += n;
        }
    }
}

/// Inserts a batch. Owners far from their quota and counted recently go in one statement, as
/// before quotas; the others are counted and inserted under their quota's lock, owner by owner,
/// as many as fit (in the order they came; the rest get 429).
///
/// With one API process the quota is exact: this process's view is never below the real
/// count. With several, each counts an owner again at least every `RECOUNT` and as soon as its
/// own view reaches half of the quota, so an owner can overshoot by at most half of the quota
/// per other process. (A counter updated with every insert and pick cost a third of the
/// submission rate and half a millisecond on every pick, in `make bench`.)
async fn insert(pool: &PgPool, quota: Quota, seen: &mut Seen, batch: Vec<Submission>) {
    let mut owners: HashMap<String, u64> = HashMap::new();
    for submission in &batch {
        *owners.entry(submission.owner.clone()).or_default() += 1;
    }
    let fast: HashSet<String> = owners
        .iter()
        .filter(|(owner, n)| seen.room(owner, **n, quota))
        .map(|(o, _)| o.clone())
        .collect();
    let (quick, counted): (Vec<Submission>, Vec<Submission>) =
        batch.into_iter().partition(|s| fast.contains(&s.owner));
    if !quick.is_empty() {
        let rows = rows(&quick);
        let inserted = store::insert_many(pool, &rows).await.map_err(ApiError::from);
        drop(rows);
        if inserted.is_ok() {
            for owner in &fast {
                seen.added(owner, owners[owner]);
            }
        }
        answer(quick, inserted.map(|tasks| tasks.into_iter().map(Ok).collect()));
    }
    let mut by_owner: HashMap<String, Vec<Submission>> = HashMap::new();
    for submission in counted {
        by_owner.entry(submission.owner.clone()).or_default().push(submission);
    }
    let Quota(max) = quota;
    for (owner, submissions) in by_owner {
        let rows = rows(&submissions);
        let result = store::insert_within_quota(pool, &owner, &rows, max).await;
        drop(rows);
        let outcome = match result {
            Ok(WithinQuota { inserted, queued }) => {
                seen.counted(&owner, queued);
                let over = ApiError::QuotaExceeded { owner: owner.clone(), max };
                let refused = submissions.len() - inserted.len();
                Ok(inserted.into_iter().map(Ok).chain(vec![Err(over); refused]).collect())
            }
            Err(e) => Err(ApiError::from(e)),
        };
        answer(submissions, outcome);
    }
}

fn rows(submissions: &[Submission]) -> Vec<NewRow<'_>> {
    submissions
        .iter()
        .map(|s| NewRow { task: &s.task, timeout_secs: s.timeout_secs, owner: &s.owner })
        .collect()
}

/// Replies to each submission with its outcome, or all of them with the error.
fn answer(submissions: Vec<Submission>, outcome: Result<Vec<Result<Task, ApiError>>, ApiError>) {
    match outcome {
        Ok(outcomes) => {
            for (submission, outcome) in submissions.into_iter().zip(outcomes) {
                let _ = submission.reply.send(outcome);
            }
        }
        Err(error) => {
            for submission in submissions {
                let _ = submission.reply.send(Err(error.clone()));
            }
        }
    }
}

/// Runs the intake from ignite until the server stops. The launch fails without a pool.
pub fn stage() -> AdHoc {
    AdHoc::try_on_ignite("Intake", |rocket| async {
        let (pool, config) = match required(&rocket) {
            Ok(found) => found,
            Err(what) => {
                log::error!("the intake cannot start without {what}");
                return Err(rocket);
            }
        };
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(pool, Quota(config.max_queued_per_owner), receiver));
        Ok(rocket.manage(Intake { submissions: sender }))
    })
}
