//! Where the API is and which token to present, the first found winning: the flags and the
//! environment (clap reads both into [`Global`]), then the config file that `taskexec login`
//! writes. The file holds a secret, so it is written readable by its owner only.

use std::io::Write;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::args::Global;
use crate::Error;

/// The API's address when neither the flags, the environment nor the file name one.
pub const DEFAULT_URL: &str = "http://localhost:3500";

/// What the config file holds (`url = "…"`, `token = "tex_…"`, `ca_file = "/…/ca.pem"`).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// The settings a command runs with.
pub struct Settings {
    pub url: String,
    /// None when no source has one: only `login` and `completions` do without.
    pub token: Option<SecretString>,
    pub ca_file: Option<PathBuf>,
}

impl Settings {
    /// The settings from the flags and the environment (`global`), then the file's.
    ///
    /// # Errors
    ///
    /// `Config` when `TASKEXEC_TOKEN_FILE` cannot be read or holds no token.
    pub fn resolve(global: &Global, file: FileConfig) -> Result<Settings, Error> {
        let token_file = given_path(&global.token_file);
        let token = match (given(&global.token), token_file, given(&file.token)) {
            (Some(token), _, _) => Some(token),
            (None, Some(path), _) => Some(read_token_file(path)?),
            (None, None, token) => token,
        };
        let url = given(&global.url).or(given(&file.url));
        Ok(Settings {
            url: url.unwrap_or_else(|| DEFAULT_URL.to_owned()),
            token: token.map(|token| SecretString::from(token.trim().to_owned())),
            ca_file: given_path(&global.ca_file).cloned().or(file.ca_file),
        })
    }
}

/// Whether the flags and the environment name both the API and the token, so that a command
/// can do without the config file.
pub fn given_without_file(global: &Global) -> bool {
    given(&global.url).is_some()
        && (given(&global.token).is_some() || given_path(&global.token_file).is_some())
}

/// A value that is set: a variable set to nothing (`TASKEXEC_TOKEN= taskexec ls`) counts as
/// not set.
fn given(value: &Option<String>) -> Option<String> {
    value.clone().filter(|v| !v.trim().is_empty())
}

fn given_path(path: &Option<PathBuf>) -> Option<&PathBuf> {
    path.as_ref().filter(|path| !path.as_os_str().is_empty())
}

fn read_token_file(path: &Path) -> Result<String, Error> {
    let token = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("TASKEXEC_TOKEN_FILE {}: {e}", path.display())))?;
    if token.trim().is_empty() {
        return Err(Error::Config(format!("TASKEXEC_TOKEN_FILE {} is empty", path.display())));
    }
    Ok(token)
}

/// The config file's place: `taskexec/config.toml` in the platform's config directory
/// (`$XDG_CONFIG_HOME`, else `~/.config`, on Linux).
///
/// # Errors
///
/// `Config` when the platform has no config directory (no home directory).
pub fn path() -> Result<PathBuf, Error> {
    dirs::config_dir()
        .map(|dir| dir.join("taskexec").join("config.toml"))
        .ok_or_else(|| Error::Config("no config directory: is HOME set?".into()))
}

/// The file at `path`; empty settings when there is none.
///
/// # Errors
///
/// `Config` when it exists but cannot be read or parsed.
pub fn load(path: &Path) -> Result<FileConfig, Error> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {}", path.display(), e.message()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileConfig::default()),
        Err(e) => Err(Error::Config(format!("{}: {e}", path.display()))),
    }
}

/// Writes `config` to `path`, readable by its owner only (its folder too). The file is
/// written beside and renamed over the old one, so that neither a reader nor a crash ever
/// sees half of it, and a file that was once more open is replaced by a private one.
///
/// # Errors
///
/// `Io` when the folder or the file cannot be written.
pub fn save(path: &Path, config: &FileConfig) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    private_dir(dir)?;
    let text = toml::to_string(config).map_err(|e| Error::Unexpected(e.to_string()))?;
    let temporary = dir.join(format!(".config.toml.{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut file| file.write_all(text.as_bytes()).and_then(|()| file.sync_all()))
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(Error::io(format!("write {}", path.display()), e));
    }
    Ok(())
}

/// Creates `dir` (and its parents) readable by its owner only; a `dir` that exists already
/// and is ours is made so too. One that is another user's (a shared folder named with
/// XDG_CONFIG_HOME) is left as it is: its owner decides.
fn private_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let metadata =
        std::fs::metadata(dir).map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
    // SAFETY: geteuid takes nothing, touches no memory and cannot fail.
    let ours = metadata.uid() == unsafe { libc::geteuid() };
    if ours && metadata.mode() & 0o777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("make {} private", dir.display()), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;
    use crate::args::Format;

    fn global() -> Global {
        Global { url: None, token: None, token_file: None, ca_file: None, output: Format::Text }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("taskexec-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn flags_and_environment_win_over_the_file_and_the_default_comes_last() {
        let file = || FileConfig {
            url: Some("https://file:3500".into()),
            token: Some("tex_file\n".into()),
            ca_file: None,
        };
        let from_file = Settings::resolve(&global(), file()).unwrap();
        assert_eq!(from_file.url, "https://file:3500");
        assert_eq!(from_file.token.unwrap().expose_secret(), "tex_file");

        let given =
            Global { url: Some("http://flag".into()), token: Some("tex_flag".into()), ..global() };
        let given = Settings::resolve(&given, file()).unwrap();
        assert_eq!(given.url, "http://flag");
        assert_eq!(given.token.unwrap().expose_secret(), "tex_flag");

        let nothing = Settings::resolve(&global(), FileConfig::default()).unwrap();
        assert_eq!(nothing.url, DEFAULT_URL);
        assert!(nothing.token.is_none());

        let empty = Global { url: Some(String::new()), token: Some(" ".into()), ..global() };
        let empty = Settings::resolve(&empty, file()).unwrap();
        assert_eq!(empty.url, "https://file:3500", "set to nothing is not set");
        assert_eq!(empty.token.unwrap().expose_secret(), "tex_file");
    }

    #[test]
    fn a_token_file_beats_the_config_file_and_an_empty_one_is_refused() {
        let dir = scratch("token-file");
        std::fs::create_dir_all(&dir).unwrap();
        let (token, empty) = (dir.join("token"), dir.join("empty"));
        std::fs::write(&token, "tex_from_file\n").unwrap();
        std::fs::write(&empty, "\n").unwrap();
        let file = FileConfig { token: Some("tex_config".into()), ..FileConfig::default() };

        let read = Settings::resolve(&Global { token_file: Some(token), ..global() }, file);
        let refused = Settings::resolve(
            &Global { token_file: Some(empty), ..global() },
            FileConfig::default(),
        );

        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(read.unwrap().token.unwrap().expose_secret(), "tex_from_file");
        assert!(refused.is_err_and(|e| e.to_string().contains("is empty")));
    }

    #[test]
    fn the_saved_file_is_private_and_reads_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("save");
        let path = dir.join("taskexec").join("config.toml");
        let config = FileConfig {
            url: Some("https://api:3500".into()),
            token: Some("tex_secret".into()),
            ca_file: Some("/etc/ca.pem".into()),
        };

        save(&path, &config).unwrap();
        save(&path, &config).unwrap();

        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        let dir_mode = std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode();
        let back = load(&path).unwrap();
        let files = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((mode, dir_mode & 0o777), (0o600, 0o700));
        assert_eq!(back.token.as_deref(), Some("tex_secret"));
        assert_eq!(back.ca_file, config.ca_file);
        assert_eq!(files, 1, "no temporary file left behind");
        assert!(load(&dir.join("missing.toml")).unwrap().token.is_none());
    }

    #[test]
    fn an_open_folder_of_ours_is_made_private_when_the_file_is_saved() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("open-folder");
        let folder = dir.join("taskexec");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o755)).unwrap();

        save(&folder.join("config.toml"), &FileConfig::default()).unwrap();

        let mode = std::fs::metadata(&folder).unwrap().permissions().mode() & 0o777;
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn the_file_is_not_needed_when_the_api_and_the_token_are_given() {
        let both =
            Global { url: Some("http://api".into()), token: Some("tex_x".into()), ..global() };
        let token_file = Global {
            url: Some("http://api".into()),
            token_file: Some("/run/token".into()),
            ..global()
        };
        let no_token = Global { url: Some("http://api".into()), ..global() };
        let empty_url = Global { url: Some(" ".into()), token: Some("tex_x".into()), ..global() };

        assert!(given_without_file(&both) && given_without_file(&token_file));
        assert!(!given_without_file(&no_token) && !given_without_file(&empty_url));
    }
}
