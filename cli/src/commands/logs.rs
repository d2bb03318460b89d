//! `taskexec logs`: a task's output, its raw bytes exactly, read by offset from the output
//! endpoint. Both streams by default, each to its own (stdout to stdout, stderr to stderr), as
//! `run` prints them; the combined `/log` is not used, since its markers and its one stream
//! would mix the two and add bytes the command never wrote. With `--stream`, that stream alone
//! goes to stdout, for a pipe. A reader that has gone (`| head`) ends the copy quietly.
//!
//! With `--output json`, the document is the task (`GET /tasks/<id>`), whose `stdout` and
//! `stderr` hold the output as text; with `--follow`, once it has ended.

use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use taskexec_protocol::{Stream, TaskId};

use super::Context;
use crate::args::Format;
use crate::client::Client;
use crate::follow::{self, Copied, Until};
use crate::progress::Spinner;
use crate::{render, Error};

pub fn logs(
    context: &Context,
    id: TaskId,
    follow: bool,
    stream: Option<Stream>,
) -> Result<ExitCode, Error> {
    let client = context.client()?;
    let until = if follow { Until::Ended } else { Until::CaughtUp };
    match context.format() {
        Format::Json => as_json(&client, id, until)?,
        Format::Text => copy(&client, id, until, stream)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The task, its output in it as text: now, or once it has ended.
fn as_json(client: &Client, id: TaskId, until: Until) -> Result<(), Error> {
    let task = match until {
        Until::Ended => {
            let spinner = Spinner::start(format!("waiting for task {id} to end"));
            let task = client.until_ended(id);
            spinner.clear();
            task?
        }
        Until::CaughtUp => client.task(id, Duration::ZERO)?,
    };
    render::emit(&render::json(&task)?)
}

/// The raw bytes: `stream` alone to stdout, or each stream to its own. The copies end
/// together: when one fails, or its reader has gone, the other is not waited for.
fn copy(
    client: &Arc<Client>,
    id: TaskId,
    until: Until,
    stream: Option<Stream>,
) -> Result<(), Error> {
    // The output, as it comes, is the progress.
    let spinner = Spinner::none();
    if let Some(stream) = stream {
        follow::copy(client, id, stream, &mut std::io::stdout(), until, &spinner)?;
        return Ok(());
    }
    let (done, copies) = mpsc::channel();
    for stream in Stream::ALL {
        let (client, done, spinner) = (client.clone(), done.clone(), spinner.clone());
        std::thread::spawn(move || {
            let mut sink = follow::own_sink(stream);
            let _ = done.send(follow::copy(&client, id, stream, &mut sink, until, &spinner));
        });
    }
    drop(done);
    for _ in Stream::ALL {
        // Each copy sends its end; a copy that panicked sends nothing, and once both are gone
        // the channel is closed.
        let copied = copies.recv().map_err(|_| Error::Internal("a copy panicked".into()))?;
        if copied? == Copied::ReaderGone {
            return Ok(());
        }
    }
    Ok(())
}
