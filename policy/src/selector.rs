//! Kubernetes label selectors (`matchLabels` + `matchExpressions`), parsed once and checked.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Labels of an object.
pub type Labels = BTreeMap<String, String>;

/// One requirement of a selector; all requirements must hold.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Requirement {
    /// The label exists and its value is one of these.
    In(String, BTreeSet<String>),
    /// The label is absent, or its value is none of these.
    NotIn(String, BTreeSet<String>),
    /// The label exists.
    Exists(String),
    /// The label is absent.
    DoesNotExist(String),
}

impl Requirement {
    /// The label key.
    pub fn key(&self) -> &str {
        match self {
            Self::In(k, _) | Self::NotIn(k, _) | Self::Exists(k) | Self::DoesNotExist(k) => k,
        }
    }

    fn matches(&self, labels: &Labels) -> bool {
        match self {
            Self::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
            Self::NotIn(key, values) => labels.get(key).is_none_or(|v| !values.contains(v)),
            Self::Exists(key) => labels.contains_key(key),
            Self::DoesNotExist(key) => !labels.contains_key(key),
        }
    }
}

/// A parsed label selector. The empty selector selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    requirements: BTreeSet<Requirement>,
}

impl Selector {
    /// Parses a Kubernetes `LabelSelector`, rejecting what the API server would reject.
    pub fn parse(selector: &LabelSelector) -> Result<Self, String> {
        let mut requirements = BTreeSet::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            requirements.insert(Requirement::In(
                key.clone(),
                BTreeSet::from([value.clone()]),
            ));
        }
        for (index, expression) in selector.match_expressions.iter().flatten().enumerate() {
            let values: BTreeSet<String> = expression.values.iter().flatten().cloned().collect();
            let key = expression.key.clone();
            let requirement = match expression.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!(
                        "matchExpressions[{index}]: operator {} needs at least one value",
                        expression.operator
                    ));
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(format!(
                        "matchExpressions[{index}]: operator {} takes no values",
                        expression.operator
                    ));
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => {
                    return Err(format!(
                        "matchExpressions[{index}]: unknown operator {other:?}; use In, NotIn, Exists or DoesNotExist"
                    ));
                }
            };
            if expression.key.is_empty() {
                return Err(format!("matchExpressions[{index}]: key must not be empty"));
            }
            requirements.insert(requirement);
        }
        Ok(Self { requirements })
    }

    /// Whether the selector selects an object with these labels.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether this is `{}`.
    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    /// The requirements, in a canonical order.
    pub fn requirements(&self) -> impl Iterator<Item = &Requirement> {
        self.requirements.iter()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    /// Labels from pairs (for this crate's tests).
    pub(crate) fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expression(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|v| v.to_string()).collect())
            },
        }
    }

    #[test]
    fn kubernetes_semantics() {
        let selector = Selector::parse(&LabelSelector {
            match_labels: Some(BTreeMap::from([("app".into(), "web".into())])),
            match_expressions: Some(vec![
                expression("tier", "In", &["front", "edge"]),
                expression("canary", "DoesNotExist", &[]),
                expression("env", "NotIn", &["dev"]),
            ]),
        })
        .unwrap();
        let table = [
            (labels(&[("app", "web"), ("tier", "front")]), true),
            (
                labels(&[("app", "web"), ("tier", "edge"), ("env", "prod")]),
                true,
            ),
            (
                labels(&[("app", "web"), ("tier", "edge"), ("env", "dev")]),
                false,
            ),
            (labels(&[("app", "web"), ("tier", "back")]), false),
            (
                labels(&[("app", "web"), ("tier", "front"), ("canary", "")]),
                false,
            ),
            (labels(&[("app", "api"), ("tier", "front")]), false),
            (labels(&[("tier", "front")]), false),
        ];
        for (labels, expected) in table {
            assert_eq!(selector.matches(&labels), expected, "{labels:?}");
        }
        assert!(
            Selector::parse(&LabelSelector::default())
                .unwrap()
                .matches(&labels(&[]))
        );
        let exists = Selector::parse(&LabelSelector {
            match_expressions: Some(vec![expression("gpu", "Exists", &[])]),
            ..Default::default()
        })
        .unwrap();
        assert!(exists.matches(&labels(&[("gpu", "")])) && !exists.matches(&labels(&[])));
    }

    #[test]
    fn rejects_what_the_api_server_rejects() {
        for (operator, values, message) in [
            ("In", vec![], "needs at least one value"),
            ("Exists", vec!["x"], "takes no values"),
            ("Equals", vec!["x"], "unknown operator"),
        ] {
            let error = Selector::parse(&LabelSelector {
                match_expressions: Some(vec![expression("k", operator, &values)]),
                ..Default::default()
            })
            .unwrap_err();
            assert!(error.contains(message), "{error}");
        }
    }
}
