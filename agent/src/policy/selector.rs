//! Label selectors over an identity's security labels, and the label syntax checks that every
//! front end shares.
//!
//! A selector in the model always matches the *security labels* of a workload (see
//! [`crate::identity::security_labels`]): the pod's own labels plus the reserved
//! [`NAMESPACE_LABEL`], [`NS_LABEL_PREFIX`]`<key>` and [`SERVICE_ACCOUNT_LABEL`] labels. That is
//! how a namespace selector and a pod selector become one selector, and how a single identity
//! number answers both.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::model::FieldError;

/// The pod's namespace, as a security label.
pub const NAMESPACE_LABEL: &str = "nodeward.io/namespace";
/// Prefix of the namespace's labels, as security labels of its pods:
/// `nodeward.io/ns-label.<key>=<value>`.
pub const NS_LABEL_PREFIX: &str = "nodeward.io/ns-label.";
/// The pod's service account, as a security label.
pub const SERVICE_ACCOUNT_LABEL: &str = "nodeward.io/serviceaccount";
/// Pod labels under this prefix are not security labels (a pod cannot claim another namespace).
pub const RESERVED_PREFIX: &str = "nodeward.io/";
/// The label Kubernetes puts on every namespace (and which nodeward adds when a manifest lacks it).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Security labels of one workload.
pub type Labels = BTreeMap<String, String>;

/// A validated selector: the conjunction of its requirements. No requirement selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSelector {
    pub requirements: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operator {
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

impl Requirement {
    #[must_use]
    pub fn equals(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            operator: Operator::In(BTreeSet::from([value.into()])),
        }
    }

    #[must_use]
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match &self.operator {
            Operator::In(values) => value.is_some_and(|v| values.contains(v)),
            // Kubernetes semantics: a missing key satisfies NotIn.
            Operator::NotIn(values) => value.is_none_or(|v| !values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

impl LabelSelector {
    /// The selector that matches every label set.
    #[must_use]
    pub fn everything() -> Self {
        Self::default()
    }

    #[must_use]
    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    #[must_use]
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Adds a requirement (builder style).
    #[must_use]
    pub fn with(mut self, requirement: Requirement) -> Self {
        self.requirements.push(requirement);
        self
    }

    /// Whether some requirement is about a key for which `is_key` holds.
    pub fn constrains(&self, is_key: impl Fn(&str) -> bool) -> bool {
        self.requirements.iter().any(|r| is_key(&r.key))
    }

    /// Whether the selector says anything about the namespace: the namespace label itself or a
    /// namespace label (`nodeward.io/ns-label.*`).
    #[must_use]
    pub fn constrains_namespace(&self) -> bool {
        self.constrains(|k| k == NAMESPACE_LABEL || k.starts_with(NS_LABEL_PREFIX))
    }

    /// Builds a selector from the Kubernetes shape (`matchLabels` plus `matchExpressions`),
    /// validating keys, values and operators. `path` is the selector's field path, for errors.
    ///
    /// # Errors
    /// The first invalid key, value or operator, with its field path.
    pub fn parse<'a>(
        match_labels: Option<&BTreeMap<String, String>>,
        match_expressions: impl IntoIterator<Item = (&'a str, &'a str, Option<&'a [String]>)>,
        path: &str,
    ) -> Result<Self, FieldError> {
        let mut requirements = Vec::new();
        for (key, value) in match_labels.into_iter().flatten() {
            let field = format!("{path}.matchLabels.{key}");
            validate_label_key(key).map_err(|m| FieldError::new(&field, m))?;
            validate_label_value(value).map_err(|m| FieldError::new(&field, m))?;
            requirements.push(Requirement::equals(key, value));
        }
        for (i, (key, operator, values)) in match_expressions.into_iter().enumerate() {
            let field = format!("{path}.matchExpressions[{i}]");
            validate_label_key(key).map_err(|m| FieldError::new(format!("{field}.key"), m))?;
            let values = values.unwrap_or_default();
            for (j, v) in values.iter().enumerate() {
                validate_label_value(v)
                    .map_err(|m| FieldError::new(format!("{field}.values[{j}]"), m))?;
            }
            let set: BTreeSet<String> = values.iter().cloned().collect();
            let operator = match operator {
                "In" | "NotIn" if set.is_empty() => {
                    return Err(FieldError::new(
                        format!("{field}.values"),
                        format!("operator {operator} requires at least one value"),
                    ));
                }
                "Exists" | "DoesNotExist" if !set.is_empty() => {
                    return Err(FieldError::new(
                        format!("{field}.values"),
                        format!("operator {operator} must not have values"),
                    ));
                }
                "In" => Operator::In(set),
                "NotIn" => Operator::NotIn(set),
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    return Err(FieldError::new(
                        format!("{field}.operator"),
                        format!(
                            "unknown operator {other:?} (expected In, NotIn, Exists or DoesNotExist)"
                        ),
                    ));
                }
            };
            requirements.push(Requirement {
                key: key.to_owned(),
                operator,
            });
        }
        Ok(Self { requirements })
    }

    /// Same selector with every key renamed by `f` (a namespace selector becomes a selector over
    /// `nodeward.io/ns-label.*`).
    #[must_use]
    pub fn map_keys(self, f: impl Fn(&str) -> String) -> Self {
        Self {
            requirements: self
                .requirements
                .into_iter()
                .map(|r| Requirement {
                    key: f(&r.key),
                    operator: r.operator,
                })
                .collect(),
        }
    }

    /// The conjunction of two selectors.
    #[must_use]
    pub fn and(mut self, other: Self) -> Self {
        self.requirements.extend(other.requirements);
        self
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("<all>");
        }
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let join = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(",");
            match &r.operator {
                Operator::In(v) if v.len() == 1 => write!(f, "{}={}", r.key, join(v))?,
                Operator::In(v) => write!(f, "{} in ({})", r.key, join(v))?,
                Operator::NotIn(v) => write!(f, "{} notin ({})", r.key, join(v))?,
                Operator::Exists => write!(f, "{}", r.key)?,
                Operator::DoesNotExist => write!(f, "!{}", r.key)?,
            }
        }
        Ok(())
    }
}

/// Kubernetes label key syntax: an optional DNS subdomain prefix and `/`, then a name of at most
/// 63 characters. `nodeward.io/ns-label.<key>` is accepted when `<key>` is itself a valid key
/// (it may contain a second `/`).
///
/// # Errors
/// A message describing what is wrong.
pub fn validate_label_key(key: &str) -> Result<(), String> {
    if let Some(inner) = key.strip_prefix(NS_LABEL_PREFIX) {
        return validate_label_key(inner)
            .map_err(|m| format!("invalid namespace label key in {key:?}: {m}"));
    }
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix
        && (prefix.is_empty() || prefix.len() > 253 || !is_dns_subdomain(prefix))
    {
        return Err(format!(
            "invalid label key {key:?}: the prefix must be a DNS subdomain"
        ));
    }
    if !is_qualified_name(name) {
        return Err(format!(
            "invalid label key {key:?}: the name must be 1-63 alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"
        ));
    }
    Ok(())
}

/// Kubernetes label value syntax: empty, or a name of at most 63 characters.
///
/// # Errors
/// A message describing what is wrong.
pub fn validate_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_qualified_name(value) {
        Ok(())
    } else {
        Err(format!(
            "invalid label value {value:?}: must be empty or 1-63 alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"
        ))
    }
}

fn is_qualified_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn is_dns_subdomain(s: &str) -> bool {
    s.split('.').all(is_dns_label)
}

/// RFC 1123 label, as Kubernetes checks namespace names: 1-63 lowercase alphanumerics or `-`,
/// starting and ending with an alphanumeric.
pub(crate) fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn operators_follow_kubernetes_semantics() {
        let vals = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let a = vals(&["a", "b"]);
        let sel = LabelSelector::parse(
            None,
            [
                ("tier", "In", Some(a.as_slice())),
                ("env", "NotIn", Some(&vals(&["prod"])[..])),
                ("app", "Exists", None),
                ("legacy", "DoesNotExist", None),
            ],
            "spec.podSelector",
        )
        .expect("valid selector");
        assert!(sel.matches(&labels(&[("tier", "a"), ("app", "x")])));
        assert!(!sel.matches(&labels(&[("tier", "a"), ("app", "x"), ("env", "prod")])));
        assert!(!sel.matches(&labels(&[("tier", "c"), ("app", "x")])));
        assert!(!sel.matches(&labels(&[("tier", "a")])));
        assert!(!sel.matches(&labels(&[("tier", "a"), ("app", "x"), ("legacy", "")])));
        assert!(LabelSelector::everything().matches(&labels(&[])));
    }

    #[test]
    fn label_syntax_is_checked() {
        assert!(validate_label_key("app").is_ok());
        assert!(validate_label_key("app.kubernetes.io/name").is_ok());
        assert!(validate_label_key("nodeward.io/ns-label.kubernetes.io/metadata.name").is_ok());
        assert!(validate_label_key("-app").is_err());
        assert!(validate_label_key("a/b/c").is_err());
        assert!(validate_label_key("Bad_Prefix/x").is_err());
        assert!(validate_label_key(&"x".repeat(64)).is_err());
        assert!(validate_label_value("").is_ok());
        assert!(validate_label_value("v1.2_3-a").is_ok());
        assert!(validate_label_value("bad value").is_err());
    }

    #[test]
    fn operator_errors_name_the_field() {
        let err = LabelSelector::parse(None, [("app", "In", None)], "spec.podSelector")
            .expect_err("In without values");
        assert_eq!(err.field, "spec.podSelector.matchExpressions[0].values");
        let v = ["x".to_owned()];
        let err = LabelSelector::parse(None, [("app", "Exists", Some(&v[..]))], "sel")
            .expect_err("Exists with values");
        assert_eq!(err.field, "sel.matchExpressions[0].values");
        let err = LabelSelector::parse(None, [("app", "Equals", Some(&v[..]))], "sel")
            .expect_err("unknown operator");
        assert_eq!(err.field, "sel.matchExpressions[0].operator");
    }
}
