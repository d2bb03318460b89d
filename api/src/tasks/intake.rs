//! Submissions coalesced: concurrent `POST /tasks` share one multi-row INSERT (a group commit).
//! An idle server inserts each task at once, alone; under load, every statement carries all
//! the submissions that arrived while the previous one ran, which saves the database a round
//! trip, a statement and a commit per task.

use rocket::fairing::AdHoc;
use rocket_db_pools::Database;
use sqlx::PgPool;
use taskexec_protocol::{NewTask, Task};
use tokio::sync::{mpsc, oneshot};

use super::store::{self, NewRow};
use crate::error::ApiError;
use crate::Db;

/// The most submissions one statement carries.
const MAX_BATCH: usize = 256;

struct Submission {
    task: NewTask,
    timeout_secs: u32,
    reply: oneshot::Sender<Result<Task, ApiError>>,
}

/// The handle request handlers use (managed state).
pub struct Intake {
    submissions: mpsc::UnboundedSender<Submission>,
}

impl Intake {
    /// Inserts a queued task; returns once it is committed.
    ///
    /// # Errors
    /// `Unavailable` when the database cannot be reached (or the server is stopping).
    pub async fn submit(&self, task: NewTask, timeout_secs: u32) -> Result<Task, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.submissions
            .send(Submission { task, timeout_secs, reply })
            .map_err(|_| ApiError::Unavailable)?;
        answer.await.map_err(|_| ApiError::Unavailable)?
    }
}

/// Takes whatever submissions are waiting, up to `MAX_BATCH`, and inserts them in one
/// statement, until the channel closes.
/// One statement at a time: while it runs, the next batch gathers. (Two in flight split the
/// batches and measured slower on two cores.)
async fn run(pool: PgPool, mut submissions: mpsc::UnboundedReceiver<Submission>) {
    while let Some(first) = submissions.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match submissions.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        insert(&pool, batch).await;
    }
}

async fn insert(pool: &PgPool, batch: Vec<Submission>) {
    let rows: Vec<NewRow<'_>> =
        batch.iter().map(|s| NewRow { task: &s.task, timeout_secs: s.timeout_secs }).collect();
    let inserted = store::insert_many(pool, &rows).await.map_err(ApiError::from);
    match inserted {
        Ok(tasks) => {
            for (submission, task) in batch.into_iter().zip(tasks) {
                let _ = submission.reply.send(Ok(task));
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
        let Some(pool) = Db::fetch(&rocket).map(|db| db.pool().clone()) else {
            log::error!("the intake cannot start without its database pool");
            return Err(rocket);
        };
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(pool, receiver));
        Ok(rocket.manage(Intake { submissions: sender }))
    })
}
