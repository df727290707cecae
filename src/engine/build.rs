//! Building an engine from the configuration: the one place the stages are
//! composed.

use std::sync::Arc;

use super::Engine;
use crate::answer::profile::ResponseProfiles;
use crate::authn::authenticator::Authenticator;
use crate::authn::sender_constraint::SenderConstraints;
use crate::authz::evaluator::Evaluator;
use crate::config::Config;

/// Everything wrong with a configuration, keys and policy folder, all at once.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct LoadError {
    /// One line per problem, with file and line when known.
    pub problems: Vec<String>,
}

/// Every principal type a credential can produce (issuers, API keys,
/// workloads), sorted and deduplicated: the types the mapping must accept.
fn principal_types(config: &Config) -> Vec<String> {
    let mut types: Vec<String> = config
        .issuers
        .iter()
        .map(|i| i.principal_type.clone())
        .chain(config.api_keys.iter().map(|k| k.principal_type.clone()))
        .chain(config.workload.iter().map(|w| w.principal_type.clone()))
        .collect();
    types.sort();
    types.dedup();
    types
}

impl Engine {
    /// Loads keys and policies named by `config` and checks that every route's
    /// action exists in the schema and that the requests we build for it
    /// conform to it. Every problem of every stage is reported at once.
    pub fn from_config(config: &Config) -> Result<Engine, LoadError> {
        let authenticator = Authenticator::from_config(config);
        let sender = SenderConstraints::from_config(config).map_err(|e| vec![e.to_string()]);
        let evaluator = Evaluator::from_config(config, &principal_types(config));
        let responses = match &evaluator {
            Ok(evaluator) => ResponseProfiles::load(config, evaluator.policies()),
            Err(_) => Ok(ResponseProfiles::default()),
        };
        match (authenticator, sender, evaluator, responses) {
            (Ok(authenticator), Ok(sender), Ok(evaluator), Ok(responses)) => Ok(Engine::compose(
                config,
                Arc::new(authenticator),
                Arc::new(sender),
                evaluator,
                Arc::new(responses),
                1,
            )),
            (authenticator, sender, evaluator, responses) => Err(LoadError {
                problems: authenticator
                    .err()
                    .into_iter()
                    .chain(sender.err())
                    .chain(evaluator.err())
                    .chain(responses.err())
                    .flatten()
                    .collect(),
            }),
        }
    }

    /// A new engine with the policy folder read again: the credential stage
    /// (issuers and their keys, API keys, the verified-token cache,
    /// revocations, counters) is shared with `self`; the evaluator and its
    /// decision cache are new, and the generation is one more. Nothing of
    /// `self` changes, so a reload that fails leaves the serving engine as it
    /// was.
    pub fn reload_policies(&self, config: &Config) -> Result<Engine, LoadError> {
        let evaluator = Evaluator::from_config(config, &principal_types(config))
            .map_err(|problems| LoadError { problems })?;
        // The policies' @response annotations are checked against the profiles.
        let responses = ResponseProfiles::load(config, evaluator.policies())
            .map_err(|problems| LoadError { problems })?;
        Ok(Engine::compose(
            config,
            self.authenticator.clone(),
            self.sender.clone(),
            evaluator,
            Arc::new(responses),
            self.generation + 1,
        ))
    }

    /// A new engine from a changed configuration file: every stage is built
    /// again (issuers and their keys, API keys, workload settings, caches,
    /// routes, modes, responses) except the revocation store, which carries
    /// over, as do the credential counters. The generation is one more.
    /// Remote keys are not fetched here: start the new authenticator's
    /// background work and wait for it before serving the result.
    pub fn rebuild(&self, config: &Config) -> Result<Engine, LoadError> {
        let mut engine = Engine::from_config(config)?;
        if let Some(store) = self.authenticator.revocations() {
            engine.authenticator.set_revocations(store.clone());
        }
        engine.authenticator.continue_counters(&self.authenticator);
        // Built just above, so not shared yet.
        if let Some(sender) = Arc::get_mut(&mut engine.sender) {
            sender.continue_from(&self.sender);
        }
        engine.generation = self.generation + 1;
        Ok(engine)
    }

    fn compose(
        config: &Config,
        authenticator: Arc<Authenticator>,
        sender: Arc<SenderConstraints>,
        evaluator: Evaluator,
        responses: Arc<ResponseProfiles>,
        generation: u64,
    ) -> Engine {
        Engine {
            authenticator,
            sender,
            responses,
            record_inputs: config.audit.record_inputs,
            evaluator,
            response: config.response.clone(),
            realm: config.application.name.clone(),
            token_mode: config.application.token_mode,
            generation,
        }
    }
}
