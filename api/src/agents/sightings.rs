//! What this process saw of the agents since it last wrote: who has a request in flight or
//! made one, which version and run (instance) it sent, how many task ends it reported. Written
//! in one statement per `TICK` at most, and only when something changed or a present agent's
//! sighting is due again (every third of the lease, so that a present agent never looks gone).
//! Times go to the database as ages ("seen so many seconds ago"), so that every stored time is
//! by the database's clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

/// How often the writer looks at the sightings.
pub const TICK: Duration = Duration::from_secs(2);

/// Sightings not yet written, shared by the request guards and the writer.
#[derive(Clone)]
pub struct Sightings {
    inner: Arc<Mutex<HashMap<String, Entry>>>,
    /// How often a present agent's sighting is written again when nothing else changed.
    refresh: Duration,
}

#[derive(Default)]
struct Entry {
    /// Requests of this agent being answered right now (a parked pick, a held heartbeat).
    in_flight: u32,
    /// The end of its latest request since the last write.
    seen: Option<Instant>,
    version: Option<String>,
    instance: Option<Uuid>,
    /// The tags it declared on its latest pick, sorted and joined by commas.
    tags: Option<String>,
    /// `version`, `instance` or `tags` changed since the last write.
    changed: bool,
    /// Task ends it reported since the last write.
    finished: u64,
    /// When it was last written; never, for an agent new to this process.
    written: Option<Instant>,
}

/// One agent's row to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Sighting {
    pub name: String,
    pub version: Option<String>,
    pub instance: Option<Uuid>,
    /// Its tags, sorted and joined by commas, when it declared them (a pick does).
    pub tags: Option<String>,
    /// How long ago it was last seen (0 while a request of it is in flight).
    pub ago_secs: f64,
    pub finished: u64,
}

impl Sightings {
    pub fn new(refresh: Duration) -> Sightings {
        Sightings { inner: Arc::default(), refresh }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while the lock was held leaves counts that are still counts.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A request of agent `name` has arrived; it is present until the returned guard drops.
    pub fn arrive(&self, name: &str, version: Option<&str>, instance: Option<Uuid>) -> Presence {
        let mut entries = self.entries();
        let entry = entries.entry(name.to_owned()).or_default();
        entry.in_flight += 1;
        if let Some(version) = version {
            if entry.version.as_deref() != Some(version) {
                entry.version = Some(version.to_owned());
                entry.changed = true;
            }
        }
        if instance.is_some() && entry.instance != instance {
            entry.instance = instance;
            entry.changed = true;
        }
        Presence { sightings: self.clone(), name: name.to_owned() }
    }

    /// Agent `name` picks with `tags` (sorted, joined by commas; empty for none).
    pub fn declare_tags(&self, name: &str, tags: &str) {
        let mut entries = self.entries();
        let entry = entries.entry(name.to_owned()).or_default();
        if entry.tags.as_deref() != Some(tags) {
            entry.tags = Some(tags.to_owned());
            entry.changed = true;
        }
    }

    fn depart(&self, name: &str) {
        if let Some(entry) = self.entries().get_mut(name) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
            entry.seen = Some(Instant::now());
        }
    }

    /// Agent `name` reported the end of a task.
    pub fn finished(&self, name: &str) {
        self.entries().entry(name.to_owned()).or_default().finished += 1;
    }

    /// Agent `name` is leaving: what was not written of it, to be written with its leave.
    /// Its requests still in flight here are no sign of life any more.
    pub fn leave(&self, name: &str, instance: Option<Uuid>) -> Sighting {
        let entry = self.entries().remove(name).unwrap_or_default();
        Sighting {
            name: name.to_owned(),
            version: entry.version,
            instance: instance.or(entry.instance),
            tags: entry.tags,
            ago_secs: 0.0,
            finished: entry.finished,
        }
    }

    /// The rows to write now, if any: every agent that changed or was present, when one
    /// changed or one's sighting is due. Agents silent since their last write are forgotten.
    pub fn take_due(&self) -> Vec<Sighting> {
        let now = Instant::now();
        let mut entries = self.entries();
        let due = entries.values().any(|entry| {
            let present = entry.in_flight > 0 || entry.seen.is_some();
            let news = entry.written.is_none() || entry.changed || entry.finished > 0;
            let stale = entry.written.is_some_and(|written| now - written >= self.refresh);
            news || (present && stale)
        });
        let mut rows = Vec::new();
        if due {
            for (name, entry) in entries.iter_mut() {
                let present = entry.in_flight > 0 || entry.seen.is_some();
                if !present && entry.finished == 0 && !entry.changed {
                    continue;
                }
                let ago = match entry.seen {
                    Some(seen) if entry.in_flight == 0 => now - seen,
                    _ => Duration::ZERO,
                };
                rows.push(Sighting {
                    name: name.clone(),
                    version: entry.version.clone(),
                    instance: entry.instance,
                    tags: entry.tags.clone(),
                    ago_secs: ago.as_secs_f64(),
                    finished: entry.finished,
                });
                entry.seen = None;
                entry.finished = 0;
                entry.changed = false;
                entry.written = Some(now);
            }
        }
        entries.retain(|_, entry| self.keep(entry, now));
        // The same order in every process: concurrent writes lock the rows in one order.
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        rows
    }

    /// Whether to remember an agent: it is present, has something to write, or was written
    /// within the refresh period (so that its next request is not news).
    fn keep(&self, entry: &Entry, now: Instant) -> bool {
        entry.in_flight > 0
            || entry.seen.is_some()
            || entry.finished > 0
            || entry.written.is_some_and(|written| now - written < self.refresh)
    }

    /// A leave that could not be written: its counts go back, its sighting does not.
    pub fn restore_counts(&self, row: &Sighting) {
        if row.finished > 0 {
            self.entries().entry(row.name.clone()).or_default().finished += row.finished;
        }
    }

    /// Rows that could not be written: their counts go back, to be written next time (the
    /// sighting as of now: a little late is better than lost).
    pub fn restore(&self, rows: Vec<Sighting>) {
        let mut entries = self.entries();
        for row in rows {
            let entry = entries.entry(row.name).or_default();
            entry.finished += row.finished;
            entry.seen = entry.seen.or(Some(Instant::now()));
            entry.changed = true;
            if entry.version.is_none() {
                entry.version = row.version;
            }
            if entry.instance.is_none() {
                entry.instance = row.instance;
            }
            if entry.tags.is_none() {
                entry.tags = row.tags;
            }
            entry.written = None;
        }
    }
}

/// An agent's request in flight; its end is a sighting.
pub struct Presence {
    sightings: Sightings,
    name: String,
}

impl Presence {
    /// The registry this presence is noted in.
    pub fn sightings(&self) -> &Sightings {
        &self.sightings
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.sightings.depart(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_agent_is_written_at_once_then_only_when_due() {
        let sightings = Sightings::new(Duration::from_secs(3600));
        let presence = sightings.arrive("a", Some("1.0"), None);
        let rows = sightings.take_due();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].version.as_deref(), Some("1.0"));
        assert_eq!(rows[0].ago_secs, 0.0, "in flight: seen now");
        // Present, nothing changed, not due: nothing to write.
        assert!(sightings.take_due().is_empty());
        sightings.finished("a");
        let rows = sightings.take_due();
        assert_eq!((rows.len(), rows[0].finished), (1, 1));
        drop(presence);
        // Its request ended: a sighting, but not one that is due yet.
        assert!(sightings.take_due().is_empty());
        // A new run of it is news.
        let _again = sightings.arrive("a", Some("1.0"), Some(Uuid::new_v4()));
        let rows = sightings.take_due();
        assert!(rows[0].instance.is_some());
        // So are new tags, and they are written with every later sighting.
        sightings.declare_tags("a", "gpu,linux");
        let rows = sightings.take_due();
        assert_eq!(rows[0].tags.as_deref(), Some("gpu,linux"));
        sightings.finished("a");
        assert_eq!(sightings.take_due()[0].tags.as_deref(), Some("gpu,linux"));
    }

    #[test]
    fn a_present_agent_is_written_again_every_refresh() {
        let sightings = Sightings::new(Duration::ZERO);
        let _presence = sightings.arrive("a", None, None);
        assert_eq!(sightings.take_due().len(), 1);
        assert_eq!(sightings.take_due().len(), 1, "due again after the refresh");
    }

    #[test]
    fn a_silent_agent_is_forgotten_and_a_leave_takes_its_counts() {
        let sightings = Sightings::new(Duration::ZERO);
        drop(sightings.arrive("a", None, None));
        assert_eq!(sightings.take_due().len(), 1);
        assert!(sightings.take_due().is_empty());
        assert!(sightings.entries().is_empty(), "silent since its write");
        sightings.finished("b");
        let leave = sightings.leave("b", None);
        assert_eq!(leave.finished, 1);
        assert!(sightings.take_due().is_empty());
    }

    #[test]
    fn a_request_in_flight_at_the_leave_is_no_sighting() {
        let sightings = Sightings::new(Duration::ZERO);
        let parked = sightings.arrive("a", None, None);
        sightings.leave("a", None);
        drop(parked);
        assert!(sightings.take_due().is_empty());
    }

    #[test]
    fn restored_rows_are_written_again() {
        let sightings = Sightings::new(Duration::from_secs(3600));
        sightings.finished("a");
        let rows = sightings.take_due();
        sightings.restore(rows);
        let rows = sightings.take_due();
        assert_eq!(rows[0].finished, 1);
    }
}
