//! Authorization: routes, the Cedar mapping, the policy folder and evaluation.

pub mod mapping;
pub mod policy_store;
pub mod routes;

use cedar_policy::{Authorizer, Decision as CedarDecision};

use mapping::CedarInput;
use policy_store::PolicyStore;

/// The result of evaluating the policies for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyOutcome {
    /// True only when Cedar allows and no policy raised an error.
    pub allowed: bool,
    /// Ids of the determining policies (the permits of an allow, the forbids of a deny).
    pub policies: Vec<String>,
    /// Evaluation errors, each naming its policy.
    pub errors: Vec<String>,
}

/// Evaluates the policies. Fail closed: Cedar skips a policy that errors, which
/// can turn a `forbid` into an allow, so any evaluation error denies.
pub fn evaluate(authorizer: &Authorizer, store: &PolicyStore, input: &CedarInput) -> PolicyOutcome {
    let response = authorizer.is_authorized(&input.request, &store.policies, &input.entities);
    let diagnostics = response.diagnostics();
    let mut policies: Vec<String> = diagnostics.reason().map(|id| id.to_string()).collect();
    policies.sort();
    let errors: Vec<String> = diagnostics.errors().map(|e| e.to_string()).collect();
    PolicyOutcome {
        allowed: response.decision() == CedarDecision::Allow && errors.is_empty(),
        policies,
        errors,
    }
}
