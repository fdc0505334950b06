//! `cleave-head --config FILE`: the same options as the flags, in TOML.
//!
//! A key is a long flag without its dashes, in snake or kebab case; flags on the command
//! line override the file. Rather than a second schema beside the flags (which would drift
//! from `--help`), the file is turned into arguments placed before the command line's, and
//! clap parses both: one set of names, defaults, ranges and error messages.
//!
//! ```toml
//! bundle = "/opt/cleave/efficientnet-lite0-split"
//! server = ["http://tail-a:50051", "http://tail-b:50051"]   # repeated flag: an array
//! on_link_down = "local"
//! deadline_ms = 10000
//! scene_threshold = 0.02
//! watch = "/var/lib/cleave-head/incoming"
//! metrics_listen = "0.0.0.0:9464"
//! learned_prior = false                                     # a switch: true or false
//! ```
//!
//! Unknown keys are errors that list the known ones, so a typo fails at start.

use toml::Value;

/// Turns the TOML `text` of `path` into `(--flag, value)` pairs (no value for a switch);
/// `known` are the long flag names (kebab case) that take a value, `switches` those that
/// take none.
///
/// # Errors
///
/// A message naming the file and the key: TOML syntax, an unknown key, a value of the
/// wrong kind (a table, a date, an array for a switch).
pub fn to_args(
    path: &str,
    text: &str,
    known: &[String],
    switches: &[String],
) -> Result<Vec<(String, Option<String>)>, String> {
    let table: toml::Table = text.parse().map_err(|e| format!("{path}: {e}"))?;
    let mut args = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let is_switch = switches.contains(&flag);
        if !is_switch && !known.contains(&flag) {
            let mut keys: Vec<String> = known
                .iter()
                .chain(switches)
                .map(|k| k.replace('-', "_"))
                .collect();
            keys.sort();
            return Err(format!(
                "{path}: unknown key `{key}`; the keys are the long flags: {}",
                keys.join(", ")
            ));
        }
        let bad = |what: &str| format!("{path}: `{key}` {what}");
        if is_switch {
            match value {
                Value::Boolean(true) => args.push((format!("--{flag}"), None)),
                Value::Boolean(false) => {}
                _ => return Err(bad("is a switch: true or false")),
            }
            continue;
        }
        let values = match value {
            Value::Array(items) => items,
            single => vec![single],
        };
        for item in values {
            let text = match item {
                Value::String(s) => s,
                Value::Integer(i) => i.to_string(),
                Value::Float(f) => f.to_string(),
                Value::Boolean(b) => b.to_string(),
                _ => return Err(bad("must be a string, a number or an array of them")),
            };
            args.push((format!("--{flag}"), Some(text)));
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn keys_become_flags_arrays_repeat_and_switches_appear_when_true() {
        let text = r#"
            server = ["http://a:1", "http://b:2"]
            deadline_ms = 500
            scene-threshold = 0.25
            learned_prior = true
            fast = false
        "#;
        let args = to_args(
            "head.toml",
            text,
            &names(&["server", "deadline-ms", "scene-threshold"]),
            &names(&["learned-prior", "fast"]),
        )
        .unwrap();
        // toml keeps keys sorted; clap does not care about the order.
        let pair = |flag: &str, value: Option<&str>| (flag.to_string(), value.map(str::to_string));
        let expected = [
            pair("--deadline-ms", Some("500")),
            pair("--learned-prior", None),
            pair("--scene-threshold", Some("0.25")),
            pair("--server", Some("http://a:1")),
            pair("--server", Some("http://b:2")),
        ];
        assert_eq!(args, expected);
    }

    #[test]
    fn typos_and_wrong_kinds_name_the_file_and_the_key() {
        let known = names(&["deadline-ms"]);
        let switches = names(&["learned-prior"]);
        let error = to_args("h.toml", "dedline_ms = 5", &known, &switches).unwrap_err();
        assert!(
            error.contains("h.toml") && error.contains("`dedline_ms`"),
            "{error}"
        );
        assert!(error.contains("deadline_ms"), "lists the keys: {error}");
        let error = to_args("h.toml", "learned_prior = 1", &known, &switches).unwrap_err();
        assert!(error.contains("switch"), "{error}");
        let error = to_args("h.toml", "deadline_ms = { a = 1 }", &known, &switches).unwrap_err();
        assert!(error.contains("`deadline_ms`"), "{error}");
        let error = to_args("h.toml", "deadline_ms = ", &known, &switches).unwrap_err();
        assert!(error.starts_with("h.toml"), "{error}");
    }
}
