//! Policy slicing: evaluate only the policies whose scope can match a request.
//!
//! Cedar's authorizer evaluates every policy of the set it is given, so the cost
//! of a decision grows with the policy set (about a microsecond per policy).
//! Most policies name their principal or resource (`principal == User::"alice"`,
//! `resource in Folder::"f"`, every template-linked per-user policy), so at load
//! each policy is put in one bucket, keyed by the most selective part of its
//! scope:
//!
//! 1. the entity its principal scope names (`==`, `in`, `is … in`),
//! 2. else the entity its resource scope names,
//! 3. else the entity type of an `is` principal scope,
//! 4. else the entity type of an `is` resource scope,
//! 5. else the wildcard bucket.
//!
//! A request looks up the buckets of its principal and every ancestor, its
//! resource and every ancestor, the two entity types and the wildcard; a policy
//! outside those buckets cannot match its scope. The candidates' scopes are then
//! checked exactly (principal, action and resource, with ancestors), and only the
//! policies that pass are given to Cedar. A policy whose scope does not match is
//! "not applicable" in Cedar's own semantics (a scope cannot raise an error), so
//! the answer, its determining policies and its errors are the same as with the
//! whole set: forbid still overrides permit, because every applicable policy is
//! evaluated. `tests/policy_slicing.rs` checks this against full evaluation.
//!
//! The policy sets built for candidate lists are kept in a small cache: a
//! request's candidate list repeats for the same principal and roles.

use std::collections::HashMap;
use std::sync::Arc;

use cedar_policy::{
    ActionConstraint, Entities, EntityTypeName, EntityUid, Policy, PolicyId, PolicySet,
    PrincipalConstraint, ResourceConstraint, SlotId, Template,
};

/// How many candidate policy sets the slice cache keeps.
const SLICE_CACHE_ENTRIES: u64 = 4096;

/// A principal or resource scope constraint (Cedar's two enums have one shape).
#[derive(Debug, Clone)]
enum Scope {
    Any,
    Eq(EntityUid),
    In(EntityUid),
    Is(EntityTypeName),
    IsIn(EntityTypeName, EntityUid),
}

impl Scope {
    fn of_principal(constraint: PrincipalConstraint) -> Scope {
        match constraint {
            PrincipalConstraint::Any => Scope::Any,
            PrincipalConstraint::Eq(uid) => Scope::Eq(uid),
            PrincipalConstraint::In(uid) => Scope::In(uid),
            PrincipalConstraint::Is(ty) => Scope::Is(ty),
            PrincipalConstraint::IsIn(ty, uid) => Scope::IsIn(ty, uid),
        }
    }

    fn of_resource(constraint: ResourceConstraint) -> Scope {
        match constraint {
            ResourceConstraint::Any => Scope::Any,
            ResourceConstraint::Eq(uid) => Scope::Eq(uid),
            ResourceConstraint::In(uid) => Scope::In(uid),
            ResourceConstraint::Is(ty) => Scope::Is(ty),
            ResourceConstraint::IsIn(ty, uid) => Scope::IsIn(ty, uid),
        }
    }

    /// The entity the scope names, if any.
    fn entity(&self) -> Option<&EntityUid> {
        match self {
            Scope::Eq(uid) | Scope::In(uid) | Scope::IsIn(_, uid) => Some(uid),
            Scope::Any | Scope::Is(_) => None,
        }
    }

    /// Cedar's scope semantics: `in` is reflexive and transitive over the
    /// entity hierarchy; an entity missing from the store has no ancestors.
    fn matches(&self, uid: &EntityUid, ancestors: &[&EntityUid]) -> bool {
        let is_in = |target: &EntityUid| uid == target || ancestors.contains(&target);
        match self {
            Scope::Any => true,
            Scope::Eq(target) => uid == target,
            Scope::In(target) => is_in(target),
            Scope::Is(ty) => uid.type_name() == ty,
            Scope::IsIn(ty, target) => uid.type_name() == ty && is_in(target),
        }
    }
}

/// What a slice needs to add one policy to its set.
#[derive(Debug, Clone)]
enum Member {
    /// A static policy (a copy of the set's; boxed, so that the links,
    /// most of a large set, take a fraction of its size).
    Static(Box<Policy>),
    /// A template-linked policy, kept as a link (its id, the index of its
    /// template in [`PolicyIndex::templates`] and its slot values), not as a
    /// static copy: a copy costs a parse of the template's text per link at
    /// load and a whole policy tree per link in memory.
    Link {
        id: PolicyId,
        template: u32,
        values: HashMap<SlotId, EntityUid>,
    },
}

/// One policy with its scope, ready to be checked without Cedar.
#[derive(Debug, Clone)]
struct IndexedPolicy {
    policy: Member,
    principal: Scope,
    action: ActionConstraint,
    resource: Scope,
}

impl IndexedPolicy {
    fn scope_matches(&self, request: &RequestScope<'_>) -> bool {
        let action_matches = match &self.action {
            ActionConstraint::Any => true,
            ActionConstraint::Eq(action) => action == request.action,
            ActionConstraint::In(actions) => actions
                .iter()
                .any(|a| a == request.action || request.action_ancestors.contains(&a)),
        };
        action_matches
            && self
                .principal
                .matches(request.principal, &request.principal_ancestors)
            && self
                .resource
                .matches(request.resource, &request.resource_ancestors)
    }
}

/// The buckets policies live in, one map per kind of key, so that a request
/// looks its keys up by reference (no id is copied per request).
#[derive(Debug, Default)]
struct Buckets {
    principal_entity: HashMap<EntityUid, Vec<u32>>,
    resource_entity: HashMap<EntityUid, Vec<u32>>,
    principal_type: HashMap<EntityTypeName, Vec<u32>>,
    resource_type: HashMap<EntityTypeName, Vec<u32>>,
    wildcard: Vec<u32>,
}

impl Buckets {
    /// Files policy `i` under the most selective part of its scope.
    fn insert(&mut self, entry: &IndexedPolicy, i: u32) {
        let bucket = if let Some(uid) = entry.principal.entity() {
            self.principal_entity.entry(uid.clone()).or_default()
        } else if let Some(uid) = entry.resource.entity() {
            self.resource_entity.entry(uid.clone()).or_default()
        } else if let Scope::Is(ty) = &entry.principal {
            self.principal_type.entry(ty.clone()).or_default()
        } else if let Scope::Is(ty) = &entry.resource {
            self.resource_type.entry(ty.clone()).or_default()
        } else {
            &mut self.wildcard
        };
        bucket.push(i);
    }

    fn len(&self) -> usize {
        self.principal_entity.len()
            + self.resource_entity.len()
            + self.principal_type.len()
            + self.resource_type.len()
            + 1
    }
}

/// The scope facts of one request.
struct RequestScope<'a> {
    principal: &'a EntityUid,
    principal_ancestors: Vec<&'a EntityUid>,
    action: &'a EntityUid,
    action_ancestors: Vec<&'a EntityUid>,
    resource: &'a EntityUid,
    resource_ancestors: Vec<&'a EntityUid>,
}

/// Which policies a request must be evaluated against.
#[derive(Debug)]
pub enum Slice {
    /// Every policy of the set can apply: evaluate the whole set.
    All,
    /// Only these policies can apply (possibly none: the answer is a deny).
    Some(Arc<PolicySet>),
}

/// An index of a policy set by principal and resource scope.
pub struct PolicyIndex {
    policies: Vec<IndexedPolicy>,
    /// The templates the links of `policies` name.
    templates: Vec<Template>,
    buckets: Buckets,
    slices: moka::sync::Cache<Box<[u32]>, Arc<PolicySet>>,
}

impl std::fmt::Debug for PolicyIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyIndex")
            .field("policies", &self.policies.len())
            .field("buckets", &self.buckets.len())
            .finish_non_exhaustive()
    }
}

/// A template link could not be turned into a static policy.
#[derive(Debug, Clone, thiserror::Error)]
#[error("policy {id}: cannot index the template-linked policy: {reason}")]
pub struct IndexError {
    /// The policy id.
    pub id: String,
    /// What went wrong.
    pub reason: String,
}

impl PolicyIndex {
    /// Indexes every static and template-linked policy of `policies`.
    pub fn new(policies: &PolicySet) -> Result<PolicyIndex, IndexError> {
        let mut indexed = Vec::new();
        let mut buckets = Buckets::default();
        let mut templates: Vec<Template> = Vec::new();
        let mut template_numbers: HashMap<PolicyId, u32> = HashMap::new();
        for policy in policies.policies() {
            // A linked policy's constraints come with its slots filled in.
            let principal = Scope::of_principal(policy.principal_constraint());
            let action = policy.action_constraint();
            let resource = Scope::of_resource(policy.resource_constraint());
            let member = match (policy.template_id(), policy.template_links()) {
                (None, _) => Member::Static(Box::new(policy.clone())),
                (Some(template_id), Some(values)) => {
                    let template = match template_numbers.get(template_id) {
                        Some(n) => *n,
                        None => {
                            let template =
                                policies.template(template_id).ok_or_else(|| IndexError {
                                    id: policy.id().to_string(),
                                    reason: format!("template {template_id} is not in the set"),
                                })?;
                            let n = templates.len() as u32;
                            templates.push(template.clone());
                            template_numbers.insert(template_id.clone(), n);
                            n
                        }
                    };
                    Member::Link {
                        id: policy.id().clone(),
                        template,
                        values,
                    }
                }
                (Some(_), None) => {
                    return Err(IndexError {
                        id: policy.id().to_string(),
                        reason: "a linked policy without slot values".to_owned(),
                    });
                }
            };
            let entry = IndexedPolicy {
                principal,
                action,
                resource,
                policy: member,
            };
            buckets.insert(&entry, indexed.len() as u32);
            indexed.push(entry);
        }
        Ok(PolicyIndex {
            policies: indexed,
            templates,
            buckets,
            slices: moka::sync::Cache::builder()
                .max_capacity(SLICE_CACHE_ENTRIES)
                .build(),
        })
    }

    /// Number of indexed (static and linked) policies.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// True when there is no policy to index.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policies `principal`, `action` and `resource` can match, with
    /// ancestors taken from `entities` (which must hold the action entities).
    pub fn slice(
        &self,
        entities: &Entities,
        principal: &EntityUid,
        action: &EntityUid,
        resource: &EntityUid,
    ) -> Slice {
        let ancestors = |uid: &EntityUid| -> Vec<&EntityUid> {
            entities
                .ancestors(uid)
                .map(|a| a.collect())
                .unwrap_or_default()
        };
        let request = RequestScope {
            principal,
            principal_ancestors: ancestors(principal),
            action,
            action_ancestors: ancestors(action),
            resource,
            resource_ancestors: ancestors(resource),
        };
        let mut candidates: Vec<u32> = Vec::new();
        let mut gather = |members: Option<&Vec<u32>>| {
            if let Some(members) = members {
                candidates.extend(
                    members
                        .iter()
                        .filter(|&&i| self.policies[i as usize].scope_matches(&request)),
                );
            }
        };
        let buckets = &self.buckets;
        for uid in std::iter::once(principal).chain(request.principal_ancestors.iter().copied()) {
            gather(buckets.principal_entity.get(uid));
        }
        for uid in std::iter::once(resource).chain(request.resource_ancestors.iter().copied()) {
            gather(buckets.resource_entity.get(uid));
        }
        gather(buckets.principal_type.get(principal.type_name()));
        gather(buckets.resource_type.get(resource.type_name()));
        gather(Some(&buckets.wildcard));

        if candidates.len() == self.policies.len() {
            return Slice::All;
        }
        candidates.sort_unstable();
        let key: Box<[u32]> = candidates.into_boxed_slice();
        if let Some(set) = self.slices.get(&key) {
            return Slice::Some(set);
        }
        let mut set = PolicySet::new();
        let mut added_templates: Vec<u32> = Vec::new();
        for &i in key.iter() {
            // Ids are unique in the source set and links were made there, so
            // adding and linking cannot fail; if they did, the whole set is
            // the safe answer.
            let added = match &self.policies[i as usize].policy {
                Member::Static(policy) => set.add(Policy::clone(policy)).is_ok(),
                Member::Link {
                    id,
                    template,
                    values,
                } => {
                    let Some(source) = self.templates.get(*template as usize) else {
                        return Slice::All;
                    };
                    if !added_templates.contains(template) {
                        if set.add_template(source.clone()).is_err() {
                            return Slice::All;
                        }
                        added_templates.push(*template);
                    }
                    set.link(source.id().clone(), id.clone(), values.clone())
                        .is_ok()
                }
            };
            if !added {
                return Slice::All;
            }
        }
        let set = Arc::new(set);
        self.slices.insert(key, set.clone());
        Slice::Some(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cedar_policy::{PolicyId, SlotId};
    use std::str::FromStr;

    fn uid(s: &str) -> EntityUid {
        EntityUid::from_str(s).unwrap()
    }

    fn set(text: &str) -> PolicySet {
        PolicySet::from_str(text).unwrap()
    }

    #[test]
    fn linked_policies_stay_links_with_the_same_id_and_filled_scope() {
        let mut policies =
            set(r#"permit(principal == ?principal, action, resource in ?resource);"#);
        let template = policies.templates().next().unwrap().id().clone();
        policies
            .link(
                template,
                PolicyId::new("alice-docs"),
                HashMap::from([
                    (SlotId::principal(), uid(r#"User::"alice""#)),
                    (SlotId::resource(), uid(r#"Folder::"docs""#)),
                ]),
            )
            .unwrap();
        let index = PolicyIndex::new(&policies).unwrap();
        assert_eq!(index.len(), 1);
        let linked = &index.policies[0];
        assert!(
            matches!(&linked.policy, Member::Link { id, template: 0, .. } if id.to_string() == "alice-docs")
        );
        assert_eq!(index.templates.len(), 1);
        assert!(matches!(&linked.principal, Scope::Eq(u) if u == &uid(r#"User::"alice""#)));
        assert!(matches!(&linked.resource, Scope::In(u) if u == &uid(r#"Folder::"docs""#)));
    }

    #[test]
    fn a_slice_holds_only_policies_whose_scope_matches() {
        let policies = set(r#"
            @id("alice") permit(principal == User::"alice", action, resource);
            @id("bob") permit(principal == User::"bob", action, resource);
            @id("admins") permit(principal in Role::"admin", action, resource);
            @id("users") forbid(principal is User, action == Action::"delete", resource);
        "#);
        let index = PolicyIndex::new(&policies).unwrap();
        let entities = Entities::empty();
        let Slice::Some(slice) = index.slice(
            &entities,
            &uid(r#"User::"alice""#),
            &uid(r#"Action::"read""#),
            &uid(r#"Doc::"1""#),
        ) else {
            panic!("expected a slice");
        };
        let ids: Vec<String> = slice.policies().map(|p| p.id().to_string()).collect();
        // `from_str` numbers policies in order: `policy0` is alice's.
        assert_eq!(ids, vec!["policy0".to_owned()]);
    }
}
