//! Caps on the requests that park on a task (`GET /tasks/<id>?wait`, `/output?wait`,
//! `/log?follow`): per token and per API process, so that one client cannot hold them all.
//! Parked, a request costs no statement (it wakes on the task's events), but it holds memory
//! and a connection; past a cap the answer is 429 for the token, 503 for the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::auth::Principal;
use crate::error::ApiError;

/// The counts of parked requests (managed state).
#[derive(Clone)]
pub struct WaitSlots {
    counts: Arc<Mutex<Counts>>,
    per_token: usize,
    per_process: usize,
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_token: HashMap<String, usize>,
}

/// One parked request; its slot is given back when it is dropped.
pub struct WaitSlot {
    slots: WaitSlots,
    token: String,
}

impl WaitSlots {
    pub fn new(per_token: usize, per_process: usize) -> WaitSlots {
        WaitSlots { counts: Arc::default(), per_token, per_process }
    }

    /// A slot for a request of `who`, or the reason it cannot park.
    pub fn take(&self, who: &Principal) -> Result<WaitSlot, ApiError> {
        // The token itself where there is one (several tokens may share a name), else the
        // shared token's name.
        let token = match (&who.id, &who.digest) {
            (Some(id), _) => id.to_string(),
            _ => who.name.clone(),
        };
        let mut counts = self.lock();
        if counts.total >= self.per_process {
            return Err(ApiError::Busy(format!(
                "this server holds {} waits and follows, as many as it may; retry later",
                self.per_process
            )));
        }
        let held = counts.by_token.entry(token.clone()).or_default();
        if *held >= self.per_token {
            return Err(ApiError::TooManyWaits(format!(
                "this token holds {} waits and follows, as many as it may at once",
                self.per_token
            )));
        }
        *held += 1;
        counts.total += 1;
        Ok(WaitSlot { slots: self.clone(), token })
    }

    /// How many requests hold a slot now.
    pub fn held(&self) -> usize {
        self.lock().total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for WaitSlot {
    fn drop(&mut self) {
        let mut counts = self.slots.lock();
        counts.total -= 1;
        if let Some(held) = counts.by_token.get_mut(&self.token) {
            *held -= 1;
            if *held == 0 {
                counts.by_token.remove(&self.token);
            }
        }
    }
}
