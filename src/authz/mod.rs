//! Authorization: routes, the Cedar mapping, the policy folder, its index and
//! evaluation.
//!
//! - [`evaluator`] is the stage itself: route, facts, decision key, decision
//!   cache, Cedar request, sliced evaluation;
//! - [`routes`] matches method and path to an action;
//! - [`mapping`] builds the Cedar request and the decision key from one field list;
//! - [`conformance`] checks at load that every request we build fits the schema;
//! - [`policy_store`] loads the policy folder; [`index`] slices it per request;
//! - [`context_reads`] finds what the policies read of the context;
//! - [`decision_cache`] keeps outcomes by decision key.

pub mod conformance;
pub mod context_reads;
pub mod decision_cache;
pub mod evaluator;
pub mod index;
pub mod mapping;
pub mod policy_store;
pub mod routes;

use cedar_policy::{Authorizer, Decision as CedarDecision, PolicySet, Response};

use index::Slice;
use mapping::CedarInput;
use policy_store::PolicyStore;

/// The result of evaluating the policies for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyOutcome {
    /// True only when Cedar allows and no policy raised an error.
    pub allowed: bool,
    /// Ids of the determining policies (the permits of an allow, the forbids of
    /// a deny); shared, so a cached outcome hands them to a decision without a copy.
    pub policies: std::sync::Arc<[String]>,
    /// Evaluation errors, each naming its policy.
    pub errors: Vec<String>,
}

/// Evaluates the policies whose scope can match the request (see
/// [`index`]): the same outcome as [`evaluate_full`], at a cost that does not
/// grow with the size of the policy set.
pub fn evaluate(authorizer: &Authorizer, store: &PolicyStore, input: &CedarInput) -> PolicyOutcome {
    match store.index.slice(
        &input.entities,
        &input.principal,
        &input.action,
        &input.resource,
    ) {
        Slice::All => evaluate_against(authorizer, &store.policies, input),
        Slice::Some(slice) => evaluate_against(authorizer, &slice, input),
    }
}

/// Evaluates every policy of the store (the reference [`evaluate`] is checked
/// against, and the baseline of the slicing benchmark).
pub fn evaluate_full(
    authorizer: &Authorizer,
    store: &PolicyStore,
    input: &CedarInput,
) -> PolicyOutcome {
    evaluate_against(authorizer, &store.policies, input)
}

/// Fail closed: Cedar skips a policy that errors, which can turn a `forbid`
/// into an allow, so any evaluation error denies.
fn evaluate_against(
    authorizer: &Authorizer,
    policies: &PolicySet,
    input: &CedarInput,
) -> PolicyOutcome {
    let response = authorizer.is_authorized(&input.request, policies, &input.entities);
    outcome(&response)
}

fn outcome(response: &Response) -> PolicyOutcome {
    let diagnostics = response.diagnostics();
    let mut policies: Vec<String> = diagnostics.reason().map(|id| id.to_string()).collect();
    policies.sort();
    let mut errors: Vec<String> = diagnostics.errors().map(|e| e.to_string()).collect();
    // Cedar reports errors in policy-set order; sort so the outcome does not
    // depend on which set (whole or slice) was evaluated.
    errors.sort();
    PolicyOutcome {
        allowed: response.decision() == CedarDecision::Allow && errors.is_empty(),
        policies: policies.into(),
        errors,
    }
}
