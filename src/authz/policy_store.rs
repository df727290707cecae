//! The policy folder: Cedar schema, policies, template links and static
//! entities, loaded and strictly validated as one unit, then indexed for
//! slicing. Every problem is reported with file and line.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use cedar_policy::{
    Entities, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet, Schema, SchemaFragment,
    SlotId, ValidationMode, Validator,
};
use miette::Diagnostic;
use serde::Deserialize;

use super::context_reads::ContextReads;
use super::index::PolicyIndex;

/// Name of the optional static entities file in the policy folder.
pub const ENTITIES_FILE: &str = "entities.json";

/// Name of the optional template-links file in the policy folder: a JSON array
/// of `{"id", "template", "values": {"?principal": {"type", "id"}, ...}}`.
pub const LINKS_FILE: &str = "links.json";

/// One template link of `links.json`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkSpec {
    /// Id of the linked policy.
    id: String,
    /// Id of the template (its `@id` or `<file>#<index>`).
    template: String,
    /// Slot values: `?principal` and/or `?resource`.
    values: HashMap<String, EntityRef>,
}

/// An entity in Cedar's JSON form.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntityRef {
    #[serde(rename = "type")]
    entity_type: String,
    id: String,
}

/// One problem found in a policy folder file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDiagnostic {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What is wrong, with Cedar's help text when it has one.
    pub message: String,
}

impl fmt::Display for PolicyDiagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

/// A policy folder that failed to load; holds every problem found, not just the first.
#[derive(Debug, thiserror::Error)]
#[error("{} problem(s) in the policy folder:\n{}", .diagnostics.len(), render(.diagnostics))]
pub struct PolicyLoadError {
    /// All problems, in file order.
    pub diagnostics: Vec<PolicyDiagnostic>,
}

fn render(diagnostics: &[PolicyDiagnostic]) -> String {
    diagnostics
        .iter()
        .map(|d| format!("  {d}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A loaded, strictly validated policy folder.
#[derive(Debug, Clone)]
pub struct PolicyStore {
    /// The merged schema of all `*.cedarschema` files.
    pub schema: Schema,
    /// All policies, templates and template-linked policies; ids from `@id`,
    /// `<file>#<index>`, or the link's `id`.
    pub policies: PolicySet,
    /// The policies indexed by principal and resource scope (see
    /// [`super::index`]); shared by the copies of the store.
    pub index: std::sync::Arc<PolicyIndex>,
    /// Static entities from `entities.json` plus the schema's action entities.
    pub entities: Entities,
    /// The context paths the policies can read (what the decision cache keys on).
    pub context_reads: super::context_reads::ContextReads,
    /// Validator warnings (they do not stop loading).
    pub warnings: Vec<PolicyDiagnostic>,
    /// Which file each policy came from.
    pub policy_files: HashMap<PolicyId, PathBuf>,
    /// SHA-256 (hex) of every file of the set (names and contents), so a
    /// decision names the exact set that made it.
    /// Shared, so that each decision names it without copying it.
    pub digest: std::sync::Arc<str>,
    /// The per-file results, for the next load of the folder.
    cache: Arc<LoadCache>,
    /// How many policy files this load parsed (see [`PolicyStore::files_parsed`]).
    files_parsed: usize,
}

struct SourceFile {
    path: PathBuf,
    text: String,
}

/// What one policy file gives on its own: its statements under their final
/// ids, strictly validated, its problems and the context paths it reads.
/// Kept between loads and reused while the file's text and the schema are
/// the same, so a reload parses and validates only the files that changed.
#[derive(Debug)]
struct FileUnit {
    /// SHA-256 of the schema, the file's path and its text.
    key: [u8; 32],
    templates: Vec<cedar_policy::Template>,
    policies: Vec<cedar_policy::Policy>,
    diagnostics: Vec<PolicyDiagnostic>,
    warnings: Vec<PolicyDiagnostic>,
    reads: ContextReads,
}

/// The per-file results of one load, handed to the next load of the folder.
#[derive(Debug, Default)]
struct LoadCache {
    units: HashMap<PathBuf, Arc<FileUnit>>,
    /// The static entities, keyed by SHA-256 of the schema and `entities.json`.
    entities: Option<([u8; 32], Entities)>,
}

/// The last load of each folder, held weakly: while a store of a folder is
/// alive (the one serving), loading the folder again reuses its unchanged
/// files; once no store holds them, they are freed.
static LAST_LOADS: Mutex<Vec<(PathBuf, Weak<LoadCache>)>> = Mutex::new(Vec::new());

fn last_load(dir: &Path) -> Option<Arc<LoadCache>> {
    let mut loads = LAST_LOADS.lock().unwrap_or_else(|e| e.into_inner());
    loads.retain(|(_, cache)| cache.strong_count() > 0);
    loads
        .iter()
        .find(|(d, _)| d == dir)
        .and_then(|(_, cache)| cache.upgrade())
}

fn remember_load(dir: &Path, cache: &Arc<LoadCache>) {
    let mut loads = LAST_LOADS.lock().unwrap_or_else(|e| e.into_inner());
    loads.retain(|(d, cache)| d != dir && cache.strong_count() > 0);
    loads.push((dir.to_owned(), Arc::downgrade(cache)));
}

/// Parses, renames and strictly validates one policy file on its own.
/// Cedar validates each static policy and template by itself (links aside,
/// see `validate_links`), so a file validated alone gets exactly the
/// diagnostics it would get in the whole set.
fn parse_file(file: &SourceFile, key: [u8; 32], validator: Option<&Validator>) -> FileUnit {
    let mut unit = FileUnit {
        key,
        templates: Vec::new(),
        policies: Vec::new(),
        diagnostics: Vec::new(),
        warnings: Vec::new(),
        reads: ContextReads::Paths(Default::default()),
    };
    let parsed = match PolicySet::from_str(&file.text) {
        Ok(set) => set,
        Err(e) => {
            unit.diagnostics.extend(diagnostics_of(&e, file));
            return unit;
        }
    };
    let name = file
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Cedar numbers policies and templates in one sequence per file; keep
    // source order so `<file>#<n>` names the n-th statement of the file.
    let mut statements: Vec<(PolicyId, bool)> = parsed
        .templates()
        .map(|t| (t.id().clone(), true))
        .chain(parsed.policies().map(|p| (p.id().clone(), false)))
        .collect();
    statements.sort_by_key(|(id, _)| {
        id.to_string()
            .trim_start_matches("policy")
            .parse::<usize>()
            .unwrap_or(usize::MAX)
    });
    let mut own = PolicySet::new();
    for (index, (old_id, is_template)) in statements.into_iter().enumerate() {
        let added = if is_template {
            let Some(template) = parsed.template(&old_id) else {
                continue;
            };
            let id = statement_id(template.annotation("id"), &name, index);
            own.add_template(template.new_id(id))
        } else {
            let Some(policy) = parsed.policy(&old_id) else {
                continue;
            };
            let id = statement_id(policy.annotation("id"), &name, index);
            own.add(policy.new_id(id))
        };
        if let Err(e) = added {
            unit.diagnostics.push(PolicyDiagnostic {
                file: file.path.clone(),
                line: None,
                column: None,
                message: e.to_string(),
            });
        }
    }
    if let Some(validator) = validator {
        let result = validator.validate(&own, ValidationMode::Strict);
        for error in result.validation_errors() {
            let id = error.policy_id();
            unit.diagnostics
                .extend(located(error, Some(file), &file.path, Some(id)));
        }
        for warning in result.validation_warnings() {
            let id = warning.policy_id();
            unit.warnings
                .extend(located(warning, Some(file), &file.path, Some(id)));
        }
    }
    unit.reads = ContextReads::of(&own);
    unit.templates = own.templates().cloned().collect();
    unit.policies = own.policies().cloned().collect();
    unit
}

/// The union of the context reads of several files.
fn merge_reads<'a>(reads: impl Iterator<Item = &'a ContextReads>) -> ContextReads {
    let mut paths = std::collections::BTreeSet::new();
    for read in reads {
        match read {
            ContextReads::All => return ContextReads::All,
            ContextReads::Paths(more) => paths.extend(more.iter().cloned()),
        }
    }
    ContextReads::Paths(paths)
}

fn unit_key(schema_key: &[u8; 32], file: &SourceFile) -> [u8; 32] {
    let mut digest = crate::digest::FieldDigest::default();
    digest.field(schema_key);
    digest.field(file.path.as_os_str().as_encoded_bytes());
    digest.field(file.text.as_bytes());
    digest.finish()
}

/// Strict validation of the template links: their slot values against the
/// schema, in a set of the templates and the links only (the static
/// policies and the templates were validated with their files).
fn validate_links(
    dir: &Path,
    schema: &Schema,
    policies: &PolicySet,
    diagnostics: &mut Vec<PolicyDiagnostic>,
    warnings: &mut Vec<PolicyDiagnostic>,
) {
    if !policies.policies().any(|p| p.template_id().is_some()) {
        return;
    }
    let mut links = PolicySet::new();
    for template in policies.templates() {
        // Ids are unique in `policies`, so adding and linking cannot fail.
        let _ = links.add_template(template.clone());
    }
    for link in policies.policies() {
        if let (Some(template), Some(values)) = (link.template_id(), link.template_links()) {
            let _ = links.link(template.clone(), link.id().clone(), values);
        }
    }
    let file = dir.join(LINKS_FILE);
    let result = Validator::new(schema.clone()).validate(&links, ValidationMode::Strict);
    let is_link = |id: &PolicyId| links.template(id).is_none();
    for error in result.validation_errors() {
        if is_link(error.policy_id()) {
            diagnostics.extend(located(error, None, &file, Some(error.policy_id())));
        }
    }
    for warning in result.validation_warnings() {
        if is_link(warning.policy_id()) {
            warnings.extend(located(warning, None, &file, Some(warning.policy_id())));
        }
    }
}

impl PolicyStore {
    /// Loads `dir`: all `*.cedarschema` (at least one), all `*.cedar`, and
    /// `entities.json` when present. Fails with every problem found.
    ///
    /// Policy files are parsed and validated in parallel. While another
    /// store of the same folder is alive (the one serving), the files whose
    /// text and schema are unchanged are taken from it rather than parsed
    /// again; see [`PolicyStore::reload`].
    pub fn load(dir: &Path) -> Result<PolicyStore, PolicyLoadError> {
        Self::load_reusing(dir, last_load(dir))
    }

    /// Loads `dir` again after a change, parsing and validating only the
    /// policy files (and `entities.json`) whose text, or the schema, changed
    /// since `self` was loaded; everything else is taken from `self`. The
    /// result is checked as a whole (duplicate ids, links, index) as
    /// [`PolicyStore::load`] checks it, and `self` is left as it was.
    pub fn reload(&self, dir: &Path) -> Result<PolicyStore, PolicyLoadError> {
        Self::load_reusing(dir, Some(self.cache.clone()))
    }

    /// How many policy files this load parsed and validated; the others
    /// were reused from the previous load of the folder.
    pub fn files_parsed(&self) -> usize {
        self.files_parsed
    }

    fn load_reusing(
        dir: &Path,
        previous: Option<Arc<LoadCache>>,
    ) -> Result<PolicyStore, PolicyLoadError> {
        let mut diagnostics = Vec::new();
        let (schema_files, policy_files) = match list_sources(dir) {
            Ok(found) => found,
            Err(d) => {
                return Err(PolicyLoadError {
                    diagnostics: vec![d],
                });
            }
        };
        if schema_files.is_empty() {
            diagnostics.push(PolicyDiagnostic {
                file: dir.to_owned(),
                line: None,
                column: None,
                message: "no *.cedarschema file: strict validation needs a schema".into(),
            });
        }

        let mut fragments = Vec::new();
        let mut schema_digest = crate::digest::FieldDigest::default();
        for file in &schema_files {
            schema_digest.field(file.path.as_os_str().as_encoded_bytes());
            schema_digest.field(file.text.as_bytes());
            match SchemaFragment::from_cedarschema_str(&file.text) {
                Ok((fragment, _warnings)) => fragments.push(fragment),
                Err(e) => diagnostics.extend(diagnostics_of(&e, file)),
            }
        }
        let schema_key = schema_digest.finish();
        let schema = if diagnostics.is_empty() {
            match Schema::from_schema_fragments(fragments) {
                Ok(schema) => Some(schema),
                Err(e) => {
                    let file = &schema_files[0];
                    diagnostics.extend(diagnostics_of(&e, file));
                    None
                }
            }
        } else {
            None
        };

        // The files to parse: those no unit of the previous load has the key of.
        let keys: Vec<[u8; 32]> = policy_files
            .iter()
            .map(|file| unit_key(&schema_key, file))
            .collect();
        let mut units: Vec<Option<Arc<FileUnit>>> = policy_files
            .iter()
            .zip(&keys)
            .map(|(file, key)| {
                previous
                    .as_ref()
                    .and_then(|cache| cache.units.get(&file.path))
                    .filter(|unit| unit.key == *key)
                    .cloned()
            })
            .collect();
        let to_parse: Vec<usize> = (0..units.len()).filter(|i| units[*i].is_none()).collect();
        let files_parsed = to_parse.len();

        let entities_key = {
            let mut digest = crate::digest::FieldDigest::default();
            digest.field(&schema_key);
            digest.option(std::fs::read(dir.join(ENTITIES_FILE)).ok().as_deref());
            digest.finish()
        };
        let reused_entities = previous
            .as_ref()
            .and_then(|cache| cache.entities.as_ref())
            .filter(|(key, _)| *key == entities_key)
            .map(|(_, entities)| entities.clone());

        // Parse and validate the changed files on every core; the static
        // entities (one large file) are parsed beside them.
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(to_parse.len())
            .max(1);
        let next = AtomicUsize::new(0);
        let (parsed, entities) = std::thread::scope(|scope| {
            let entities = scope.spawn(|| match (reused_entities, &schema) {
                (Some(entities), _) => Some(Ok(entities)),
                (None, Some(schema)) => Some(load_entities(dir, schema)),
                (None, None) => None,
            });
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| {
                        let validator = schema.clone().map(Validator::new);
                        let mut done = Vec::new();
                        while let Some(&i) = to_parse.get(next.fetch_add(1, Ordering::Relaxed)) {
                            let unit = parse_file(&policy_files[i], keys[i], validator.as_ref());
                            done.push((i, unit));
                        }
                        done
                    })
                })
                .collect();
            let parsed: Vec<(usize, FileUnit)> = handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect();
            (parsed, entities.join().ok().flatten())
        });
        for (i, unit) in parsed {
            units[i] = Some(Arc::new(unit));
        }
        if units.iter().any(Option::is_none) {
            // A worker panicked: refuse rather than load part of the set.
            diagnostics.push(PolicyDiagnostic {
                file: dir.to_owned(),
                line: None,
                column: None,
                message: "internal error while parsing the policy files".into(),
            });
        }
        let units: Vec<Arc<FileUnit>> = units.into_iter().flatten().collect();

        // The whole set: ids must be unique across files.
        let mut policies = PolicySet::new();
        let mut sources: HashMap<PolicyId, usize> = HashMap::new();
        let mut warnings = Vec::new();
        for (file_index, unit) in units.iter().enumerate() {
            diagnostics.extend(unit.diagnostics.iter().cloned());
            warnings.extend(unit.warnings.iter().cloned());
            let mut added = Vec::new();
            for template in &unit.templates {
                added.push((
                    template.id().clone(),
                    policies.add_template(template.clone()),
                ));
            }
            for policy in &unit.policies {
                added.push((policy.id().clone(), policies.add(policy.clone())));
            }
            for (id, result) in added {
                sources.insert(id, file_index);
                if let Err(e) = result {
                    diagnostics.push(PolicyDiagnostic {
                        file: policy_files[file_index].path.clone(),
                        line: None,
                        column: None,
                        message: e.to_string(),
                    });
                }
            }
        }

        if diagnostics.is_empty() {
            diagnostics.extend(link_templates(dir, &mut policies));
        }
        if let Some(schema) = &schema {
            validate_links(dir, schema, &policies, &mut diagnostics, &mut warnings);
        }

        let entities = match entities {
            Some(Ok(entities)) => Some(entities),
            Some(Err(d)) => {
                diagnostics.push(d);
                None
            }
            None => None,
        };

        let index = PolicyIndex::new(&policies)
            .map_err(|e| {
                diagnostics.push(PolicyDiagnostic {
                    file: dir.join(LINKS_FILE),
                    line: None,
                    column: None,
                    message: e.to_string(),
                })
            })
            .ok();

        match (schema, entities, index) {
            (Some(schema), Some(entities), Some(index)) if diagnostics.is_empty() => {
                let cache = Arc::new(LoadCache {
                    units: policy_files
                        .iter()
                        .zip(&units)
                        .map(|(file, unit)| (file.path.clone(), unit.clone()))
                        .collect(),
                    entities: Some((entities_key, entities.clone())),
                });
                remember_load(dir, &cache);
                Ok(PolicyStore {
                    schema,
                    context_reads: merge_reads(units.iter().map(|u| &u.reads)),
                    policies,
                    index: Arc::new(index),
                    entities,
                    warnings,
                    policy_files: sources
                        .into_iter()
                        .map(|(id, i)| (id, policy_files[i].path.clone()))
                        .collect(),
                    digest: content_digest(dir, schema_files.iter().chain(&policy_files)).into(),
                    cache,
                    files_parsed,
                })
            }
            _ => Err(PolicyLoadError { diagnostics }),
        }
    }

    /// Number of static and linked policies plus templates.
    pub fn len(&self) -> usize {
        self.policies.policies().count() + self.policies.templates().count()
    }

    /// True when the folder holds no policies (every request is then denied).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn content_digest<'a>(dir: &Path, files: impl Iterator<Item = &'a SourceFile>) -> String {
    let mut digest = crate::digest::FieldDigest::default();
    let entities = dir.join(ENTITIES_FILE);
    let entities_text = std::fs::read(&entities).unwrap_or_default();
    let mut add = |name: &Path, bytes: &[u8]| {
        let name = name
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        digest.field(name.as_bytes());
        digest.field(bytes);
    };
    for file in files {
        add(&file.path, file.text.as_bytes());
    }
    add(&entities, &entities_text);
    let links = dir.join(LINKS_FILE);
    let links_text = std::fs::read(&links).unwrap_or_default();
    add(&links, &links_text);
    hex::encode(digest.finish())
}

/// A cheap fingerprint of the policy folder (names, sizes, modification times),
/// to notice changes without reading the files.
pub fn folder_fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let meta = entry.metadata().ok()?;
            meta.is_file()
                .then(|| (entry.path(), meta.len(), meta.modified().ok()))
        })
        .collect();
    entries.sort();
    entries
}

fn statement_id(annotation: Option<&str>, file_name: &str, index: usize) -> PolicyId {
    match annotation {
        Some(id) if !id.is_empty() => PolicyId::new(id),
        _ => PolicyId::new(format!("{file_name}#{index}")),
    }
}

fn list_sources(dir: &Path) -> Result<(Vec<SourceFile>, Vec<SourceFile>), PolicyDiagnostic> {
    let read_error = |path: &Path, e: std::io::Error| PolicyDiagnostic {
        file: path.to_owned(),
        line: None,
        column: None,
        message: format!("cannot read: {e}"),
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| read_error(dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    let mut schemas = Vec::new();
    let mut policies = Vec::new();
    for path in paths {
        let target = match path.extension().and_then(|e| e.to_str()) {
            Some("cedarschema") => &mut schemas,
            Some("cedar") => &mut policies,
            _ => continue,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| read_error(&path, e))?;
        target.push(SourceFile { path, text });
    }
    Ok((schemas, policies))
}

/// Links the templates as `links.json` asks; every bad link is reported.
fn link_templates(dir: &Path, policies: &mut PolicySet) -> Vec<PolicyDiagnostic> {
    let path = dir.join(LINKS_FILE);
    let problem = |message: String| PolicyDiagnostic {
        file: path.clone(),
        line: None,
        column: None,
        message,
    };
    if !path.exists() {
        return Vec::new();
    }
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => return vec![problem(format!("cannot read: {e}"))],
    };
    let links: Vec<LinkSpec> = match serde_json::from_str(&text) {
        Ok(links) => links,
        Err(e) => {
            return vec![PolicyDiagnostic {
                line: Some(e.line()),
                column: Some(e.column()),
                ..problem(format!(
                    "expected an array of {{\"id\", \"template\", \"values\"}}: {e}"
                ))
            }];
        }
    };
    let mut diagnostics = Vec::new();
    let mut types: HashMap<String, EntityTypeName> = HashMap::new();
    for (n, link) in links.into_iter().enumerate() {
        let mut values = HashMap::new();
        for (slot, entity) in &link.values {
            let slot_id = match slot.as_str() {
                "?principal" => SlotId::principal(),
                "?resource" => SlotId::resource(),
                other => {
                    diagnostics.push(problem(format!(
                        "link {n} ({}): unknown slot {other:?}, expected \"?principal\" or \"?resource\"",
                        link.id
                    )));
                    continue;
                }
            };
            // Parsing a type name runs Cedar's parser; links name few types.
            let parsed = match types.get(&entity.entity_type) {
                Some(ty) => Ok(ty.clone()),
                None => EntityTypeName::from_str(&entity.entity_type).inspect(|ty| {
                    types.insert(entity.entity_type.clone(), ty.clone());
                }),
            };
            match parsed {
                Ok(ty) => {
                    values.insert(
                        slot_id,
                        EntityUid::from_type_name_and_id(ty, EntityId::new(&entity.id)),
                    );
                }
                Err(e) => diagnostics.push(problem(format!(
                    "link {n} ({}): slot {slot}: bad entity type {:?}: {e}",
                    link.id, entity.entity_type
                ))),
            }
        }
        if let Err(e) = policies.link(
            PolicyId::new(&link.template),
            PolicyId::new(&link.id),
            values,
        ) {
            diagnostics.push(problem(format!(
                "link {n} ({}) of template {:?}: {e}",
                link.id, link.template
            )));
        }
    }
    diagnostics
}

fn load_entities(dir: &Path, schema: &Schema) -> Result<Entities, PolicyDiagnostic> {
    let path = dir.join(ENTITIES_FILE);
    let problem = |message: String| PolicyDiagnostic {
        file: path.clone(),
        line: None,
        column: None,
        message,
    };
    let actions = schema
        .action_entities()
        .map_err(|e| problem(format!("schema action entities: {e}")))?;
    if !path.exists() {
        return Ok(actions);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| problem(format!("cannot read: {e}")))?;
    let entities =
        Entities::from_json_str(&text, Some(schema)).map_err(|e| problem(full_message(&e)))?;
    entities
        .add_entities(actions.iter().cloned(), None)
        .map_err(|e| problem(full_message(&e)))
}

fn diagnostics_of<D: Diagnostic + ?Sized>(error: &D, file: &SourceFile) -> Vec<PolicyDiagnostic> {
    // Parse errors bundle several diagnostics; report each with its own location.
    let related: Vec<&dyn Diagnostic> = error.related().map(|r| r.collect()).unwrap_or_default();
    if related.is_empty() {
        located(error, Some(file), &file.path, None)
    } else {
        related
            .into_iter()
            .flat_map(|d| located(d, Some(file), &file.path, None))
            .collect()
    }
}

fn located<D: Diagnostic + ?Sized>(
    diagnostic: &D,
    file: Option<&SourceFile>,
    fallback: &Path,
    policy: Option<&PolicyId>,
) -> Vec<PolicyDiagnostic> {
    let offset = diagnostic
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|label| label.offset());
    let (line, column) = match (file, offset) {
        (Some(file), Some(offset)) => {
            let (l, c) = line_column(&file.text, offset);
            (Some(l), Some(c))
        }
        _ => (None, None),
    };
    let mut message = full_message(diagnostic);
    if let Some(policy) = policy {
        message = format!("policy {:?}: {message}", policy.to_string());
    }
    vec![PolicyDiagnostic {
        file: file
            .map(|f| f.path.clone())
            .unwrap_or_else(|| fallback.to_owned()),
        line,
        column,
        message,
    }]
}

fn full_message<D: Diagnostic + ?Sized>(diagnostic: &D) -> String {
    match diagnostic.help() {
        Some(help) => format!("{diagnostic} (help: {help})"),
        None => diagnostic.to_string(),
    }
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |p| p + 1);
    (line, offset - line_start + 1)
}

/// The 1-based line of `@id("<id>")` in `text` (Cedar's API gives a
/// parsed policy no source location), for diagnostics naming file and line.
pub fn annotation_line(text: &str, id: &str) -> Option<usize> {
    let quoted = serde_json::to_string(id).ok()?;
    text.lines()
        .position(|line| {
            line.split("@id").skip(1).any(|rest| {
                let rest = rest.trim_start();
                rest.strip_prefix('(')
                    .is_some_and(|rest| rest.trim_start().starts_with(&quoted))
            })
        })
        .map(|index| index + 1)
}

/// The 1-based line where the `index`-th statement (policy or template,
/// from 0) of a policy file starts, its annotations included: the first
/// token after the `index`-th `;` outside strings and comments. For
/// policies without `@id`, whose id is `<file>#<index>`.
pub fn statement_line(text: &str, index: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let (mut line, mut at, mut ends) = (1usize, 0usize, 0usize);
    // Looking for the first token of the wanted statement.
    let mut seeking = index == 0;
    while at < bytes.len() {
        let b = bytes[at];
        match b {
            b'\n' => line += 1,
            b'/' if bytes.get(at + 1) == Some(&b'/') => {
                while at < bytes.len() && bytes[at] != b'\n' {
                    at += 1;
                }
                continue;
            }
            _ if b.is_ascii_whitespace() => {}
            _ if seeking => return Some(line),
            b'"' => {
                at += 1;
                while at < bytes.len() && bytes[at] != b'"' {
                    match bytes[at] {
                        b'\\' => at += 1,
                        b'\n' => line += 1,
                        _ => {}
                    }
                    at += 1;
                }
            }
            b';' => {
                ends += 1;
                seeking = ends == index;
            }
            _ => {}
        }
        at += 1;
    }
    None
}

/// A scope a policy tests for: a string literal compared with
/// `context.token.scopes` by `contains`, `containsAll` or `containsAny`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeTest {
    /// The policy or template.
    pub policy: PolicyId,
    /// The scope, as written.
    pub scope: String,
}

/// A `forbid` that can change no decision: on every action it applies to,
/// no `permit` can apply, so default deny already denies what it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowedForbid {
    /// The forbid policy or template.
    pub policy: PolicyId,
    /// Each action it applies to, with why no permit applies to it there.
    pub actions: Vec<(EntityUid, String)>,
}

/// The entity type a scope constraint fixes, when it fixes one (`==`, `is`,
/// `is … in`); `None` when any type could match (`in`, any, a slot).
fn fixed_type_principal(c: &cedar_policy::TemplatePrincipalConstraint) -> Option<EntityTypeName> {
    use cedar_policy::TemplatePrincipalConstraint as C;
    match c {
        C::Eq(Some(uid)) => Some(uid.type_name().clone()),
        C::Is(ty) | C::IsIn(ty, _) => Some(ty.clone()),
        _ => None,
    }
}

fn fixed_type_resource(c: &cedar_policy::TemplateResourceConstraint) -> Option<EntityTypeName> {
    use cedar_policy::TemplateResourceConstraint as C;
    match c {
        C::Eq(Some(uid)) => Some(uid.type_name().clone()),
        C::Is(ty) | C::IsIn(ty, _) => Some(ty.clone()),
        _ => None,
    }
}

fn principal_as_template(
    c: cedar_policy::PrincipalConstraint,
) -> cedar_policy::TemplatePrincipalConstraint {
    use cedar_policy::{PrincipalConstraint as P, TemplatePrincipalConstraint as T};
    match c {
        P::Any => T::Any,
        P::In(uid) => T::In(Some(uid)),
        P::Eq(uid) => T::Eq(Some(uid)),
        P::Is(ty) => T::Is(ty),
        P::IsIn(ty, uid) => T::IsIn(ty, Some(uid)),
    }
}

fn resource_as_template(
    c: cedar_policy::ResourceConstraint,
) -> cedar_policy::TemplateResourceConstraint {
    use cedar_policy::{ResourceConstraint as R, TemplateResourceConstraint as T};
    match c {
        R::Any => T::Any,
        R::In(uid) => T::In(Some(uid)),
        R::Eq(uid) => T::Eq(Some(uid)),
        R::Is(ty) => T::Is(ty),
        R::IsIn(ty, uid) => T::IsIn(ty, Some(uid)),
    }
}

/// What the scope analysis needs of one policy or template.
struct Statement {
    id: PolicyId,
    effect: cedar_policy::Effect,
    action: cedar_policy::ActionConstraint,
    principal_type: Option<EntityTypeName>,
    resource_type: Option<EntityTypeName>,
    est: Option<serde_json::Value>,
}

impl PolicyStore {
    /// The static policies and the templates, each once (a linked policy is
    /// its template's text).
    fn statements(&self) -> Vec<Statement> {
        let policies = self
            .policies
            .policies()
            .filter(|p| p.template_id().is_none())
            .map(|p| Statement {
                id: p.id().clone(),
                effect: p.effect(),
                action: p.action_constraint(),
                principal_type: fixed_type_principal(&principal_as_template(
                    p.principal_constraint(),
                )),
                resource_type: fixed_type_resource(&resource_as_template(p.resource_constraint())),
                est: p.to_json().ok(),
            });
        let templates = self.policies.templates().map(|t| Statement {
            id: t.id().clone(),
            effect: t.effect(),
            action: t.action_constraint(),
            principal_type: fixed_type_principal(&t.principal_constraint()),
            resource_type: fixed_type_resource(&t.resource_constraint()),
            est: t.to_json().ok(),
        });
        policies.chain(templates).collect()
    }

    /// Where a policy or template is written, for warnings: `file:line` of
    /// its `@id` annotation, or of its statement when its id is
    /// `<file>#<n>`; the file alone when neither is found.
    pub fn location(&self, id: &PolicyId) -> String {
        let Some(file) = self.policy_files.get(id) else {
            return "policies".to_owned();
        };
        let text = std::fs::read_to_string(file).ok();
        let line = text.as_deref().and_then(|text| {
            annotation_line(text, id.as_ref()).or_else(|| {
                let name = file.file_name()?.to_string_lossy();
                let index = AsRef::<str>::as_ref(id).strip_prefix(&format!("{name}#"))?;
                statement_line(text, index.parse().ok()?)
            })
        });
        match line {
            Some(line) => format!("{}:{line}", file.display()),
            None => file.display().to_string(),
        }
    }

    /// Every scope the policies and templates test for, in policy order:
    /// string literals in `context.token.scopes.contains("s")`,
    /// `.containsAll([...])`, `.containsAny([...])` and
    /// `[...].containsAny(context.token.scopes)`, wherever they sit in a
    /// condition (negated or not). Scopes computed at run time, or tested by
    /// other means (`==` on the set, a variable), are not seen.
    pub fn scopes_tested(&self) -> Vec<ScopeTest> {
        let mut found = Vec::new();
        for statement in self.statements() {
            let mut scopes = Vec::new();
            if let Some(est) = &statement.est {
                collect_scope_tests(est, &mut scopes);
            }
            let mut seen = std::collections::HashSet::new();
            for scope in scopes {
                if seen.insert(scope.clone()) {
                    found.push(ScopeTest {
                        policy: statement.id.clone(),
                        scope,
                    });
                }
            }
        }
        found
    }

    /// The `forbid` policies and templates no `permit` could be overridden
    /// by. For each action of the schema a forbid's action scope covers
    /// (`==`, `in [..]`, `in` a group, any action), a permit (static,
    /// linked or a template) counts when its action scope covers the same
    /// action and its principal and resource types, where both scopes fix
    /// one (`==`, `is`), are the same. Conditions are not read: a permit
    /// whose `when` can never hold still counts, so this never warns about
    /// a forbid that can matter. A forbid that covers no action at all is
    /// not judged.
    pub fn shadowed_forbids(&self) -> Vec<ShadowedForbid> {
        let statements = self.statements();
        // Each action with itself and the groups it is in.
        let groups_of: Vec<(EntityUid, Vec<EntityUid>)> = self
            .schema
            .actions()
            .map(|action| {
                let mut groups = vec![action.clone()];
                if let Some(ancestors) = self.entities.ancestors(action) {
                    groups.extend(ancestors.cloned());
                }
                (action.clone(), groups)
            })
            .collect();
        let covers =
            |constraint: &cedar_policy::ActionConstraint, groups: &[EntityUid]| match constraint {
                cedar_policy::ActionConstraint::Any => true,
                cedar_policy::ActionConstraint::Eq(uid) => &groups[0] == uid,
                cedar_policy::ActionConstraint::In(uids) => uids.iter().any(|u| groups.contains(u)),
            };
        let disjoint = |a: &Option<EntityTypeName>, b: &Option<EntityTypeName>| matches!((a, b), (Some(a), Some(b)) if a != b);
        let mut shadowed = Vec::new();
        for forbid in statements
            .iter()
            .filter(|s| s.effect == cedar_policy::Effect::Forbid)
        {
            let mut actions = Vec::new();
            let mut overrides_some = false;
            for (action, groups) in &groups_of {
                if !covers(&forbid.action, groups) {
                    continue;
                }
                let permits: Vec<&Statement> = statements
                    .iter()
                    .filter(|s| {
                        s.effect == cedar_policy::Effect::Permit && covers(&s.action, groups)
                    })
                    .collect();
                if permits.is_empty() {
                    actions.push((action.clone(), "no permit applies to action".to_owned()));
                    continue;
                }
                let fits = permits.iter().any(|p| {
                    !disjoint(&p.principal_type, &forbid.principal_type)
                        && !disjoint(&p.resource_type, &forbid.resource_type)
                });
                if fits {
                    overrides_some = true;
                    break;
                }
                let types = [
                    forbid
                        .principal_type
                        .as_ref()
                        .map(|t| format!("principal type {t}")),
                    forbid
                        .resource_type
                        .as_ref()
                        .map(|t| format!("resource type {t}")),
                ];
                let types: Vec<String> = types.into_iter().flatten().collect();
                actions.push((
                    action.clone(),
                    format!("no permit for {} applies to action", types.join(" and ")),
                ));
            }
            if !overrides_some && !actions.is_empty() {
                shadowed.push(ShadowedForbid {
                    policy: forbid.id.clone(),
                    actions,
                });
            }
        }
        shadowed
    }
}

/// Is `expr` (EST) `context.token.scopes`?
fn is_token_scopes(expr: &serde_json::Value) -> bool {
    let attr = |expr: &serde_json::Value, name: &str| -> Option<serde_json::Value> {
        let access = expr.get(".")?;
        (access.get("attr")?.as_str()? == name).then(|| access.get("left").cloned())?
    };
    attr(expr, "scopes")
        .and_then(|token| attr(&token, "token"))
        .is_some_and(|context| context.get("Var").and_then(|v| v.as_str()) == Some("context"))
}

/// The string literals of `expr` (EST): a string, or a set literal's strings.
fn string_literals(expr: &serde_json::Value, out: &mut Vec<String>) {
    if let Some(value) = expr.get("Value") {
        match value {
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Array(items) => {
                out.extend(items.iter().filter_map(|i| i.as_str().map(str::to_owned)))
            }
            _ => {}
        }
    } else if let Some(serde_json::Value::Array(items)) = expr.get("Set") {
        for item in items {
            if let Some(serde_json::Value::String(s)) = item.get("Value") {
                out.push(s.clone());
            }
        }
    }
}

/// Walks a policy's EST for scope tests (see [`PolicyStore::scopes_tested`]).
fn collect_scope_tests(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, inner) in map {
                if let ("contains" | "containsAll" | "containsAny", Some(left), Some(right)) =
                    (key.as_str(), inner.get("left"), inner.get("right"))
                {
                    if is_token_scopes(left) {
                        string_literals(right, out);
                    } else if key == "containsAny" && is_token_scopes(right) {
                        string_literals(left, out);
                    }
                }
                collect_scope_tests(inner, out);
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                collect_scope_tests(item, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_from_one() {
        let text = "ab\ncd\nef";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 4), (2, 2));
        assert_eq!(line_column(text, 6), (3, 1));
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    const SCHEMA: &str = r#"
entity Role;
entity User in [Role];
entity Application;
action "get /x" appliesTo { principal: [User], resource: [Application], context: {} };
"#;

    #[test]
    fn ids_come_from_annotation_or_file_and_index() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "s.cedarschema", SCHEMA);
        write(
            dir.path(),
            "a.cedar",
            "permit(principal, action, resource);\n@id(\"named\")\nforbid(principal, action, resource) when { false };\n",
        );
        let store = PolicyStore::load(dir.path()).unwrap();
        let mut ids: Vec<String> = store
            .policies
            .policies()
            .map(|p| p.id().to_string())
            .collect();
        ids.sort();
        assert_eq!(ids, vec!["a.cedar#0", "named"]);
    }

    #[test]
    fn errors_carry_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "s.cedarschema", SCHEMA);
        write(
            dir.path(),
            "bad.cedar",
            "permit(principal, action, resource);\n\npermit(principal, action == Action::\"nope\", resource);\n",
        );
        let err = PolicyStore::load(dir.path()).unwrap_err();
        let d = &err.diagnostics[0];
        assert!(d.file.ends_with("bad.cedar"), "{d}");
        assert_eq!(d.line, Some(3), "{d}");
        assert!(d.message.contains("nope"), "{d}");
    }

    #[test]
    fn syntax_errors_are_all_reported() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "s.cedarschema", SCHEMA);
        write(
            dir.path(),
            "a.cedar",
            "permit(principal, action resource);\n",
        );
        write(dir.path(), "b.cedar", "\nforbid(principal;\n");
        let err = PolicyStore::load(dir.path()).unwrap_err();
        let files: Vec<_> = err.diagnostics.iter().map(|d| d.file.clone()).collect();
        assert!(files.iter().any(|f| f.ends_with("a.cedar")), "{err}");
        assert!(files.iter().any(|f| f.ends_with("b.cedar")), "{err}");
        let b = err
            .diagnostics
            .iter()
            .find(|d| d.file.ends_with("b.cedar"))
            .unwrap();
        assert_eq!(b.line, Some(2), "{err}");
    }

    #[test]
    fn a_schema_is_required() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.cedar",
            "permit(principal, action, resource);\n",
        );
        let err = PolicyStore::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("cedarschema"), "{err}");
    }

    #[test]
    fn template_links_are_loaded_validated_and_indexed() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "s.cedarschema", SCHEMA);
        write(
            dir.path(),
            "t.cedar",
            "@id(\"per-user\")\npermit(principal == ?principal, action, resource);\n",
        );
        write(
            dir.path(),
            LINKS_FILE,
            r#"[{"id": "alice", "template": "per-user", "values": {"?principal": {"type": "User", "id": "alice"}}}]"#,
        );
        let store = PolicyStore::load(dir.path()).unwrap();
        assert!(store.policies.policy(&PolicyId::new("alice")).is_some());
        assert_eq!(store.index.len(), 1);

        // A link naming no template, a bad slot, or an entity type the schema
        // does not know is refused, naming the file.
        for bad in [
            r#"[{"id": "x", "template": "nope", "values": {"?principal": {"type": "User", "id": "a"}}}]"#,
            r#"[{"id": "x", "template": "per-user", "values": {"?owner": {"type": "User", "id": "a"}}}]"#,
            r#"[{"id": "x", "template": "per-user", "values": {"?principal": {"type": "Nope", "id": "a"}}}]"#,
            r#"{"id": "x"}"#,
        ] {
            write(dir.path(), LINKS_FILE, bad);
            let err = PolicyStore::load(dir.path()).unwrap_err();
            assert!(
                err.to_string().contains(LINKS_FILE) || err.to_string().contains("Nope"),
                "{bad}: {err}"
            );
        }
    }

    /// Whether the store's sliced evaluation lets `user` do `get /x`.
    fn allows(store: &PolicyStore, user: &str) -> bool {
        let principal = EntityUid::from_str(&format!("User::\"{user}\"")).unwrap();
        let action = EntityUid::from_str(r#"Action::"get /x""#).unwrap();
        let resource = EntityUid::from_str(r#"Application::"app""#).unwrap();
        let request = cedar_policy::Request::new(
            principal.clone(),
            action.clone(),
            resource.clone(),
            cedar_policy::Context::empty(),
            None,
        )
        .unwrap();
        let input = crate::authz::mapping::CedarInput {
            request,
            entities: store.entities.clone().into(),
            principal,
            action,
            resource,
        };
        crate::authz::evaluate(&cedar_policy::Authorizer::new(), store, &input).allowed
    }

    fn incremental_folder() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "s.cedarschema", SCHEMA);
        write(
            dir.path(),
            "a.cedar",
            "@id(\"users\")\npermit(principal is User, action, resource);\n",
        );
        write(
            dir.path(),
            "b.cedar",
            "@id(\"bob-out\")\nforbid(principal == User::\"bob\", action, resource);\n",
        );
        write(
            dir.path(),
            "c.cedar",
            "@id(\"per-user\")\npermit(principal == ?principal, action, resource);\n",
        );
        write(
            dir.path(),
            LINKS_FILE,
            r#"[{"id": "carol", "template": "per-user", "values": {"?principal": {"type": "User", "id": "carol"}}}]"#,
        );
        dir
    }

    #[test]
    fn a_reload_parses_only_the_changed_file_and_applies_it() {
        let dir = incremental_folder();
        let store = PolicyStore::load(dir.path()).unwrap();
        assert_eq!(store.files_parsed(), 3);
        assert!(allows(&store, "alice"));
        assert!(!allows(&store, "bob"));

        // Nothing changed: nothing is parsed, the same set is named.
        let same = store.reload(dir.path()).unwrap();
        assert_eq!(same.files_parsed(), 0);
        assert_eq!(same.digest, store.digest);
        assert_eq!(same.len(), store.len());

        // One file changed: only it is parsed again, and its new policy applies.
        write(
            dir.path(),
            "b.cedar",
            "@id(\"bob-out\")\nforbid(principal == User::\"bob\", action, resource);\n@id(\"alice-out\")\nforbid(principal == User::\"alice\", action, resource);\n",
        );
        let changed = store.reload(dir.path()).unwrap();
        assert_eq!(changed.files_parsed(), 1);
        assert_ne!(changed.digest, store.digest);
        assert_eq!(changed.len(), store.len() + 1);
        assert_eq!(changed.index.len(), store.index.len() + 1);
        assert!(!allows(&changed, "alice"));
        assert!(!allows(&changed, "bob"));
        assert!(allows(&changed, "dave"));
        assert_eq!(
            changed.policy_files.get(&PolicyId::new("alice-out")),
            Some(&dir.path().join("b.cedar"))
        );
        // The store reloaded from is left as it was.
        assert!(allows(&store, "alice"));

        // `load` reuses the files of a live store of the folder too.
        write(
            dir.path(),
            "a.cedar",
            "@id(\"users\")\npermit(principal is User, action, resource) when { principal != User::\"dave\" };\n",
        );
        let loaded = PolicyStore::load(dir.path()).unwrap();
        assert_eq!(loaded.files_parsed(), 1);
        assert!(!allows(&loaded, "dave"));
        assert!(!allows(&loaded, "alice"));
    }

    #[test]
    fn a_broken_file_is_refused_on_reload_and_the_previous_set_keeps_serving() {
        let dir = incremental_folder();
        let store = PolicyStore::load(dir.path()).unwrap();
        write(
            dir.path(),
            "b.cedar",
            "@id(\"bob-out\")\nforbid(principal == User::\"bob\", action, resource);\n\npermit(principal ==, action, resource);\n",
        );
        let err = store.reload(dir.path()).unwrap_err();
        assert!(
            err.diagnostics
                .iter()
                .any(|d| d.file == dir.path().join("b.cedar") && d.line == Some(4)),
            "{err}"
        );
        // A policy that fails strict validation is refused with its line too.
        write(
            dir.path(),
            "b.cedar",
            "@id(\"bob-out\")\nforbid(principal == User::\"bob\", action, resource)\nwhen { principal.nope };\n",
        );
        let err = store.reload(dir.path()).unwrap_err();
        assert!(
            err.diagnostics
                .iter()
                .any(|d| d.file == dir.path().join("b.cedar")
                    && d.line == Some(3)
                    && d.message.contains("bob-out")),
            "{err}"
        );
        // An id an unchanged file already has is refused: ids are checked
        // across the whole set, not only in the file that changed.
        write(
            dir.path(),
            "b.cedar",
            "@id(\"users\")\nforbid(principal == User::\"bob\", action, resource);\n",
        );
        let err = store.reload(dir.path()).unwrap_err();
        assert!(
            err.diagnostics
                .iter()
                .any(|d| d.file == dir.path().join("b.cedar") && d.message.contains("users")),
            "{err}"
        );
        // The previous set is untouched and a fixed file loads again.
        assert!(allows(&store, "alice"));
        assert!(!allows(&store, "bob"));
        write(
            dir.path(),
            "b.cedar",
            "@id(\"bob-out\")\nforbid(principal == User::\"bob\", action, resource);\n",
        );
        let fixed = store.reload(dir.path()).unwrap();
        assert_eq!(fixed.files_parsed(), 0);
        assert_eq!(fixed.digest, store.digest);
    }

    #[test]
    fn a_schema_change_parses_every_file_again() {
        let dir = incremental_folder();
        let store = PolicyStore::load(dir.path()).unwrap();
        write(
            dir.path(),
            "s.cedarschema",
            &format!("{SCHEMA}\nentity Extra;\n"),
        );
        let reloaded = store.reload(dir.path()).unwrap();
        assert_eq!(reloaded.files_parsed(), 3);
        // A schema that no longer declares what a kept file uses fails
        // validation of that unchanged file.
        write(
            dir.path(),
            "s.cedarschema",
            "entity User;\nentity Application;\naction \"get /x\" appliesTo { principal: [User], resource: [Application], context: {} };\n",
        );
        write(
            dir.path(),
            "a.cedar",
            "@id(\"users\")\npermit(principal in Role::\"admin\", action, resource);\n",
        );
        let err = reloaded.reload(dir.path()).unwrap_err();
        assert!(
            err.diagnostics
                .iter()
                .any(|d| d.file == dir.path().join("a.cedar")),
            "{err}"
        );
    }

    const LINT_SCHEMA: &str = r#"
entity Role;
entity User in [Role];
entity Client in [Role];
entity Application;
type Token = { scopes: Set<String> };
action reads;
action "get /a", "get /b" in [reads] appliesTo {
  principal: [User, Client], resource: [Application], context: { token: Token }
};
action "delete /a" appliesTo {
  principal: [User, Client], resource: [Application], context: { token: Token }
};
"#;

    fn lint_store(policies: &str) -> (tempfile::TempDir, PolicyStore) {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "s.cedarschema", LINT_SCHEMA);
        write(dir.path(), "p.cedar", policies);
        let store = PolicyStore::load(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn statement_lines_skip_comments_and_strings() {
        let text = "// a; comment\npermit(principal, action, resource)\n  when { \"x;y\" == \"x;y\" };\n\n@id(\"b\")\nforbid(principal, action, resource);\nforbid(principal, action, resource);";
        assert_eq!(statement_line(text, 0), Some(2));
        assert_eq!(statement_line(text, 1), Some(5));
        assert_eq!(statement_line(text, 2), Some(7));
        assert_eq!(statement_line(text, 3), None);
    }

    #[test]
    fn scope_tests_are_the_literals_compared_with_the_token_scopes() {
        let (_dir, store) = lint_store(
            r#"@id("one")
permit(principal, action == Action::"get /a", resource)
when { context.token.scopes.contains("a:read") || !context.token.scopes.containsAll(["a:x", "a:y"]) };
@id("any")
permit(principal, action == Action::"get /b", resource)
when { ["b:read", "b:all"].containsAny(context.token.scopes) && ["not-a-scope"].contains("not-a-scope") };
@id("none")
permit(principal, action == Action::"delete /a", resource)
when { context.token.scopes == ["exact"] };
"#,
        );
        let mut found: Vec<(String, String)> = store
            .scopes_tested()
            .into_iter()
            .map(|t| (t.policy.to_string(), t.scope))
            .collect();
        found.sort();
        let expected = [
            ("any", "b:all"),
            ("any", "b:read"),
            ("one", "a:read"),
            ("one", "a:x"),
            ("one", "a:y"),
        ];
        assert_eq!(
            found,
            expected.map(|(p, s)| (p.to_owned(), s.to_owned())).to_vec()
        );
    }

    fn shadowed(store: &PolicyStore) -> Vec<(String, Vec<String>)> {
        store
            .shadowed_forbids()
            .into_iter()
            .map(|f| {
                let actions = f
                    .actions
                    .iter()
                    .map(|(a, why)| format!("{why} {a}"))
                    .collect();
                (f.policy.to_string(), actions)
            })
            .collect()
    }

    #[test]
    fn a_forbid_on_actions_no_permit_names_is_shadowed() {
        let (_dir, store) = lint_store(
            r#"permit(principal, action == Action::"get /a", resource);
@id("on-delete")
forbid(principal, action == Action::"delete /a", resource);
@id("on-get")
forbid(principal, action in [Action::"get /a", Action::"delete /a"], resource);
@id("on-reads")
forbid(principal, action in Action::"reads", resource);
@id("everywhere")
forbid(principal, action, resource);
"#,
        );
        assert_eq!(
            shadowed(&store),
            vec![(
                "on-delete".to_owned(),
                vec![r#"no permit applies to action Action::"delete /a""#.to_owned()]
            )]
        );
    }

    #[test]
    fn group_permits_and_templates_count_and_disjoint_types_do_not() {
        let (_dir, store) = lint_store(
            r#"permit(principal, action in Action::"reads", resource);
permit(principal == ?principal, action == Action::"delete /a", resource);
@id("get-b")
forbid(principal, action == Action::"get /b", resource);
@id("delete-a")
forbid(principal is User, action == Action::"delete /a", resource);
"#,
        );
        assert!(shadowed(&store).is_empty(), "{:?}", shadowed(&store));

        let (_dir, store) = lint_store(
            r#"permit(principal is Client, action == Action::"delete /a", resource);
permit(principal in Role::"admin", action == Action::"get /a", resource);
@id("users-delete")
forbid(principal is User, action == Action::"delete /a", resource);
@id("users-get")
forbid(principal is User, action == Action::"get /a", resource);
"#,
        );
        assert_eq!(
            shadowed(&store),
            vec![(
                "users-delete".to_owned(),
                vec![
                    r#"no permit for principal type User applies to action Action::"delete /a""#
                        .to_owned()
                ]
            )]
        );
    }

    #[test]
    fn locations_name_the_annotation_or_the_statement() {
        let (dir, store) = lint_store(
            "permit(principal, action == Action::\"get /a\", resource);\n\n// why\n@id(\"late\")\nforbid(principal, action == Action::\"delete /a\", resource);\nforbid(principal, action == Action::\"delete /a\", resource);\n",
        );
        let file = dir.path().join("p.cedar").display().to_string();
        assert_eq!(store.location(&PolicyId::new("late")), format!("{file}:4"));
        assert_eq!(
            store.location(&PolicyId::new("p.cedar#2")),
            format!("{file}:6")
        );
        assert_eq!(
            store.location(&PolicyId::new("p.cedar#0")),
            format!("{file}:1")
        );
    }
}

/// Fuzz target of policy folders (see [`crate::fuzz`]): the shipped schema and
/// policies with a template, its links and static entities, as files mutated
/// together. Oracle: no panic, no hang; a folder that loads has at least one
/// schema and a digest, and names every policy's file.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::fuzz::{Target, bytes, run};

    /// Files are separated by lines `=== <name>` in one input.
    const SEPARATOR: &str = "\n=== ";

    #[test]
    fn fuzz_policy_folder() {
        let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
        let schema = std::fs::read_to_string(format!("{shipped}/orders.cedarschema")).unwrap();
        let policies = std::fs::read_to_string(format!("{shipped}/orders.cedar")).unwrap();
        let template = r#"@id("owner-access")
permit (principal == ?principal, action, resource == ?resource)
when { context has http };"#;
        let links = r#"[{ "id": "alice-orders", "template": "owner-access",
  "values": { "?principal": { "type": "User", "id": "alice" },
              "?resource": { "type": "Application", "id": "orders" } } }]"#;
        let entities = r#"[{"uid":{"type":"Role","id":"admin"},"attrs":{},"parents":[]}]"#;
        let folder = |files: &[(&str, &str)]| {
            files
                .iter()
                .map(|(name, text)| format!("{SEPARATOR}{name}\n{text}"))
                .collect::<String>()
        };
        let seeds = bytes([
            folder(&[("orders.cedarschema", &schema), ("orders.cedar", &policies)]),
            folder(&[
                ("orders.cedarschema", &schema),
                ("orders.cedar", &policies),
                ("owner.cedar", template),
                (LINKS_FILE, links),
                ("entities.json", entities),
            ]),
        ]);
        let dictionary = bytes([
            "permit",
            "forbid",
            "principal",
            "action",
            "resource",
            "when",
            "unless",
            "{",
            "}",
            "(",
            ")",
            ";",
            "==",
            " in ",
            "has",
            "like \"*\"",
            "@id(\"x\")",
            "?principal",
            "Action::\"get /orders\"",
            "context.token.scopes.contains(\"a\")",
            "entity User {};",
            "action \"x\" appliesTo { principal: [User], resource: [Application] };",
            SEPARATOR,
            "x.cedar\n",
            "\"__entity\"",
            "\"parents\":[{\"type\":\"Role\",\"id\":\"admin\"}]",
        ]);
        let root = tempfile::tempdir().unwrap();
        let full = root.path().join("full");
        std::fs::create_dir(&full).unwrap();
        for (name, text) in [
            ("orders.cedarschema", schema.as_str()),
            ("orders.cedar", policies.as_str()),
            ("owner.cedar", template),
            (LINKS_FILE, links),
            ("entities.json", entities),
        ] {
            std::fs::write(full.join(name), text).unwrap();
        }
        let loaded = PolicyStore::load(&full);
        assert!(loaded.is_ok(), "the full seed loads: {:?}", loaded.err());
        let mut round = 0u64;
        run(
            Target {
                name: "policy_folder",
                seeds,
                dictionary,
                cases: 600,
            },
            |input| {
                round += 1;
                let dir = root.path().join(round.to_string());
                std::fs::create_dir(&dir).unwrap();
                let text = String::from_utf8_lossy(input);
                for part in text.split(SEPARATOR).skip(1) {
                    let (name, body) = part.split_once('\n').unwrap_or((part, ""));
                    let name: String = name
                        .chars()
                        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
                        .collect();
                    if name.is_empty() || name.starts_with('.') {
                        continue;
                    }
                    std::fs::write(dir.join(name), body).unwrap();
                }
                if let Ok(store) = PolicyStore::load(&dir) {
                    assert!(!store.digest.is_empty());
                    assert!(
                        std::fs::read_dir(&dir)
                            .unwrap()
                            .flatten()
                            .any(|f| f.path().extension().is_some_and(|e| e == "cedarschema")),
                        "loaded without a schema"
                    );
                    for file in store.policy_files.values() {
                        assert!(file.starts_with(&dir));
                    }
                }
                let _ = std::fs::remove_dir_all(&dir);
            },
        );
    }
}
