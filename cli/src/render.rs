//! How answers are shown: JSON for scripts (the API's own shapes, one document), text for
//! people (a table when stdout is a terminal, tab-separated lines without a header when it is
//! not, for `cut` and `awk`).
//!
//! Text from the server (a command, an error, an agent's or a token's name, a problem's
//! detail) is shown through [`printable`]: a control character in it would otherwise reach
//! the terminal, where it can move the cursor, rewrite what was shown or set the title.

use std::io::Write;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use taskexec_protocol::{AgentInfo, Task, TaskStatus, TokenInfo};

use crate::Error;

/// The widest command a table shows; the rest is cut with an ellipsis.
const COMMAND_COLUMN: usize = 60;

/// Writes `text` to stdout. A reader that has gone (`| head`) ends the output quietly.
///
/// # Errors
///
/// `Io` when stdout cannot be written for another reason.
pub fn emit(text: &str) -> Result<(), Error> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::io("write stdout", e)),
        _ => Ok(()),
    }
}

/// `value` as one pretty JSON document and a newline.
pub fn json(value: &impl Serialize) -> Result<String, Error> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Unexpected(e.to_string()))?;
    Ok(text + "\n")
}

/// Rows under a header (when there is one): aligned columns for a terminal, else
/// tab-separated lines without the header. Every cell is made [`printable`], so that none
/// holds a tab or a line break of its own.
fn table(header: Option<&[&str]>, rows: Vec<Vec<String>>, terminal: bool) -> String {
    let rows: Vec<Vec<String>> =
        rows.into_iter().map(|row| row.iter().map(|cell| printable(cell)).collect()).collect();
    let mut out = String::new();
    if !terminal {
        for row in rows {
            out.push_str(&row.join("\t"));
            out.push('\n');
        }
        return out;
    }
    let header: Option<Vec<String>> =
        header.map(|header| header.iter().map(|title| title.to_string()).collect());
    let mut widths = vec![0; rows.first().or(header.as_ref()).map_or(0, Vec::len)];
    for row in header.iter().chain(&rows) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in header.iter().chain(&rows) {
        let cells: Vec<String> =
            row.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The tasks of a list, under the header when `header` (a page after the first has none).
pub fn tasks(tasks: &[Task], terminal: bool, header: bool) -> String {
    let rows = tasks
        .iter()
        .map(|task| {
            let command = printable(&task.command);
            let command = if terminal { shortened(&command, COMMAND_COLUMN) } else { command };
            vec![
                task.id.to_string(),
                task.status.to_string(),
                task.exit_code.map_or("-".into(), |code| code.to_string()),
                ago(task.created_at),
                task.owner.clone().unwrap_or_else(|| "-".into()),
                command,
            ]
        })
        .collect();
    let titles = ["ID", "STATUS", "EXIT", "CREATED", "OWNER", "COMMAND"];
    table(header.then_some(&titles[..]), rows, terminal)
}

/// The agents of `GET /agents`.
pub fn agents(agents: &[AgentInfo], terminal: bool) -> String {
    let rows = agents
        .iter()
        .map(|agent| {
            vec![
                agent.name.clone(),
                agent.state.to_string(),
                agent.current_task.map_or("-".into(), |id| id.to_string()),
                agent.tasks_finished.to_string(),
                ago(agent.last_seen_at),
                agent.version.clone().unwrap_or_else(|| "-".into()),
                if agent.tags.is_empty() { "-".into() } else { agent.tags.join(",") },
            ]
        })
        .collect();
    let header = ["NAME", "STATE", "TASK", "FINISHED", "SEEN", "VERSION", "TAGS"];
    table(Some(&header), rows, terminal)
}

/// The tokens of `GET /tokens`.
pub fn tokens(tokens: &[TokenInfo], terminal: bool) -> String {
    let when = |at: Option<DateTime<Utc>>| at.map_or("-".into(), timestamp);
    let rows = tokens
        .iter()
        .map(|token| {
            vec![
                token.id.to_string(),
                token.name.clone(),
                token.role.to_string(),
                token.agent_name.clone().unwrap_or_else(|| "-".into()),
                timestamp(token.created_at),
                when(token.expires_at),
                when(token.revoked_at),
                when(token.last_used_at),
            ]
        })
        .collect();
    let header = ["ID", "NAME", "ROLE", "AGENT", "CREATED", "EXPIRES", "REVOKED", "LAST USED"];
    table(Some(&header), rows, terminal)
}

/// How a task stands, in a few words: `finished, exit code 0`, `failed: timed out after 60 s`.
/// The error (an agent's free text) and the names in it are made [`printable`].
pub fn standing(task: &Task) -> String {
    match (task.status, task.exit_code, &task.error) {
        (TaskStatus::Finished, Some(code), _) => format!("finished, exit code {code}"),
        (TaskStatus::Failed, _, Some(error)) => format!("failed: {}", printable(error)),
        (TaskStatus::Cancelled, _, _) => match &task.aborted_by {
            Some(by) => format!("cancelled by {}", printable(by)),
            None => "cancelled".into(),
        },
        (TaskStatus::InProgress, _, _) => match &task.agent {
            Some(agent) => format!("in_progress on {}", printable(agent)),
            None => "in_progress".into(),
        },
        (status, _, _) => status.to_string(),
    }
}

/// One task, field by field, then its output as text: its lines and tabs as they are, its
/// other control characters made visible (`taskexec logs` has the raw bytes).
pub fn task(task: &Task) -> String {
    let mut fields: Vec<(&str, String)> = vec![
        ("id", task.id.to_string()),
        ("status", standing(task)),
        ("command", task.command.clone()),
        ("owner", task.owner.clone().unwrap_or_else(|| "-".into())),
        ("created", format!("{} ({})", timestamp(task.created_at), ago(task.created_at))),
        ("timeout", humantime::format_duration(seconds(task.timeout_secs)).to_string()),
    ];
    let options = &task.options;
    let optional = [
        ("run at", options.run_at.map(timestamp)),
        ("started", task.started_at.map(timestamp)),
        ("finished", task.finished_at.map(timestamp)),
        ("agent", task.agent.clone()),
        ("attempts", (task.attempts > 1).then(|| task.attempts.to_string())),
        (
            "retries",
            (options.max_retries > 0).then(|| format!("{}/{}", task.retries, options.max_retries)),
        ),
        ("tags", (!options.tags.is_empty()).then(|| options.tags.join(", "))),
        ("priority", (options.priority != 0).then(|| options.priority.to_string())),
        ("cwd", options.cwd.clone()),
        ("env", (!options.env.is_empty()).then(|| names(options.env.keys()))),
    ];
    fields.extend(optional.into_iter().filter_map(|(name, value)| Some((name, value?))));
    let mut out: String =
        fields.iter().map(|(name, value)| format!("{name:<10}{}\n", printable(value))).collect();
    let streams = [
        ("stdout", &task.stdout, task.stdout_bytes, task.stdout_truncated, task.stdout_lossy),
        ("stderr", &task.stderr, task.stderr_bytes, task.stderr_truncated, task.stderr_lossy),
    ];
    for (name, text, bytes, truncated, lossy) in streams {
        let Some(text) = text.as_deref().filter(|text| !text.is_empty()) else { continue };
        let mut notes = vec![format!("{bytes} bytes")];
        if truncated {
            notes.push("its middle dropped".into());
        }
        if lossy {
            notes.push("not UTF-8: `taskexec logs` has the bytes".into());
        }
        let text = escaped(text, |c| c.is_control() && c != '\n' && c != '\t');
        out.push_str(&format!("\n{name} ({}):\n{text}", notes.join(", ")));
        if !text.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

fn seconds(secs: i32) -> Duration {
    Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// The names of a task's variables, not their values: a value may be a secret.
fn names<'a>(names: impl Iterator<Item = &'a String>) -> String {
    names.map(String::as_str).collect::<Vec<_>>().join(", ")
}

/// `text` from the server, safe to show on a terminal and on one line: every control
/// character (a line break, a tab, an escape sequence's ESC, a C1 code) becomes its Rust escape
/// (`\n`, `\t`, `\u{1b}`).
pub fn printable(text: &str) -> String {
    escaped(text, char::is_control)
}

/// `text` with the characters that `escape` picks written as their Rust escapes.
fn escaped(text: &str, escape: impl Fn(char) -> bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn shortened(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let kept: String = text.chars().take(max - 1).collect();
    kept + "…"
}

fn timestamp(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// How long ago, in its largest unit: `12s ago`, `5m ago`, `3h ago`, `2d ago`.
fn ago(at: DateTime<Utc>) -> String {
    let secs = (Utc::now() - at).num_seconds().max(0);
    let (amount, unit) = match secs {
        0..=59 => (secs, "s"),
        60..=3599 => (secs / 60, "m"),
        3600..=86_399 => (secs / 3600, "h"),
        _ => (secs / 86_400, "d"),
    };
    format!("{amount}{unit} ago")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminal_gets_aligned_columns_and_a_pipe_gets_tab_separated_rows() {
        let rows = || vec![vec!["a".into(), "long cell".into()], vec!["bbb".into(), "x".into()]];

        let aligned = table(Some(&["ONE", "TWO"]), rows(), true);
        let piped = table(Some(&["ONE", "TWO"]), rows(), false);
        let headless = table(None, rows(), true);

        assert_eq!(aligned, "ONE  TWO\na    long cell\nbbb  x\n");
        assert_eq!(piped, "a\tlong cell\nbbb\tx\n");
        assert_eq!(headless, "a    long cell\nbbb  x\n");
    }

    #[test]
    fn no_control_character_from_the_server_reaches_the_terminal() {
        let hostile = "gone\x1b]0;owned\x07\r\n\tnext\u{9b}2J";
        assert_eq!(printable(hostile), "gone\\u{1b}]0;owned\\u{7}\\r\\n\\tnext\\u{9b}2J");
        let rows = vec![vec!["a\tb".into(), "line\nbreak\x1b[2J".into()]];
        assert_eq!(table(None, rows, false), "a\\tb\tline\\nbreak\\u{1b}[2J\n");
    }

    #[test]
    fn commands_are_shown_on_one_line_and_cut_to_fit() {
        assert_eq!(printable("echo a\n\techo b"), "echo a\\n\\techo b");
        assert_eq!(shortened("abcdef", 4), "abc…");
        assert_eq!(shortened("abc", 4), "abc");
    }

    #[test]
    fn ages_are_in_their_largest_unit() {
        let now = Utc::now();
        assert_eq!(ago(now - chrono::Duration::seconds(5)), "5s ago");
        assert_eq!(ago(now - chrono::Duration::minutes(90)), "1h ago");
        assert_eq!(ago(now - chrono::Duration::days(3)), "3d ago");
    }
}
