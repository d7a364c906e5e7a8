//! `toPorts[].rules.http`: which HTTP requests an ingress allow rule lets through. Translated
//! here (pure, with named fields in errors), compiled onto the endpoint
//! ([`super::compiled::HttpAllow`]) and checked by the destination's agent for each request of
//! a tunnelled connection (`http::authz`).

use std::sync::Arc;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use regex::Regex;

use super::crd::PortRuleHttp;
use super::model::FieldError;

/// One `rules.http` entry: a request matches when every field given matches.
#[derive(Clone, Debug)]
pub struct HttpMatch {
    method: Option<Pattern>,
    path: Option<Pattern>,
    /// Name, and the exact value when one is required.
    headers: Vec<(HeaderName, Option<HeaderValue>)>,
}

/// A regular expression matching the whole text, kept with its source for equality and display.
#[derive(Clone, Debug)]
struct Pattern {
    source: String,
    regex: Regex,
}

impl PartialEq for HttpMatch {
    fn eq(&self, other: &Self) -> bool {
        let src = |p: &Option<Pattern>| p.as_ref().map(|p| p.source.clone());
        src(&self.method) == src(&other.method)
            && src(&self.path) == src(&other.path)
            && self.headers == other.headers
    }
}

impl Eq for HttpMatch {}

impl std::fmt::Display for HttpMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let method = self.method.as_ref().map_or("*", |p| p.source.as_str());
        let path = self.path.as_ref().map_or("*", |p| p.source.as_str());
        write!(f, "{method} {path}")?;
        for (name, value) in &self.headers {
            match value {
                Some(v) => write!(f, " {name}: {}", v.to_str().unwrap_or("?"))?,
                None => write!(f, " {name}")?,
            }
        }
        Ok(())
    }
}

impl HttpMatch {
    /// Whether a request with this method, path (no query) and headers matches.
    #[must_use]
    pub fn matches(&self, method: &str, path: &str, headers: &HeaderMap) -> bool {
        self.method
            .as_ref()
            .is_none_or(|p| p.regex.is_match(method))
            && self.path.as_ref().is_none_or(|p| p.regex.is_match(path))
            && self.headers.iter().all(|(name, value)| match value {
                None => headers.contains_key(name),
                Some(v) => headers.get_all(name).iter().any(|h| h == v),
            })
    }
}

/// The allowed requests of one `toPorts` entry.
pub type HttpRules = Arc<[HttpMatch]>;

/// Translates `rules.http` at `path` (`spec.ingress[0].toPorts[1].rules.http`).
///
/// # Errors
/// A method or path that is not a regular expression, a header that is not `Name` or
/// `Name: value`; the field is named.
pub fn translate(list: &[PortRuleHttp], path: &str) -> Result<HttpRules, FieldError> {
    let mut out = Vec::with_capacity(list.len());
    for (i, h) in list.iter().enumerate() {
        let field = format!("{path}[{i}]");
        let pattern = |src: &Option<String>, name: &str| {
            src.as_ref()
                .map(|s| {
                    anchored(s)
                        .map(|regex| Pattern {
                            source: s.clone(),
                            regex,
                        })
                        .map_err(|e| FieldError::new(format!("{field}.{name}"), e))
                })
                .transpose()
        };
        let method = pattern(&h.method, "method")?;
        let path = pattern(&h.path, "path")?;
        let mut headers = Vec::new();
        for (j, text) in h.headers.iter().flatten().enumerate() {
            let hfield = format!("{field}.headers[{j}]");
            let (name, value) = match text.split_once(':') {
                Some((n, v)) => (n.trim(), Some(v.trim())),
                None => (text.trim(), None),
            };
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                FieldError::new(
                    &hfield,
                    format!("{name:?} is not a header name (expected \"Name\" or \"Name: value\")"),
                )
            })?;
            let value = value
                .map(|v| {
                    HeaderValue::from_str(v).map_err(|_| {
                        FieldError::new(&hfield, format!("{v:?} is not a header value"))
                    })
                })
                .transpose()?;
            headers.push((name, value));
        }
        out.push(HttpMatch {
            method,
            path,
            headers,
        });
    }
    Ok(out.into())
}

/// A regular expression that must match the whole text (Cilium's and Envoy's matches are
/// whole-string), size-limited.
fn anchored(pattern: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 16)
        .build()
        .map_err(|e| format!("{pattern:?} is not a regular expression: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(method: Option<&str>, path: Option<&str>, headers: &[&str]) -> PortRuleHttp {
        PortRuleHttp {
            method: method.map(str::to_owned),
            path: path.map(str::to_owned),
            headers: (!headers.is_empty())
                .then(|| headers.iter().map(|h| (*h).to_owned()).collect()),
        }
    }

    #[test]
    fn methods_paths_and_headers_match_whole_values() {
        let rules = translate(
            &[
                rule(Some("GET|HEAD"), Some("/public(/.*)?"), &[]),
                rule(Some("POST"), Some("/admin"), &["x-admin: yes", "x-token"]),
            ],
            "f",
        )
        .unwrap();
        let none = HeaderMap::new();
        let mut admin = HeaderMap::new();
        admin.insert("x-admin", HeaderValue::from_static("yes"));
        admin.insert("x-token", HeaderValue::from_static("t"));
        assert!(rules[0].matches("GET", "/public", &none));
        assert!(rules[0].matches("HEAD", "/public/a/b", &none));
        assert!(!rules[0].matches("GET", "/publicity", &none), "anchored");
        assert!(!rules[0].matches("XGET", "/public", &none), "anchored");
        assert!(!rules[1].matches("POST", "/admin", &none));
        assert!(rules[1].matches("POST", "/admin", &admin));
        admin.insert("x-admin", HeaderValue::from_static("no"));
        assert!(!rules[1].matches("POST", "/admin", &admin));
        assert_eq!(rules[1].to_string(), "POST /admin x-admin: yes x-token");
    }

    #[test]
    fn bad_fields_are_named() {
        let e = translate(&[rule(None, None, &[]), rule(None, Some("(/a"), &[])], "p").unwrap_err();
        assert_eq!(e.field, "p[1].path");
        let e = translate(&[rule(Some("[z-a]"), None, &[])], "p").unwrap_err();
        assert_eq!(e.field, "p[0].method");
        let e = translate(&[rule(None, None, &["bad name: x"])], "p").unwrap_err();
        assert_eq!(e.field, "p[0].headers[0]");
    }
}
