//! How the API and the agent write a log line, in either of two formats (`LOG_FORMAT`):
//! `text`, for people (`time level target: message key=value…`), or `json`, one object per
//! line for log pipelines (`time`, `level`, `target`, `message` and each field). Fields are the
//! `log` crate's key-values (`log::info!(task:% = id; "task picked")`) and, for every line of a
//! process, its own (the agent's name).

use std::fmt::{self, Write as _};
use std::str::FromStr;

use log::kv::{Key, Value, VisitSource};
use log::Record;
use serde_json::{Map, Value as Json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<LogFormat, String> {
        match s.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("LOG_FORMAT={other:?}: expected text or json")),
        }
    }
}

impl LogFormat {
    /// `record` as one line (without its newline), with `fields` of the process after its own.
    pub fn line(
        self,
        record: &Record<'_>,
        message: &fmt::Arguments<'_>,
        fields: &[(&str, &str)],
    ) -> String {
        let time = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ");
        match self {
            LogFormat::Text => {
                let mut line =
                    format!("{time} {:<5} {}: {message}", record.level(), record.target());
                let mut text = Text(&mut line);
                let _ = record.key_values().visit(&mut text);
                for (key, value) in fields {
                    let _ = write!(line, " {key}={}", quoted(value));
                }
                line
            }
            LogFormat::Json => {
                let mut object = Map::new();
                object.insert("time".into(), Json::String(time.to_string()));
                object.insert("level".into(), Json::String(record.level().to_string()));
                object.insert("target".into(), Json::String(record.target().to_owned()));
                object.insert("message".into(), Json::String(message.to_string()));
                let _ = record.key_values().visit(&mut Object(&mut object));
                for (key, value) in fields {
                    object.insert((*key).to_owned(), Json::String((*value).to_owned()));
                }
                Json::Object(object).to_string()
            }
        }
    }
}

/// A value as text: bare when it is one word, quoted (Rust's escapes) otherwise, so that a
/// line always splits back into its fields.
fn quoted(value: &str) -> String {
    let bare =
        !value.is_empty() && value.chars().all(|c| c.is_ascii_graphic() && c != '"' && c != '=');
    if bare {
        value.to_owned()
    } else {
        format!("{value:?}")
    }
}

struct Text<'a>(&'a mut String);

impl<'kvs> VisitSource<'kvs> for Text<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        let _ = write!(self.0, " {key}={}", quoted(&value.to_string()));
        Ok(())
    }
}

struct Object<'a>(&'a mut Map<String, Json>);

impl<'kvs> VisitSource<'kvs> for Object<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        let json = if let Some(n) = value.to_u64() {
            Json::from(n)
        } else if let Some(n) = value.to_i64() {
            Json::from(n)
        } else if let Some(n) = value.to_f64() {
            Json::from(n)
        } else if let Some(b) = value.to_bool() {
            Json::from(b)
        } else {
            Json::String(value.to_string())
        };
        self.0.insert(key.to_string(), json);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(format: LogFormat) -> String {
        let task = "t-1";
        let fields = [("task", log::kv::Value::from_display(&task)), ("ms", 12u64.into())];
        let record = Record::builder()
            .level(log::Level::Info)
            .target("taskexec_api::tasks")
            .key_values(&fields)
            .build();
        format.line(&record, &format_args!("task picked"), &[("agent", "a b")])
    }

    #[test]
    fn text_lines_carry_the_fields_after_the_message() {
        let line = render(LogFormat::Text);
        assert!(
            line.ends_with(r#"INFO  taskexec_api::tasks: task picked task=t-1 ms=12 agent="a b""#),
            "{line}"
        );
    }

    #[test]
    fn json_lines_are_one_object_with_typed_fields() {
        let line: Json = serde_json::from_str(&render(LogFormat::Json)).unwrap();
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["message"], "task picked");
        assert_eq!(line["task"], "t-1");
        assert_eq!(line["ms"], 12);
        assert_eq!(line["agent"], "a b");
        assert!(line["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn formats_are_named() {
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert!("yaml".parse::<LogFormat>().unwrap_err().contains("text or json"));
    }
}
