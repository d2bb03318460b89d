//! The command line's grammar (clap derive): the global settings, the subcommands and their
//! help. Values whose rule is known here (a tag, a variable's name, a duration, a status) are
//! checked while parsing, so that a bad one is a usage error (exit 2) before any call.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{value_parser, Args, Parser, Subcommand, ValueEnum};
use clap_complete::Shell;
use taskexec_protocol::{is_env_name, is_tag, Role, Stream, TaskId, TaskStatus, TokenId};

const AFTER_HELP: &str = "\
Settings, the first found wins: the flags; the environment (TASKEXEC_URL, TASKEXEC_TOKEN, then
TASKEXEC_TOKEN_FILE, TASKEXEC_CA_FILE); the config file that `taskexec login` writes
(~/.config/taskexec/config.toml on Linux, readable only by its owner).

A token given with --token can be read by every user of this machine in `ps`; one given
through TASKEXEC_TOKEN, TASKEXEC_TOKEN_FILE or the config file cannot.

Exit codes: 0 done; 1 the command or the API failed, or the settings are missing or wrong (no
token, a config file that cannot be read); one line on stderr says what to do. 2 bad
arguments. `run` exits with the command's own exit code, 125 when the task failed (it could
not start, timed out, or its agent was lost), 130 when it was cancelled, and 141 when its
output's reader went away (`| head`): the task is aborted, as SIGPIPE would end a local one.";

/// taskexec's command line: run shell commands on taskexec's agents as if they ran here,
/// and look after tasks, agents and tokens.
#[derive(Debug, Parser)]
#[command(name = "taskexec", version, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the API is, who is calling, and how answers are shown: accepted by every command.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Settings")]
pub struct Global {
    /// The API's address [default: the config file's, else http://localhost:3500]
    #[arg(long, env = "TASKEXEC_URL", global = true, value_name = "URL")]
    pub url: Option<String>,
    /// The API token. Every user of this machine can read it in `ps`: prefer TASKEXEC_TOKEN,
    /// TASKEXEC_TOKEN_FILE or `taskexec login`
    #[arg(
        long,
        env = "TASKEXEC_TOKEN",
        hide_env_values = true,
        global = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// A file that holds the API token
    #[arg(long, env = "TASKEXEC_TOKEN_FILE", global = true, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// PEM certificates to trust besides the system's roots, for an https:// API behind a
    /// private CA
    #[arg(long, env = "TASKEXEC_CA_FILE", global = true, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// text for people (a table when stdout is a terminal, tab-separated lines otherwise);
    /// json for scripts: one document, in the API's own shapes
    #[arg(long, short = 'o', value_enum, default_value_t = Format::Text, global = true)]
    pub output: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs a command on an agent as if it ran here.
    ///
    /// Its stdout and stderr come here as it runs, and taskexec exits with its exit code (125
    /// when the task failed without one, 130 when it was cancelled). Ctrl-C aborts the task
    /// and waits for its end; a second Ctrl-C stops waiting. When the reader of its output goes
    /// away (`| head`), the task is aborted and taskexec exits 141, as SIGPIPE would end it.
    #[command(override_usage = "taskexec run [OPTIONS] [--] <COMMAND>...")]
    Run(RunArgs),
    /// Shows a task: its status, exit code and output (as text, capped).
    Get {
        id: TaskId,
        /// Wait until the task has ended.
        #[arg(long)]
        wait: bool,
    },
    /// Prints a task's output, its raw bytes exactly.
    ///
    /// stdout goes to stdout and stderr to stderr; with --stream, that stream alone goes to
    /// stdout. With --output json: the task, as `get` shows it, whose stdout and stderr hold
    /// the output as text (both streams, capped); with --follow, once the task has ended.
    Logs {
        id: TaskId,
        /// Keep printing output as it comes, until the task ends.
        #[arg(long, short)]
        follow: bool,
        /// Only this stream, on stdout.
        #[arg(long, value_parser = one_of::<Stream>(Stream::ALL.map(Stream::as_str)))]
        stream: Option<Stream>,
    },
    /// Lists tasks, newest first (a submitter sees its own).
    Ls(ListArgs),
    /// Aborts a task: a queued one is cancelled at once, a running one is stopped by its agent.
    Abort { id: TaskId },
    /// Lists the agents seen in the last day and what each is doing.
    Agents,
    /// Creates, lists and revokes API tokens (an admin's token is needed).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Saves the API's address and a token in the config file.
    ///
    /// The token is read from stdin, or asked for without echo, never from the command line;
    /// it is tried on the API before it is saved. The file is readable only by its owner.
    Login,
    /// Prints the completion script of a shell.
    ///
    /// For example: taskexec completions bash >
    /// ~/.local/share/bash-completion/completions/taskexec
    ///
    /// The script is text: --output json is refused (exit 2).
    Completions { shell: Shell },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Only an agent with this tag takes the task (repeat for several: it needs them all).
    #[arg(long = "tag", value_name = "TAG", value_parser = tag)]
    pub tags: Vec<String>,
    /// -100 to 100: higher runs first [default: 0]
    #[arg(
        long,
        allow_negative_numbers = true,
        value_parser = value_parser!(i32).range(-100..=100)
    )]
    pub priority: Option<i32>,
    /// How long the command may run, such as 90s, 10m or 2h [default: the server's, 1h]
    #[arg(long, value_name = "DURATION", value_parser = timeout_secs)]
    pub timeout: Option<u32>,
    /// A variable for the command's environment (repeat for several).
    #[arg(long = "env", short = 'e', value_name = "NAME=VALUE", value_parser = env_var)]
    pub env: Vec<(String, String)>,
    /// The absolute path on the agent that the command starts in.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Print the task's id and return at once, leaving the task to run.
    #[arg(long, short)]
    pub detach: bool,
    /// The command and its arguments, best after `--`: the agent's shell gets them quoted,
    /// word for word (for a script, pass sh -c 'SCRIPT').
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only tasks in this state.
    #[arg(long, value_parser = one_of::<TaskStatus>(TaskStatus::ALL.map(TaskStatus::as_str)))]
    pub status: Option<TaskStatus>,
    /// Only tasks of this owner (the name of the token that submitted them).
    #[arg(long)]
    pub owner: Option<String>,
    /// Tasks per page, 1 to 1000 [default: the server's, 100]
    #[arg(long, value_parser = value_parser!(u32).range(1..=1000))]
    pub limit: Option<u32>,
    /// Every page, not only the first.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Creates a token and prints its secret alone on stdout: it is shown only this once.
    Create {
        /// Who holds it (letters, digits, `._@-`); a submitter's tasks are owned by this name.
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = one_of::<Role>(Role::ALL.map(Role::as_str)))]
        role: Role,
        /// How long it lasts, such as 90d or 12h [default: for ever]
        #[arg(long, value_name = "DURATION", value_parser = whole_secs)]
        expires: Option<u64>,
        /// For an agent token: the only X-Agent-Name it may present.
        #[arg(long)]
        agent_name: Option<String>,
    },
    /// Lists the tokens, without their secrets.
    List,
    /// Revokes a token: every API process refuses it within seconds.
    Revoke {
        /// The token's id, as `taskexec token list` shows it.
        id: TokenId,
    },
}

/// A parser that takes one of `names` (listed in `--help` and completions) and parses it.
fn one_of<T>(names: impl IntoIterator<Item = &'static str>) -> impl TypedValueParser<Value = T>
where
    T: std::str::FromStr + Clone + Send + Sync + 'static,
    T::Err: Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
{
    PossibleValuesParser::new(names).try_map(|name| name.parse::<T>())
}

fn tag(text: &str) -> Result<String, String> {
    if is_tag(text) {
        Ok(text.to_owned())
    } else {
        Err("a tag is 1 to 64 of a-z, 0-9, `_.-`, starting with a letter or digit".into())
    }
}

fn env_var(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if is_env_name(name) => Ok((name.to_owned(), value.to_owned())),
        Some((name, _)) => Err(format!("{name:?} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)")),
        None => Err("expected NAME=VALUE".into()),
    }
}

/// A duration of whole seconds, at least one.
fn whole_secs(text: &str) -> Result<u64, String> {
    let duration: Duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration.subsec_nanos() != 0 || duration.as_secs() == 0 {
        return Err("expected whole seconds, at least 1s (such as 90s, 10m or 2h)".into());
    }
    Ok(duration.as_secs())
}

fn timeout_secs(text: &str) -> Result<u32, String> {
    let secs = whole_secs(text)?;
    u32::try_from(secs).map_err(|_| "too long (the server takes at most 24h)".to_owned())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_grammar_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_the_command_after_its_options_with_or_without_dashes() {
        let cli = Cli::parse_from([
            "taskexec",
            "run",
            "--tag",
            "gpu",
            "-e",
            "A=b=c",
            "--timeout",
            "10m",
            "--priority",
            "-5",
            "--",
            "sh",
            "-c",
            "exit 7",
        ]);
        let Command::Run(run) = cli.command else { panic!("not run: {cli:?}") };
        assert_eq!(run.tags, ["gpu"]);
        assert_eq!(run.env, [("A".to_owned(), "b=c".to_owned())]);
        assert_eq!((run.timeout, run.priority), (Some(600), Some(-5)));
        assert_eq!(run.command, ["sh", "-c", "exit 7"]);
        let bare = Cli::parse_from(["taskexec", "run", "ls", "-l", "--tag", "x"]);
        let Command::Run(bare) = bare.command else { panic!("not run") };
        assert_eq!(bare.command, ["ls", "-l", "--tag", "x"], "what follows the command is its");
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            &["taskexec", "run", "--tag", "GPU", "--", "true"][..],
            &["taskexec", "run", "-e", "1A=b", "--", "true"],
            &["taskexec", "run", "--timeout", "1.5s", "--", "true"],
            &["taskexec", "run", "--priority", "101", "--", "true"],
            &["taskexec", "ls", "--status", "done"],
            &["taskexec", "get", "not-a-uuid"],
            &["taskexec", "run"],
        ] {
            let error = Cli::try_parse_from(args).expect_err("refused");
            assert_eq!(error.exit_code(), 2, "{args:?}");
        }
    }
}
