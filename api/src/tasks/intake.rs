//! Submissions coalesced: concurrent `POST /tasks` share one multi-row INSERT (a group commit).
//! An idle server inserts each task at once, alone; under load, every statement carries all
//! the submissions that arrived while the previous one ran, which saves the database a round
//! trip, a statement and a commit per task.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rocket::fairing::AdHoc;
use sqlx::types::Uuid;
use sqlx::PgPool;
use taskexec_protocol::{NewTask, Task};
use tokio::sync::{mpsc, oneshot};

use super::store::{self, Keyed, NewRow, WithinQuota};
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
    pool: PgPool,
    quota: Quota,
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

    /// Submits `task` under the owner's idempotency `key` (see `store::insert_keyed`): alone,
    /// in a transaction of its own, not in a batch, since it may have to wait for a concurrent
    /// submit with the same key.
    pub async fn submit_keyed(
        &self,
        task: &NewTask,
        timeout_secs: u32,
        owner: &str,
        key: &str,
        digest: &[u8; 32],
    ) -> Result<Keyed, ApiError> {
        let row = NewRow { task, timeout_secs, owner };
        let Quota(max) = self.quota;
        match store::insert_keyed(&self.pool, &row, key, digest, max).await? {
            Keyed::OverQuota => Err(ApiError::QuotaExceeded { owner: owner.to_owned(), max }),
            keyed => Ok(keyed),
        }
    }
}

/// Takes whatever submissions are waiting, up to `MAX_BATCH`, and inserts them, until the
/// channel closes. One batch at a time: while it is inserted, the next gathers. (Two in flight
/// split the batches and measured slower on two cores.)
async fn run(
    pool: PgPool,
    quota: Quota,
    process: Uuid,
    mut submissions: mpsc::UnboundedReceiver<Submission>,
) {
    let mut grants = Grants::new(process);
    while let Some(first) = submissions.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match submissions.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        insert(&pool, quota, &mut grants, batch).await;
    }
}

/// How long this process fills a grant before it counts again: well within `GRANT_SECS`, the
/// time the other processes keep the grant's room free.
const RECOUNT: Duration = Duration::from_secs(2);

/// The most owners remembered; past it, every owner is counted afresh.
const MAX_GRANTS: usize = 10_000;

/// The smallest grant asked for.
const MIN_GRANT: u64 = 16;

/// The room in each owner's quota this process may fill without counting (`quota_grants`):
/// what it was granted at its last count, less what it has inserted since.
struct Grants {
    /// This process, as the database's grants know it.
    process: Uuid,
    owners: HashMap<String, Grant>,
}

struct Grant {
    room: u64,
    at: Instant,
    /// Inserted under it so far: the next grant asked for is twice that, so that a process
    /// that submits little for an owner holds little of its room.
    used: u64,
}

impl Grants {
    fn new(process: Uuid) -> Grants {
        Grants { process, owners: HashMap::new() }
    }

    /// Takes `n` of an owner's granted room, if it holds that much and was granted within
    /// `RECOUNT`.
    fn take(&mut self, owner: &str, n: u64) -> bool {
        match self.owners.get_mut(owner) {
            Some(grant) if grant.at.elapsed() < RECOUNT && grant.room >= n => {
                grant.room -= n;
                grant.used += n;
                true
            }
            _ => false,
        }
    }

    /// The grant to ask for at the next count of `owner`, which inserts `n`.
    fn wanted(&self, owner: &str, n: u64) -> u64 {
        let used = self.owners.get(owner).map_or(0, |grant| grant.used);
        (2 * (used + n)).max(MIN_GRANT)
    }

    fn granted(&mut self, owner: &str, room: u64, at: Instant) {
        if self.owners.len() >= MAX_GRANTS {
            self.owners.clear();
        }
        self.owners.insert(owner.to_owned(), Grant { room, at, used: 0 });
    }
}

/// Inserts a batch. The submissions of owners with room granted to this process go in one
/// statement, as they did before quotas; the others are counted and inserted under their
/// quota's lock, owner by owner, as many as fit (in the order they came; the rest get 429).
///
/// The bound holds with any number of API processes: a process fills only room granted to it,
/// which the others take as filled until it lapses. The price: near its quota, an owner may get
/// 429 up to `GRANT_SECS` early from one process while another holds a grant (at most twice
/// what that one inserted for the owner lately).
/// (Counting every batch instead costs a scan of the owner's queue per statement; a counter
/// updated with every insert and pick slowed both in `make bench`.)
async fn insert(pool: &PgPool, quota: Quota, grants: &mut Grants, batch: Vec<Submission>) {
    let mut owners: HashMap<String, u64> = HashMap::new();
    for submission in &batch {
        *owners.entry(submission.owner.clone()).or_default() += 1;
    }
    let granted: HashSet<String> = owners
        .iter()
        .filter(|(owner, n)| grants.take(owner, **n))
        .map(|(o, _)| o.clone())
        .collect();
    let (quick, counted): (Vec<Submission>, Vec<Submission>) =
        batch.into_iter().partition(|s| granted.contains(&s.owner));
    if !quick.is_empty() {
        let rows = rows(&quick);
        let inserted = store::insert_many(pool, &rows).await.map_err(ApiError::from);
        drop(rows);
        // A failed insert leaves the room taken here: the next count puts it right.
        answer(quick, inserted.map(|tasks| tasks.into_iter().map(Ok).collect()));
    }
    let mut by_owner: HashMap<String, Vec<Submission>> = HashMap::new();
    for submission in counted {
        by_owner.entry(submission.owner.clone()).or_default().push(submission);
    }
    let Quota(max) = quota;
    for (owner, submissions) in by_owner {
        let rows = rows(&submissions);
        let started = Instant::now();
        let wanted = grants.wanted(&owner, rows.len() as u64);
        let result =
            store::insert_within_quota(pool, grants.process, &owner, &rows, max, wanted).await;
        drop(rows);
        let outcome = match result {
            Ok(WithinQuota { inserted, granted }) => {
                // From before the count: the grant lapses in the database `GRANT_SECS` after it.
                grants.granted(&owner, granted, started);
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
        let Some((pool, config)) = required(&rocket, "the intake") else {
            return Err(rocket);
        };
        let (sender, receiver) = mpsc::unbounded_channel();
        let (quota, process) = (Quota(config.max_queued_per_owner), Uuid::new_v4());
        tokio::spawn(run(pool.clone(), quota, process, receiver));
        Ok(rocket.manage(Intake { submissions: sender, pool, quota }))
    })
}
