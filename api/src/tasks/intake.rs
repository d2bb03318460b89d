//! Submissions coalesced: concurrent `POST /tasks` share one multi-row INSERT (a group commit).
//! An idle server inserts each task at once, alone; under load, every statement carries all
//! the submissions that arrived while the previous one ran, which saves the database a round
//! trip, a statement and a commit per task.

use rocket::fairing::AdHoc;
use sqlx::PgPool;
use taskexec_protocol::{NewTask, Task};
use tokio::sync::{mpsc, oneshot};

use super::store::{self, Inserted, NewRow};
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
    /// `QuotaExceeded` when the owner has `max_queued` tasks queued already (nothing is
    /// inserted); `Unavailable` when the database cannot be reached (or the server is
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

/// Takes whatever submissions are waiting, up to `MAX_BATCH`, and inserts them in one
/// statement, until the channel closes.
/// One statement at a time: while it runs, the next batch gathers. (Two in flight split the
/// batches and measured slower on two cores.)
async fn run(pool: PgPool, quota: Quota, mut submissions: mpsc::UnboundedReceiver<Submission>) {
    while let Some(first) = submissions.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match submissions.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        insert(&pool, quota, batch).await;
    }
}

async fn insert(pool: &PgPool, Quota(max): Quota, batch: Vec<Submission>) {
    let rows: Vec<NewRow<'_>> = batch
        .iter()
        .map(|s| NewRow { task: &s.task, timeout_secs: s.timeout_secs, owner: &s.owner })
        .collect();
    let inserted = store::insert_many(pool, &rows, max).await.map_err(ApiError::from);
    match inserted {
        Ok(outcomes) => {
            for (submission, outcome) in batch.into_iter().zip(outcomes) {
                let answer = match outcome {
                    Inserted::Task(task) => Ok(task),
                    Inserted::OverQuota => {
                        Err(ApiError::QuotaExceeded { owner: submission.owner.clone(), max })
                    }
                };
                let _ = submission.reply.send(answer);
            }
        }
        Err(error) => {
            for submission in batch {
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
