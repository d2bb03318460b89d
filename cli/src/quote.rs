//! Words joined into a command line that a POSIX shell (and bash) splits back into the same
//! words, none of them expanded: what `taskexec run -- WORDS…` sends as the task's command.

/// The shell's reserved words: bare, one would be taken for syntax rather than a word.
const RESERVED: [&str; 22] = [
    "if", "then", "else", "elif", "fi", "do", "done", "case", "esac", "while", "until", "for",
    "in", "function", "select", "time", "coproc", "!", "{", "}", "[[", "]]",
];

/// `words` as one command line: each word [`quote`]d, separated by spaces.
pub fn join(words: &[String]) -> String {
    let quoted: Vec<String> =
        words.iter().enumerate().map(|(at, word)| quote(word, at == 0)).collect();
    quoted.join(" ")
}

/// `word` as the shell must see it to take it literally: bare when it is made only of
/// characters no shell treats specially and is not a reserved word, else in single quotes
/// (a `'` written as `'\''`); the empty word is `''`. The `first` word is quoted when it holds
/// a `=`, which would make it a variable's assignment rather than the command.
pub fn quote(word: &str, first: bool) -> String {
    let plain = word.chars().all(|c| c.is_ascii_alphanumeric() || "_./:@%+,=-".contains(c));
    let literal = !word.is_empty() && plain && !RESERVED.contains(&word);
    if literal && !(first && word.contains('=')) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(words: &[&str]) -> Vec<String> {
        words.iter().map(|word| word.to_string()).collect()
    }

    #[test]
    fn plain_words_stay_bare() {
        let line =
            join(&words(&["ls", "-l", "/tmp/a_b.c", "user@host:8080", "50%", "a+b,c", "k=v"]));
        assert_eq!(line, "ls -l /tmp/a_b.c user@host:8080 50% a+b,c k=v");
    }

    #[test]
    fn every_other_word_is_single_quoted_and_a_quote_in_it_escaped() {
        assert_eq!(quote("", false), "''");
        assert_eq!(quote("a b", false), "'a b'");
        assert_eq!(quote("it's", false), r"'it'\''s'");
        assert_eq!(quote("$HOME", false), "'$HOME'");
        assert_eq!(quote("*", false), "'*'");
        assert_eq!(quote("{a,b}", false), "'{a,b}'");
        assert_eq!(quote("~", false), "'~'");
        assert_eq!(quote("é", false), "'é'");
        assert_eq!(quote("a\nb", false), "'a\nb'");
    }

    #[test]
    fn reserved_words_are_quoted_wherever_they_stand() {
        for word in RESERVED {
            assert_eq!(quote(word, true), format!("'{word}'"));
            assert_eq!(quote(word, false), format!("'{word}'"));
        }
        assert_eq!(join(&words(&["!", "true"])), "'!' true");
        assert_eq!(join(&words(&["echo", "if", "then"])), "echo 'if' 'then'");
    }

    #[test]
    fn a_first_word_with_an_equals_sign_is_quoted_so_that_it_stays_the_command() {
        assert_eq!(join(&words(&["x=1", "y=2"])), "'x=1' y=2");
    }
}
