//! A spinner on stderr while the command waits, only when stderr is a terminal (indicatif),
//! and what it takes to clear it cleanly after a Ctrl-C typed on that terminal.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressFinish, ProgressStyle};

/// A spinner on stderr while the command waits. Clones share it; it is cleared before
/// anything else is written to the terminal, and when the last clone is dropped.
#[derive(Clone)]
pub struct Spinner(Option<ProgressBar>);

impl Spinner {
    /// A spinner saying `message`, when stderr is a terminal; else nothing.
    pub fn start(message: String) -> Spinner {
        if !std::io::stderr().is_terminal() {
            return Spinner(None);
        }
        let style = ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let bar = ProgressBar::new_spinner()
            .with_style(style)
            .with_message(message)
            .with_finish(ProgressFinish::AndClear);
        bar.enable_steady_tick(Duration::from_millis(100));
        Spinner(Some(bar))
    }

    /// No spinner: where the output itself shows the progress.
    pub fn none() -> Spinner {
        Spinner(None)
    }

    /// Removes it after a Ctrl-C typed on the terminal. indicatif pads its line to the
    /// terminal's right edge, so the terminal's echo of `^C` (ECHOCTL) wraps to the next line:
    /// that line is cleared first, then the spinner's, above it.
    pub fn clear_after_typed_ctrl_c(&self) {
        let Some(bar) = &self.0 else { return };
        if !bar.is_finished() && echoes_control_characters() {
            eprint!("\r\x1b[2K\x1b[1A");
        }
        bar.finish_and_clear();
    }

    /// Removes it from the terminal for good. Idempotent.
    pub fn clear(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

/// Whether the terminal on stderr echoes a typed control character (`^C`).
fn echoes_control_characters() -> bool {
    // SAFETY: tcgetattr only fills in the struct it is given; an all-zero termios is valid.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a termios of our own; stderr is a descriptor of the process.
    let read = unsafe { libc::tcgetattr(libc::STDERR_FILENO, &mut termios) } == 0;
    let echo = libc::ECHO | libc::ECHOCTL;
    read && termios.c_lflag & echo == echo
}
