//! `taskexec run`: submits a command and behaves as if it ran here. Its streams are copied
//! live, each to its own (see `follow`), and the exit code is the command's: 125 when the task
//! failed without one, 130 when it was cancelled, as `docker run` does.
//!
//! Everything the command waits for arrives as an [`Event`] on one channel: output copies that
//! end, the task's end, and Ctrl-C. Each thread that reports holds a [`Reporter`], which
//! reports even when the thread panics, so that the waiting always has an end. SIGINT is taken
//! over before the task is submitted, so that no Ctrl-C can leave a task running unbeknown:
//! the first asks the API to abort the task and goes on waiting for its end (with the rest of
//! its output); a second stops waiting, once the abort has gone out (or after a few seconds).
//! A reader of the output that has gone (`| head`) aborts the task, as SIGPIPE would end a
//! local command, and exits 141 without waiting for its end.

use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::iterator::SignalsInfo;
use signal_hook::low_level::siginfo::Cause;
use taskexec_protocol::{NewTask, ProblemType, Stream, Task, TaskId, TaskStatus};

use super::Context;
use crate::args::{Format, RunArgs};
use crate::client::Client;
use crate::follow::{self, Copied, Until};
use crate::progress::Spinner;
use crate::{quote, render, Error};

/// A task that failed without an exit code: it could not start, timed out, or its agent was
/// lost (`docker run` uses 125 for its own failures).
const FAILED: u8 = 125;
/// A cancelled task, and a Ctrl-C that stopped the waiting: 128 + SIGINT, as a shell reports.
const INTERRUPTED: u8 = 130;
/// The output's reader has gone: 128 + SIGPIPE, as a shell reports a command killed by it.
const READER_GONE: u8 = 141;
/// How long a second Ctrl-C waits for the first one's abort to reach the API.
const ABORT_CONFIRMATION: Duration = Duration::from_secs(5);

enum Event {
    /// SIGINT: typed on the terminal (Ctrl-C), or sent by a process.
    Interrupted { typed: bool },
    /// A stream's copy ended.
    Copied(Result<Copied, Error>),
    /// The task has ended, as the API shows it (boxed: a task is large, the other events small).
    Ended(Result<Box<Task>, Error>),
}

/// How the waiting ended.
enum End {
    Ended(Box<Task>),
    /// A second Ctrl-C.
    StoppedWaiting,
    /// The reader of the output has gone; the task was asked to abort.
    ReaderGone,
}

pub fn run(context: &Context, args: RunArgs) -> Result<ExitCode, Error> {
    let client = context.client()?;
    let new = NewTask {
        command: quote::join(&args.command),
        timeout_secs: args.timeout,
        tags: args.tags,
        priority: args.priority,
        env: args.env.into_iter().collect(),
        cwd: args.cwd,
        ..NewTask::default()
    };
    let (events, inbox) = mpsc::channel();
    if !args.detach {
        forward_interrupts(events.clone())?;
    }
    let task = client.submit(&new)?;
    if args.detach {
        context.show(&task, |task| format!("{}\n", task.id))?;
        return Ok(ExitCode::SUCCESS);
    }
    let spinner = Spinner::start(format!("task {}: waiting (Ctrl-C aborts it)", task.id));
    let copies = match context.format() {
        // JSON is the task at its end; the output is in it, as text.
        Format::Json => Vec::new(),
        Format::Text => {
            Stream::ALL.map(|stream| copy(&client, task.id, stream, &events, &spinner)).into()
        }
    };
    wait_for_end(&client, task.id, copies, events);
    let ended = match await_end(&client, task.id, &inbox, &spinner)? {
        End::Ended(ended) => ended,
        End::StoppedWaiting => return Ok(ExitCode::from(INTERRUPTED)),
        End::ReaderGone => return Ok(ExitCode::from(READER_GONE)),
    };
    spinner.clear();
    if context.format() == Format::Json {
        render::emit(&render::json(&ended)?)?;
    }
    let (code, reason) = exit_code(&ended);
    if let Some(reason) = reason {
        eprintln!("taskexec: {reason}");
    }
    Ok(ExitCode::from(code))
}

/// Turns SIGINT into events: from now on Ctrl-C no longer ends the process.
fn forward_interrupts(events: Sender<Event>) -> Result<(), Error> {
    let mut signals = SignalsInfo::<WithOrigin>::new([signal_hook::consts::SIGINT])
        .map_err(|e| Error::io("take over Ctrl-C (SIGINT)", e))?;
    std::thread::spawn(move || {
        for origin in signals.forever() {
            // The terminal's own SIGINT comes from the kernel; a `kill -INT` from a process.
            let typed = matches!(origin.cause, Cause::Kernel);
            if events.send(Event::Interrupted { typed }).is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// Sends an event once, when told or else when dropped: a thread that panics reports all the
/// same, and the waiting does not hang on a report that never comes.
struct Reporter {
    events: Sender<Event>,
    /// What is sent when the thread ends without having reported.
    fallback: Option<Event>,
}

impl Reporter {
    fn new(events: Sender<Event>, fallback: Event) -> Reporter {
        Reporter { events, fallback: Some(fallback) }
    }

    fn send(mut self, event: Event) {
        self.fallback = None;
        let _ = self.events.send(event);
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Some(event) = self.fallback.take() {
            let _ = self.events.send(event);
        }
    }
}

/// Copies `stream` live to its own, in a thread of its own, and reports how the copy ended.
fn copy(
    client: &Arc<Client>,
    id: TaskId,
    stream: Stream,
    events: &Sender<Event>,
    spinner: &Spinner,
) -> JoinHandle<()> {
    let (client, spinner) = (client.clone(), spinner.clone());
    let panicked = Error::Internal(format!("the copy of {stream} panicked"));
    let reporter = Reporter::new(events.clone(), Event::Copied(Err(panicked)));
    std::thread::spawn(move || {
        let mut sink = follow::own_sink(stream);
        let copied = follow::copy(&client, id, stream, &mut sink, Until::Ended, &spinner);
        reporter.send(Event::Copied(copied));
    })
}

/// Once the `copies` are over (both streams have ended, so has the task), asks for the task
/// until it has ended, in a thread of its own, and reports its end.
fn wait_for_end(
    client: &Arc<Client>,
    id: TaskId,
    copies: Vec<JoinHandle<()>>,
    events: Sender<Event>,
) {
    let client = client.clone();
    let panicked = Error::Internal("the wait for the task's end panicked".into());
    let reporter = Reporter::new(events, Event::Ended(Err(panicked)));
    std::thread::spawn(move || {
        for copy in copies {
            // A copy that panicked has reported it.
            let _ = copy.join();
        }
        reporter.send(Event::Ended(client.until_ended(id).map(Box::new)));
    });
}

/// Waits for the task's end, a second Ctrl-C, or the output's reader to go.
fn await_end(
    client: &Arc<Client>,
    id: TaskId,
    inbox: &Receiver<Event>,
    spinner: &Spinner,
) -> Result<End, Error> {
    let mut abort: Option<PendingAbort> = None;
    for event in inbox {
        match event {
            Event::Interrupted { typed } => {
                if typed {
                    spinner.clear_after_typed_ctrl_c();
                } else {
                    spinner.clear();
                }
                let Some(first) = abort.take() else {
                    eprintln!("taskexec: aborting task {id} (Ctrl-C again to stop waiting)");
                    abort = Some(PendingAbort::start(client, id));
                    continue;
                };
                eprintln!("taskexec: stopped waiting; see the task with: taskexec get {id}");
                if !first.confirmed_within(ABORT_CONFIRMATION) {
                    eprintln!(
                        "taskexec: the abort of task {id} was not confirmed; see taskexec get {id}"
                    );
                }
                return Ok(End::StoppedWaiting);
            }
            Event::Copied(Ok(Copied::Whole)) => {}
            Event::Copied(Ok(Copied::ReaderGone)) => {
                spinner.clear();
                if let Err(e) = request_abort(client, id) {
                    eprintln!("taskexec: the abort of task {id} failed: {}", printable(&e));
                }
                return Ok(End::ReaderGone);
            }
            Event::Copied(Err(e)) => return Err(e),
            Event::Ended(ended) => return ended.map(End::Ended),
        }
    }
    unreachable!("the task's end is reported before its reporter's sender goes")
}

/// An abort asked for in a thread of its own: a second Ctrl-C is heard even while an
/// unreachable API keeps the call waiting.
struct PendingAbort {
    thread: JoinHandle<bool>,
    /// Closed when the thread ends, however it ends.
    finished: Receiver<()>,
}

impl PendingAbort {
    fn start(client: &Arc<Client>, id: TaskId) -> PendingAbort {
        let client = client.clone();
        let (sender, finished) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let _closed_when_done = sender;
            match request_abort(&client, id) {
                Ok(()) => true,
                Err(e) => {
                    eprintln!("taskexec: the abort of task {id} failed: {}", printable(&e));
                    false
                }
            }
        });
        PendingAbort { thread, finished }
    }

    /// Whether the API took the abort, waiting for its answer up to `patience`.
    fn confirmed_within(self, patience: Duration) -> bool {
        match self.finished.recv_timeout(patience) {
            Err(RecvTimeoutError::Timeout) => false,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => self.thread.join().unwrap_or(false),
        }
    }
}

/// Asks the API to abort the task; a task that has ended meanwhile needs no abort.
fn request_abort(client: &Client, id: TaskId) -> Result<(), Error> {
    match client.abort(id) {
        Ok(_) | Err(Error::Api { kind: Some(ProblemType::TaskEnded), .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

fn printable(error: &Error) -> String {
    render::printable(&error.to_string())
}

/// The exit code of an ended task, and the reason to show when it is not the command's.
fn exit_code(task: &Task) -> (u8, Option<String>) {
    match task.status {
        TaskStatus::Finished => {
            (task.exit_code.and_then(|code| u8::try_from(code).ok()).unwrap_or(1), None)
        }
        TaskStatus::Cancelled => {
            (INTERRUPTED, Some(format!("task {} was {}", task.id, render::standing(task))))
        }
        _ => (FAILED, Some(format!("task {} {}", task.id, render::standing(task)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_panics_still_reports() {
        let (events, inbox) = mpsc::channel();
        let panicked = Error::Internal("panicked".into());
        let reporter = Reporter::new(events, Event::Copied(Err(panicked)));

        let thread = std::thread::spawn(move || {
            let _reporter = reporter;
            panic!("a bug");
        });

        assert!(thread.join().is_err());
        assert!(matches!(inbox.recv(), Ok(Event::Copied(Err(Error::Internal(_))))));
    }

    #[test]
    fn a_reporter_that_has_sent_sends_nothing_more() {
        let (events, inbox) = mpsc::channel();
        let reporter = Reporter::new(events, Event::Copied(Err(Error::Internal("lost".into()))));

        reporter.send(Event::Copied(Ok(Copied::Whole)));

        assert!(matches!(inbox.recv(), Ok(Event::Copied(Ok(Copied::Whole)))));
        assert!(inbox.recv().is_err(), "one event, then the channel is closed");
    }
}
