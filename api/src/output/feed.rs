//! Followers of one task's log in this API process share its reads. After an event, the first
//! follower to look reads the database; those that woke with it take the same answer. So a
//! thousand followers of a chatty task cost what one does: a read per new chunk per process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sqlx::PgPool;
use taskexec_protocol::{Stream, TaskId};
use tokio::time::Instant;

use super::store::{self, Standing, LOG_CHUNKS};
use crate::db::DbError;
use crate::dispatch::TaskEvents;

/// Bytes shared by every follower that sends them (a response body's item).
#[derive(Clone)]
pub struct Shared(pub Arc<[u8]>);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for Shared {
    fn from(bytes: Vec<u8>) -> Shared {
        Shared(bytes.into())
    }
}

/// A chunk of the log, shared.
#[derive(Clone)]
pub struct Chunk {
    pub seq: i64,
    pub stream: Stream,
    pub start: u64,
    pub data: Shared,
}

/// The feeds of the tasks being followed here (managed state).
#[derive(Clone, Default)]
pub struct Feeds {
    feeds: Arc<Mutex<HashMap<TaskId, Weak<Feed>>>>,
}

/// One task's feed, alive while a follower holds it.
pub struct Feed {
    id: TaskId,
    last: tokio::sync::Mutex<Option<LastRead>>,
    /// When the followers' look on the timer last moved on (see `safety_mark`).
    safety: Mutex<Instant>,
}

/// How often the followers of a task look at its log without an event, all of them together.
const SAFETY_LOOK: Duration = Duration::from_secs(60);

struct LastRead {
    after: i64,
    started: Instant,
    chunks: Vec<Chunk>,
    standing: Standing,
}

impl Feeds {
    pub fn feed(&self, id: TaskId) -> Arc<Feed> {
        let mut feeds = self.feeds.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(feed) = feeds.get(&id).and_then(Weak::upgrade) {
            return feed;
        }
        feeds.retain(|_, feed| feed.strong_count() > 0);
        let feed = Arc::new(Feed {
            id,
            last: tokio::sync::Mutex::new(None),
            safety: Mutex::new(Instant::now()),
        });
        feeds.insert(id, Arc::downgrade(&feed));
        feed
    }
}

impl Feed {
    /// The oldest read start a look on the timer takes: it moves on every `SAFETY_LOOK`, so the
    /// first follower to look after that reads, and the others take its read.
    pub fn safety_mark(&self) -> Instant {
        let mut mark = self.safety.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if mark.elapsed() >= SAFETY_LOOK {
            *mark = Instant::now();
        }
        *mark
    }

    /// The chunks after `after` (a `seq`) and how the task stands, from a read that started no
    /// earlier than `since` (when the caller began to watch the task's events): the last
    /// follower's when it did and covers `after`, else a new one. `None` when the task is gone.
    pub async fn read(
        &self,
        pool: &PgPool,
        events: &TaskEvents,
        after: i64,
        since: Instant,
    ) -> Result<Option<(Vec<Chunk>, Standing)>, DbError> {
        let mut last = self.last.lock().await;
        if let Some(read) = &*last {
            if read.started >= since && read.after <= after {
                let chunks: Vec<Chunk> =
                    read.chunks.iter().filter(|chunk| chunk.seq > after).cloned().collect();
                // A full read may have stopped short of newer chunks: nothing left of it
                // proves nothing.
                if !chunks.is_empty() || read.chunks.len() < LOG_CHUNKS {
                    return Ok(Some((chunks, read.standing.clone())));
                }
            }
        }
        let turn = events.look_turn().await;
        let started = Instant::now();
        let read = store::log(pool, self.id, None, after).await?;
        drop(turn);
        let Some((chunks, standing)) = read else {
            *last = None;
            return Ok(None);
        };
        let chunks: Vec<Chunk> = chunks
            .into_iter()
            .map(|c| Chunk { seq: c.seq, stream: c.stream, start: c.start, data: c.data.into() })
            .collect();
        *last =
            Some(LastRead { after, started, chunks: chunks.clone(), standing: standing.clone() });
        Ok(Some((chunks, standing)))
    }
}
