//! The policy file as admins write it (see docs/policy.md). Every struct rejects unknown keys,
//! so a misspelt key is an error rather than a silently ignored line.

use std::collections::BTreeMap;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Format version; this build reads version 1.
    pub version: u32,
    /// Named sets of users and of other groups.
    #[serde(default, deserialize_with = "unique_keys")]
    pub groups: BTreeMap<String, GroupDef>,
    #[serde(default)]
    pub resources: Vec<ResourceDef>,
    #[serde(default)]
    pub rules: Vec<RuleDef>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupDef {
    /// Users (certificate names) in the group. Users whose certificate lists the group are
    /// members too.
    #[serde(default)]
    pub members: Vec<String>,
    /// Other groups whose members are members of this one.
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceDef {
    pub name: String,
    /// Name of the connector that serves the resource.
    pub connector: String,
    /// CIDRs, single IPs, exact hostnames and wildcard domains (`*.corp.example`).
    pub addresses: Vec<String>,
    /// `tcp/80`, `tcp/8000-8100`, `udp/53`, `tcp` (every TCP port), `udp`, `icmp`, or `any`.
    pub ports: Vec<String>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDef {
    /// Shown in `policy explain` and the audit log; defaults to `rule N`.
    #[serde(default)]
    pub name: Option<String>,
    pub action: Action,
    /// `everyone`, `group:NAME` or `user:NAME`; any one of them matching is enough.
    pub who: Vec<String>,
    /// Resource names; any one of them.
    pub to: Vec<String>,
    /// The rule stops applying at this date (`2027-01-31`, midnight UTC) or time (RFC 3339).
    #[serde(default)]
    pub expires: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

/// A mapping whose keys must be unique: YAML parsers keep the last of two equal keys, which
/// would silently drop the first group definition.
fn unique_keys<'de, D: Deserializer<'de>, V: Deserialize<'de>>(
    d: D,
) -> Result<BTreeMap<String, V>, D::Error> {
    struct Unique<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> Visitor<'de> for Unique<V> {
        type Value = BTreeMap<String, V>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a mapping of names")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(k) = m.next_key::<String>()? {
                if out.contains_key(&k) {
                    return Err(de::Error::custom(format!(
                        "`{k}` is defined twice; the first definition would be lost"
                    )));
                }
                let v = m.next_value()?;
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Unique(std::marker::PhantomData))
}
