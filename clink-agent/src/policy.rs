//! The policy decision point: decides whether one connection may proceed, from the
//! AccessPolicies and PrivilegedAccessPolicies in force and the flat attribute maps that describe
//! its source and destination (README, "Objects").
//!
//! Order, first match wins: privileged deny, privileged allow, namespaced deny, namespaced allow,
//! default deny. A policy matches when one of its `from` selectors matches the source and one of
//! its `to` selectors matches the destination.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::api::{
    AccessPolicy, Action, ImportSource, LabelSelector, Operator, Requirement,
    WorkloadSetOrSelector, DEFAULT_NAMESPACE,
};

/// The attributes of one side of a connection, keyed by the names in [`attr`].
pub type Attributes = BTreeMap<String, String>;

/// Attribute names policies select on. The `*_LABELS` constants are prefixes: a label `env`
/// of a peer is the attribute `peer.clusterlink.net/labels.env`.
pub mod attr {
    pub const PEER_NAME: &str = "peer.clusterlink.net/name";
    pub const PEER_LABELS: &str = "peer.clusterlink.net/labels.";
    pub const CLIENT_NAMESPACE: &str = "client.clusterlink.net/namespace";
    pub const CLIENT_SERVICE_ACCOUNT: &str = "client.clusterlink.net/service-account";
    pub const CLIENT_LABELS: &str = "client.clusterlink.net/labels.";
    pub const EXPORT_NAME: &str = "export.clusterlink.net/name";
    pub const EXPORT_NAMESPACE: &str = "export.clusterlink.net/namespace";
    pub const EXPORT_LABELS: &str = "export.clusterlink.net/labels.";

    /// The attribute name of label `key` under a `*_LABELS` prefix.
    pub fn label(prefix: &str, key: &str) -> String {
        format!("{prefix}{key}")
    }
}

/// Adds every label of `labels` to `attrs` under `prefix` (one of the `attr::*_LABELS`).
pub fn insert_labels(attrs: &mut Attributes, prefix: &str, labels: &BTreeMap<String, String>) {
    attrs.extend(
        labels
            .iter()
            .map(|(k, v)| (attr::label(prefix, k), v.clone())),
    );
}

/// The agent itself in access decisions: its Peer name (its certificate's DNS name) and the
/// labels it announces.
#[derive(Clone, Copy, Debug)]
pub struct Own<'a> {
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// The source and destination attributes of a local client's connection to Import source
/// `source`, whose Peer has `peer_labels`. `client` holds the client's own attributes (from
/// its pod or its address range).
pub fn egress_attributes(
    own: Own<'_>,
    client: &Attributes,
    source: &ImportSource,
    peer_labels: &BTreeMap<String, String>,
) -> (Attributes, Attributes) {
    let mut src = client.clone();
    src.insert(attr::PEER_NAME.to_owned(), own.name.to_owned());
    insert_labels(&mut src, attr::PEER_LABELS, own.labels);
    let mut dst = Attributes::new();
    dst.insert(attr::EXPORT_NAME.to_owned(), source.export_name.clone());
    dst.insert(
        attr::EXPORT_NAMESPACE.to_owned(),
        source.export_namespace.clone(),
    );
    dst.insert(attr::PEER_NAME.to_owned(), source.peer.clone());
    insert_labels(&mut dst, attr::PEER_LABELS, peer_labels);
    (src, dst)
}

/// The remote side of an ingress connection: the Peer (named by its certificate) and the
/// client attributes it sent.
pub struct Remote<'a> {
    pub peer: &'a str,
    pub peer_labels: &'a BTreeMap<String, String>,
    pub client: &'a Attributes,
}

/// The source and destination attributes of a peer's client of Export `namespace/name`,
/// whose labels are `export_labels`.
pub fn ingress_attributes(
    own: Own<'_>,
    remote: Remote<'_>,
    (namespace, name): (&str, &str),
    export_labels: &BTreeMap<String, String>,
) -> (Attributes, Attributes) {
    let mut src = remote.client.clone();
    src.insert(attr::PEER_NAME.to_owned(), remote.peer.to_owned());
    insert_labels(&mut src, attr::PEER_LABELS, remote.peer_labels);
    let mut dst = Attributes::new();
    dst.insert(attr::EXPORT_NAME.to_owned(), name.to_owned());
    dst.insert(attr::EXPORT_NAMESPACE.to_owned(), namespace.to_owned());
    insert_labels(&mut dst, attr::EXPORT_LABELS, export_labels);
    dst.insert(attr::PEER_NAME.to_owned(), own.name.to_owned());
    insert_labels(&mut dst, attr::PEER_LABELS, own.labels);
    (src, dst)
}

/// Kubernetes label-selector semantics: every `matchLabels` entry is present with that value and
/// every requirement holds; the empty selector matches everything.
pub fn selector_matches(sel: &LabelSelector, attrs: &Attributes) -> bool {
    sel.match_labels
        .iter()
        .all(|(k, v)| attrs.get(k) == Some(v))
        && sel
            .match_expressions
            .iter()
            .all(|req| requirement_holds(req, attrs))
}

fn requirement_holds(req: &Requirement, attrs: &Attributes) -> bool {
    let value = attrs.get(&req.key);
    match req.operator {
        Operator::In => value.is_some_and(|v| req.values.contains(v)),
        Operator::NotIn => value.is_none_or(|v| !req.values.contains(v)),
        Operator::Exists => value.is_some(),
        Operator::DoesNotExist => value.is_none(),
    }
}

/// Which step of the decision order decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    Privileged,
    Namespaced,
    Default,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Privileged => "privileged",
            Tier::Namespaced => "namespaced",
            Tier::Default => "default",
        }
    }
}

/// The outcome for one connection, with what decided it so that logs and errors can say why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub tier: Tier,
    /// The deciding policy: `namespace/name` for an AccessPolicy, `name` for a
    /// PrivilegedAccessPolicy, `None` for the default deny.
    pub policy: Option<String>,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        self.action == Action::Allow
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = self.action.as_str();
        match &self.policy {
            Some(policy) => write!(f, "{action} by {} policy {policy}", self.tier.as_str()),
            None => write!(f, "{action} by default (no policy matched)"),
        }
    }
}

/// One policy reduced to what matching needs.
#[derive(Debug)]
struct CompiledPolicy {
    id: String,
    from: Vec<LabelSelector>,
    to: Vec<LabelSelector>,
}

impl CompiledPolicy {
    /// An entry without a selector matches nothing, as `metav1.LabelSelectorAsSelector(nil)`
    /// does; validation rejects such entries (and workload sets) before they get here.
    fn new(id: String, policy: AccessPolicy) -> Self {
        let selectors = |list: Vec<WorkloadSetOrSelector>| {
            list.into_iter()
                .filter_map(|w| w.workload_selector)
                .collect()
        };
        CompiledPolicy {
            id,
            from: selectors(policy.spec.from),
            to: selectors(policy.spec.to),
        }
    }

    fn matches(&self, src: &Attributes, dst: &Attributes) -> bool {
        self.from.iter().any(|s| selector_matches(s, src))
            && self.to.iter().any(|s| selector_matches(s, dst))
    }
}

/// The policies of one tier (or one namespace of the namespaced tier), split by action and
/// sorted by id so that the reported policy does not depend on the order they were stored in.
#[derive(Debug, Default)]
struct TierPolicies {
    deny: Vec<CompiledPolicy>,
    allow: Vec<CompiledPolicy>,
}

impl TierPolicies {
    fn push(&mut self, id: String, policy: AccessPolicy) {
        let list = match policy.spec.action {
            Action::Deny => &mut self.deny,
            Action::Allow => &mut self.allow,
        };
        list.push(CompiledPolicy::new(id, policy));
    }

    fn sort(&mut self) {
        self.deny.sort_by(|a, b| a.id.cmp(&b.id));
        self.allow.sort_by(|a, b| a.id.cmp(&b.id));
    }

    fn decide(&self, tier: Tier, src: &Attributes, dst: &Attributes) -> Option<Decision> {
        [(Action::Deny, &self.deny), (Action::Allow, &self.allow)]
            .into_iter()
            .find_map(|(action, list)| {
                let policy = list.iter().find(|p| p.matches(src, dst))?;
                Some(Decision {
                    action,
                    tier,
                    policy: Some(policy.id.clone()),
                })
            })
    }
}

/// Every policy in force, arranged for [`PolicySet::decide`]. Rebuilt on each configuration
/// change and then shared read-only by all connections.
#[derive(Debug, Default)]
pub struct PolicySet {
    privileged: TierPolicies,
    namespaced: HashMap<String, TierPolicies>,
}

impl PolicySet {
    /// `privileged` are PrivilegedAccessPolicies, `namespaced` AccessPolicies (a missing
    /// namespace means `default`, as when the object was parsed).
    pub fn new(
        privileged: impl IntoIterator<Item = AccessPolicy>,
        namespaced: impl IntoIterator<Item = AccessPolicy>,
    ) -> Self {
        let mut set = PolicySet::default();
        for policy in privileged {
            set.privileged.push(policy.metadata.name.clone(), policy);
        }
        for policy in namespaced {
            let namespace = policy
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
            let id = format!("{namespace}/{}", policy.metadata.name);
            set.namespaced
                .entry(namespace)
                .or_default()
                .push(id, policy);
        }
        set.privileged.sort();
        set.namespaced.values_mut().for_each(TierPolicies::sort);
        set
    }

    /// Decides a connection from `src` to `dst`; only AccessPolicies in `namespace` count (the
    /// Import's namespace on egress, the Export's on ingress).
    pub fn decide(&self, namespace: &str, src: &Attributes, dst: &Attributes) -> Decision {
        self.privileged
            .decide(Tier::Privileged, src, dst)
            .or_else(|| {
                self.namespaced
                    .get(namespace)?
                    .decide(Tier::Namespaced, src, dst)
            })
            .unwrap_or(Decision {
                action: Action::Deny,
                tier: Tier::Default,
                policy: None,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{parse_yaml, Object};

    /// Parses a manifest of AccessPolicies and PrivilegedAccessPolicies into a set.
    fn policy_set(manifest: &str) -> PolicySet {
        let (privileged, namespaced) = split(manifest);
        PolicySet::new(privileged, namespaced)
    }

    fn split(manifest: &str) -> (Vec<AccessPolicy>, Vec<AccessPolicy>) {
        let mut privileged = Vec::new();
        let mut namespaced = Vec::new();
        for object in parse_yaml("test", manifest).unwrap() {
            match object {
                Object::PrivilegedAccessPolicy(p) => privileged.push(p),
                Object::AccessPolicy(p) => namespaced.push(p),
                other => panic!("not a policy: {}", other.key()),
            }
        }
        (privileged, namespaced)
    }

    /// A policy document whose `from` and `to` are the given YAML flow sequences.
    fn policy(kind: &str, name: &str, action: &str, from: &str, to: &str) -> String {
        format!(
            "---\napiVersion: clusterlink.net/v1alpha1\nkind: {kind}\nmetadata:\n  name: {name}\n\
             spec:\n  action: {action}\n  from: {from}\n  to: {to}\n"
        )
    }

    const ALL: &str = "[{workloadSelector: {}}]";

    fn attrs(pairs: &[(&str, &str)]) -> Attributes {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn selector(yaml: &str) -> LabelSelector {
        yaml_serde::from_str(yaml).unwrap()
    }

    fn decide(set: &PolicySet) -> Decision {
        set.decide("default", &Attributes::new(), &Attributes::new())
    }

    #[test]
    fn no_policies_deny_by_default() {
        let decision = decide(&PolicySet::new([], []));
        assert_eq!(
            decision,
            Decision {
                action: Action::Deny,
                tier: Tier::Default,
                policy: None
            }
        );
        assert!(!decision.is_allowed());
        assert_eq!(decision.to_string(), "deny by default (no policy matched)");
    }

    #[test]
    fn privileged_deny_beats_every_other_tier() {
        let set = policy_set(
            &[
                policy("PrivilegedAccessPolicy", "p-deny", "deny", ALL, ALL),
                policy("PrivilegedAccessPolicy", "p-allow", "allow", ALL, ALL),
                policy("AccessPolicy", "n-deny", "deny", ALL, ALL),
                policy("AccessPolicy", "n-allow", "allow", ALL, ALL),
            ]
            .concat(),
        );
        let decision = decide(&set);
        assert_eq!(decision.tier, Tier::Privileged);
        assert_eq!(decision.to_string(), "deny by privileged policy p-deny");
    }

    #[test]
    fn privileged_allow_beats_namespaced_deny() {
        let set = policy_set(
            &[
                policy("PrivilegedAccessPolicy", "p-allow", "allow", ALL, ALL),
                policy("AccessPolicy", "n-deny", "deny", ALL, ALL),
            ]
            .concat(),
        );
        let decision = decide(&set);
        assert!(decision.is_allowed());
        assert_eq!(decision.to_string(), "allow by privileged policy p-allow");
    }

    #[test]
    fn namespaced_deny_beats_namespaced_allow() {
        let set = policy_set(
            &[
                policy("AccessPolicy", "n-allow", "allow", ALL, ALL),
                policy("AccessPolicy", "n-deny", "deny", ALL, ALL),
            ]
            .concat(),
        );
        assert_eq!(
            decide(&set).to_string(),
            "deny by namespaced policy default/n-deny"
        );
    }

    #[test]
    fn namespaced_allow_beats_default_deny() {
        let set = policy_set(&policy("AccessPolicy", "allow-iperf", "allow", ALL, ALL));
        let decision = decide(&set);
        assert_eq!(
            decision,
            Decision {
                action: Action::Allow,
                tier: Tier::Namespaced,
                policy: Some("default/allow-iperf".to_owned())
            }
        );
        assert_eq!(
            decision.to_string(),
            "allow by namespaced policy default/allow-iperf"
        );
    }

    #[test]
    fn only_policies_in_the_namespace_count() {
        let set = policy_set(
            "apiVersion: clusterlink.net/v1alpha1\nkind: AccessPolicy\nmetadata:\n  name: allow-all\n  \
             namespace: other\nspec:\n  action: allow\n  from: [{workloadSelector: {}}]\n  \
             to: [{workloadSelector: {}}]\n",
        );
        let none = Attributes::new();
        assert_eq!(set.decide("default", &none, &none).tier, Tier::Default);
        assert_eq!(
            set.decide("other", &none, &none).to_string(),
            "allow by namespaced policy other/allow-all"
        );
    }

    #[test]
    fn privileged_policies_apply_in_every_namespace() {
        let set = policy_set(&policy("PrivilegedAccessPolicy", "p", "allow", ALL, ALL));
        let none = Attributes::new();
        assert!(set.decide("any-namespace", &none, &none).is_allowed());
    }

    #[test]
    fn first_policy_by_name_decides_within_a_tier() {
        let set = policy_set(
            &[
                policy("PrivilegedAccessPolicy", "p-b", "allow", ALL, ALL),
                policy("PrivilegedAccessPolicy", "p-a", "allow", ALL, ALL),
            ]
            .concat(),
        );
        assert_eq!(decide(&set).policy.as_deref(), Some("p-a"));
        let set = policy_set(
            &[
                policy("AccessPolicy", "z", "deny", ALL, ALL),
                policy("AccessPolicy", "m", "deny", ALL, ALL),
                policy("AccessPolicy", "x", "deny", ALL, ALL),
            ]
            .concat(),
        );
        assert_eq!(decide(&set).policy.as_deref(), Some("default/m"));
    }

    #[test]
    fn both_from_and_to_must_match() {
        let set = policy_set(&policy(
            "AccessPolicy",
            "a-to-b",
            "allow",
            "[{workloadSelector: {matchLabels: {peer.clusterlink.net/name: a}}}]",
            "[{workloadSelector: {matchLabels: {export.clusterlink.net/name: b}}}]",
        ));
        let from_a = attrs(&[(attr::PEER_NAME, "a")]);
        let from_c = attrs(&[(attr::PEER_NAME, "c")]);
        let to_b = attrs(&[(attr::EXPORT_NAME, "b")]);
        let to_c = attrs(&[(attr::EXPORT_NAME, "c")]);
        assert!(set.decide("default", &from_a, &to_b).is_allowed());
        assert!(!set.decide("default", &from_a, &to_c).is_allowed());
        assert!(!set.decide("default", &from_c, &to_b).is_allowed());
        // The source's attributes never satisfy the `to` side.
        let both = attrs(&[(attr::PEER_NAME, "a"), (attr::EXPORT_NAME, "b")]);
        assert!(!set
            .decide("default", &both, &Attributes::new())
            .is_allowed());
    }

    #[test]
    fn any_from_and_any_to_entry_may_match() {
        let set = policy_set(&policy(
            "AccessPolicy",
            "several",
            "allow",
            "[{workloadSelector: {matchLabels: {peer.clusterlink.net/name: a}}}, \
              {workloadSelector: {matchLabels: {peer.clusterlink.net/name: b}}}]",
            "[{workloadSelector: {matchLabels: {export.clusterlink.net/name: x}}}, \
              {workloadSelector: {matchLabels: {export.clusterlink.net/name: y}}}]",
        ));
        for peer in ["a", "b"] {
            for export in ["x", "y"] {
                let src = attrs(&[(attr::PEER_NAME, peer)]);
                let dst = attrs(&[(attr::EXPORT_NAME, export)]);
                assert!(
                    set.decide("default", &src, &dst).is_allowed(),
                    "{peer} {export}"
                );
            }
        }
        let src = attrs(&[(attr::PEER_NAME, "c")]);
        let dst = attrs(&[(attr::EXPORT_NAME, "x")]);
        assert!(!set.decide("default", &src, &dst).is_allowed());
    }

    #[test]
    fn entry_without_selector_matches_nothing() {
        let (_, mut namespaced) = split(&policy("AccessPolicy", "p", "allow", ALL, ALL));
        namespaced[0].spec.from[0].workload_selector = None;
        let set = PolicySet::new([], namespaced);
        assert_eq!(decide(&set).tier, Tier::Default);
    }

    #[test]
    fn empty_selector_matches_everything() {
        let sel = selector("{}");
        assert!(selector_matches(&sel, &Attributes::new()));
        assert!(selector_matches(&sel, &attrs(&[(attr::PEER_NAME, "a")])));
    }

    #[test]
    fn match_labels_need_every_label_equal() {
        let sel = selector(
            "matchLabels: {peer.clusterlink.net/name: a, client.clusterlink.net/namespace: ns}",
        );
        let both = attrs(&[
            (attr::PEER_NAME, "a"),
            (attr::CLIENT_NAMESPACE, "ns"),
            (attr::CLIENT_SERVICE_ACCOUNT, "sa"),
        ]);
        assert!(selector_matches(&sel, &both));
        let wrong = attrs(&[(attr::PEER_NAME, "a"), (attr::CLIENT_NAMESPACE, "other")]);
        assert!(!selector_matches(&sel, &wrong));
        let missing = attrs(&[(attr::PEER_NAME, "a")]);
        assert!(!selector_matches(&sel, &missing));
    }

    fn expression(operator: &str, values: &str) -> LabelSelector {
        selector(&format!(
            "matchExpressions: [{{key: env, operator: {operator}, values: {values}}}]"
        ))
    }

    #[test]
    fn operator_in() {
        let sel = expression("In", "[prod, staging]");
        assert!(selector_matches(&sel, &attrs(&[("env", "prod")])));
        assert!(selector_matches(&sel, &attrs(&[("env", "staging")])));
        assert!(!selector_matches(&sel, &attrs(&[("env", "dev")])));
        assert!(!selector_matches(&sel, &Attributes::new()));
    }

    #[test]
    fn operator_not_in_matches_absent_keys() {
        let sel = expression("NotIn", "[prod]");
        assert!(!selector_matches(&sel, &attrs(&[("env", "prod")])));
        assert!(selector_matches(&sel, &attrs(&[("env", "dev")])));
        assert!(selector_matches(&sel, &Attributes::new()));
    }

    #[test]
    fn operator_exists() {
        let sel = expression("Exists", "[]");
        assert!(selector_matches(&sel, &attrs(&[("env", "")])));
        assert!(!selector_matches(&sel, &attrs(&[("other", "x")])));
    }

    #[test]
    fn operator_does_not_exist() {
        let sel = expression("DoesNotExist", "[]");
        assert!(selector_matches(&sel, &Attributes::new()));
        assert!(selector_matches(&sel, &attrs(&[("other", "x")])));
        assert!(!selector_matches(&sel, &attrs(&[("env", "prod")])));
    }

    #[test]
    fn labels_and_expressions_must_all_hold() {
        let sel = selector(
            "matchLabels: {app: web}\n\
             matchExpressions:\n  \
             - {key: env, operator: In, values: [prod]}\n  \
             - {key: canary, operator: DoesNotExist}\n",
        );
        assert!(selector_matches(
            &sel,
            &attrs(&[("app", "web"), ("env", "prod")])
        ));
        assert!(!selector_matches(
            &sel,
            &attrs(&[("app", "db"), ("env", "prod")])
        ));
        assert!(!selector_matches(
            &sel,
            &attrs(&[("app", "web"), ("env", "prod"), ("canary", "true")])
        ));
    }

    #[test]
    fn labels_are_selected_under_their_prefix() {
        let mut src = attrs(&[(attr::PEER_NAME, "peer-a")]);
        insert_labels(
            &mut src,
            attr::PEER_LABELS,
            &attrs(&[("env", "prod"), ("region", "eu")]),
        );
        insert_labels(&mut src, attr::CLIENT_LABELS, &attrs(&[("app", "iperf3")]));
        let mut dst = attrs(&[
            (attr::EXPORT_NAME, "iperf3"),
            (attr::EXPORT_NAMESPACE, "default"),
        ]);
        insert_labels(&mut dst, attr::EXPORT_LABELS, &attrs(&[("tier", "gold")]));
        assert_eq!(
            src.get("peer.clusterlink.net/labels.env")
                .map(String::as_str),
            Some("prod")
        );

        let set = policy_set(&policy(
            "AccessPolicy",
            "prod-to-gold",
            "allow",
            "[{workloadSelector: {matchLabels: {peer.clusterlink.net/labels.env: prod, \
              client.clusterlink.net/labels.app: iperf3}}}]",
            "[{workloadSelector: {matchExpressions: [{key: export.clusterlink.net/labels.tier, \
              operator: In, values: [gold, silver]}]}}]",
        ));
        assert!(set.decide("default", &src, &dst).is_allowed());

        // The bare label key is not the attribute: labels only count under their prefix.
        let unprefixed = attrs(&[("env", "prod"), ("app", "iperf3")]);
        assert!(!set.decide("default", &unprefixed, &dst).is_allowed());
    }
}
