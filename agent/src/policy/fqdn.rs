//! DNS name selectors: `toFQDNs` peers and `toPorts[].rules.dns` entries (`matchName`,
//! `matchPattern`), Cilium's semantics.
//!
//! - Names compare case-insensitively and without the trailing dot (`API.example.test.` is
//!   `api.example.test`).
//! - `matchPattern`: `*` within a label matches any run of characters of that label (`*`,
//!   `api-*`, `*.example.test` matches `a.example.test` but neither `example.test` nor
//!   `a.b.example.test`); a leading `**.` matches one or more labels of any depth
//!   (`**.example.test` matches `a.example.test` and `a.b.example.test`, not `example.test`); the
//!   pattern `*` alone matches every name.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use super::model::FieldError;

/// One validated, normalized name selector.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FqdnMatch {
    /// Exactly this name (lowercase, no trailing dot).
    Name(String),
    /// A pattern (lowercase, no trailing dot), see the module docs.
    Pattern(String),
}

/// What the DNS proxy has learned and still holds: each address with the names (normalized)
/// whose answers carried it. The compiler turns it into FQDN identities.
pub type LearnedNames = BTreeMap<IpAddr, BTreeSet<String>>;

/// Label key prefix of FQDN identities: `nodeward.io/fqdn.<selector>`, one per selector the
/// address satisfies. No pod can carry it (pods cannot claim `nodeward.io/` labels).
pub const FQDN_LABEL_PREFIX: &str = "nodeward.io/fqdn.";

/// The longest name DNS carries in text form (RFC 1035: 255 octets on the wire).
const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;

/// Lowercases and strips one trailing dot: the form names are compared in.
#[must_use]
pub fn normalize_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

impl FqdnMatch {
    /// Parses a `matchName`; `field` names it in errors.
    ///
    /// # Errors
    /// An empty or overlong name, an empty or overlong label, a character other than letters,
    /// digits, `-` and `_`.
    pub fn name(name: &str, field: &str) -> Result<Self, FieldError> {
        let n = normalize_name(name);
        check(&n, false)
            .map_err(|why| FieldError::new(field, format!("invalid matchName {name:?}: {why}")))?;
        Ok(Self::Name(n))
    }

    /// Parses a `matchPattern`; `field` names it in errors.
    ///
    /// # Errors
    /// As [`Self::name`], and `**` anywhere but as the whole first label.
    pub fn pattern(pattern: &str, field: &str) -> Result<Self, FieldError> {
        let p = normalize_name(pattern);
        check(&p, true).map_err(|why| {
            FieldError::new(field, format!("invalid matchPattern {pattern:?}: {why}"))
        })?;
        Ok(Self::Pattern(p))
    }

    /// Whether `name` (normalized with [`normalize_name`]) is selected.
    #[must_use]
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Name(n) => n == name,
            Self::Pattern(p) => pattern_matches(p, name),
        }
    }
}

impl fmt::Display for FqdnMatch {
    /// `name:api.example.test`, `pattern:*.example.test`: unique per selector, also the label of
    /// its identities.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(n) => write!(f, "name:{n}"),
            Self::Pattern(p) => write!(f, "pattern:{p}"),
        }
    }
}

fn check(s: &str, pattern: bool) -> Result<(), String> {
    if s.is_empty() {
        return Err("empty".into());
    }
    if s.len() > MAX_NAME {
        return Err(format!("longer than {MAX_NAME} characters"));
    }
    for (i, label) in s.split('.').enumerate() {
        if label.is_empty() {
            return Err("empty label".into());
        }
        if label.len() > MAX_LABEL {
            return Err(format!(
                "label {label:?} is longer than {MAX_LABEL} characters"
            ));
        }
        if pattern && label.contains("**") {
            if label != "**" || i != 0 {
                return Err("'**' may only be the whole first label ('**.example.com')".into());
            }
            if s == "**" {
                return Err(
                    "'**' needs a suffix ('**.example.com'); '*' matches every name".into(),
                );
            }
            continue;
        }
        if let Some(c) = label.chars().find(|c| {
            !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_' || (pattern && *c == '*'))
        }) {
            return Err(format!(
                "character {c:?} is not allowed (letters, digits, '-', '_'{})",
                if pattern { ", '*'" } else { "" }
            ));
        }
    }
    Ok(())
}

fn pattern_matches(pattern: &str, name: &str) -> bool {
    if pattern == "*" {
        return !name.is_empty();
    }
    let mut p: Vec<&str> = pattern.split('.').collect();
    let n: Vec<&str> = name.split('.').collect();
    if p.first() == Some(&"**") {
        p.remove(0);
        // One or more labels of any depth before the rest.
        if n.len() <= p.len() {
            return false;
        }
        let tail = &n[n.len() - p.len()..];
        return p.iter().zip(tail).all(|(p, n)| label_matches(p, n));
    }
    p.len() == n.len() && p.iter().zip(&n).all(|(p, n)| label_matches(p, n))
}

/// `*` matches any run (including none) of one label's characters. Greedy with one backtrack
/// point: linear in practice, at most `len(p) * len(n)` steps (both at most 63).
fn label_matches(p: &str, n: &str) -> bool {
    let (p, n) = (p.as_bytes(), n.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(p: &str) -> FqdnMatch {
        FqdnMatch::pattern(p, "f").expect("valid pattern")
    }

    #[test]
    fn names_match_exactly_ignoring_case_and_the_trailing_dot() {
        let m = FqdnMatch::name("API.Example.test.", "f").expect("valid");
        assert_eq!(m, FqdnMatch::Name("api.example.test".into()));
        assert!(m.matches(&normalize_name("api.example.test.")));
        assert!(!m.matches("other.example.test"));
        assert!(!m.matches("x.api.example.test"));
    }

    #[test]
    fn one_star_stays_within_its_label() {
        let m = pat("*.example.test");
        assert!(m.matches("api.example.test"));
        assert!(m.matches("other.example.test"));
        assert!(!m.matches("example.test"), "one label is required");
        assert!(!m.matches("a.b.example.test"), "one level only");
        assert!(!m.matches("api.example.testx"));
        let m = pat("api-*.example.test");
        assert!(m.matches("api-1.example.test"));
        assert!(m.matches("api-.example.test"));
        assert!(!m.matches("api.example.test"));
        let m = pat("a*b*c.test");
        assert!(m.matches("abc.test"));
        assert!(m.matches("axxbyyc.test"));
        assert!(m.matches("abbbc.test"));
        assert!(!m.matches("axxbyy.test"));
        assert!(pat("*").matches("anything.at.all"));
    }

    #[test]
    fn double_star_matches_any_depth_but_not_the_suffix_itself() {
        let m = pat("**.example.test");
        assert!(m.matches("a.example.test"));
        assert!(m.matches("a.b.c.example.test"));
        assert!(!m.matches("example.test"));
        assert!(!m.matches("a.example.other"));
        let m = pat("**.*.example.test");
        assert!(!m.matches("a.example.test"));
        assert!(m.matches("a.b.example.test"));
    }

    #[test]
    fn bad_selectors_say_why() {
        let err = |r: Result<FqdnMatch, FieldError>| r.expect_err("invalid").message;
        assert!(err(FqdnMatch::name("", "f")).contains("empty"));
        assert!(err(FqdnMatch::name("a..b", "f")).contains("empty label"));
        assert!(err(FqdnMatch::name("*.a", "f")).contains("'*' is not allowed"));
        assert!(err(FqdnMatch::name("a b", "f")).contains("' '"));
        assert!(err(FqdnMatch::name(&"a".repeat(64), "f")).contains("longer than 63"));
        assert!(err(FqdnMatch::name(&"a.".repeat(130), "f")).contains("longer than 253"));
        assert!(err(FqdnMatch::pattern("a.**.b", "f")).contains("first label"));
        assert!(err(FqdnMatch::pattern("**x.b", "f")).contains("first label"));
        assert!(err(FqdnMatch::pattern("**", "f")).contains("needs a suffix"));
        let e =
            FqdnMatch::pattern("a/b", "spec.egress[0].toFQDNs[1].matchPattern").expect_err("slash");
        assert_eq!(e.field, "spec.egress[0].toFQDNs[1].matchPattern");
        assert_eq!(
            e.message,
            "invalid matchPattern \"a/b\": character '/' is not allowed (letters, digits, '-', '_', '*')"
        );
    }

    #[test]
    fn a_hostile_pattern_is_cheap() {
        let p = format!("{}b", "*a".repeat(31));
        let m = pat(&p);
        let name = "a".repeat(63);
        let start = std::time::Instant::now();
        assert!(!m.matches(&name));
        assert!(start.elapsed() < std::time::Duration::from_millis(50));
    }
}
