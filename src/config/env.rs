//! `${VAR}` expansion over a parsed TOML document, before it is deserialised,
//! so that a missing variable is reported with the path of the field that named it.

use super::ConfigError;
use toml::Value;

/// Expands `${NAME}` in every string of `value`, reading names through `lookup`.
/// `$$` stands for a literal `$`.
pub fn expand(
    value: &mut Value,
    path: &mut Vec<String>,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        Value::String(s) if s.contains('$') => {
            *s = expand_str(s, lookup).map_err(|message| ConfigError::at(path, message))?;
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push(format!("[{i}]"));
                let r = expand(item, path, lookup);
                path.pop();
                r?;
            }
        }
        Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                path.push(key.clone());
                let r = expand(item, path, lookup);
                path.pop();
                r?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand_str(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos + 1..];
        if let Some(after) = tail.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(body) = tail.strip_prefix('{') {
            let Some(end) = body.find('}') else {
                return Err("unterminated `${` (write `$$` for a literal `$`)".into());
            };
            let name = &body[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "`${{{name}}}` is not a valid environment variable name"
                ));
            }
            match lookup(name) {
                Some(v) => out.push_str(&v),
                None => return Err(format!("environment variable {name} is not set")),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = tail;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "KEY").then(|| "v4lue".to_string())
    }

    #[test]
    fn expands_and_escapes() {
        assert_eq!(expand_str("a-${KEY}-b", &env).unwrap(), "a-v4lue-b");
        assert_eq!(expand_str("$$5 and $x", &env).unwrap(), "$5 and $x");
        assert!(
            expand_str("${MISSING}", &env)
                .unwrap_err()
                .contains("MISSING is not set")
        );
        assert!(
            expand_str("${KEY", &env)
                .unwrap_err()
                .contains("unterminated")
        );
        assert!(
            expand_str("${A-B}", &env)
                .unwrap_err()
                .contains("not a valid")
        );
    }
}
