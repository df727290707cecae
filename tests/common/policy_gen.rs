//! Generated policy folders for the slicing differential test and benchmark:
//! a schema with users in nested roles and teams, documents in nested folders,
//! action groups; random static policies over every kind of scope (`==`, `in`,
//! `is`, `is … in`, wildcards), `when` conditions that can fail at run time
//! (integer overflow, a missing attribute), and per-user template links.
//!
//! Shared by `tests/policy_slicing.rs` and `benches/decision.rs` through
//! `#[path]`, so it depends on nothing else in `tests/common`.
#![allow(dead_code)]

use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::str::FromStr;

use cedar_policy::{Context, Entities, Entity, EntityUid, Request, RestrictedExpression};
use portcullis::authz::mapping::CedarInput;
use portcullis::authz::policy_store::PolicyStore;

/// A small deterministic generator (xorshift), so a failure can be replayed.
pub struct Rng(pub u64);

impl Rng {
    /// The next pseudo-random number.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The population a folder is generated over.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Users (each may get a template link and is described in entities.json).
    pub users: u64,
    /// Roles, nested in a chain of depth up to 3.
    pub roles: u64,
    /// Teams.
    pub teams: u64,
    /// Folders, nested.
    pub folders: u64,
    /// Documents, each in a folder.
    pub docs: u64,
}

const SCHEMA: &str = r#"
entity Role in [Role];
entity Team;
entity User in [Role, Team] { level: Long };
entity Folder in [Folder];
entity Doc in [Folder] { classification: Long };
entity Application;

action all;
action read, list in [all] appliesTo {
  principal: [User], resource: [Doc, Folder, Application], context: { n: Long }
};
action write, delete in [all] appliesTo {
  principal: [User], resource: [Doc, Folder, Application], context: { n: Long }
};
"#;

const ACTIONS: [&str; 4] = ["read", "list", "write", "delete"];

fn user(i: u64) -> String {
    format!(r#"User::"u{i}""#)
}

fn principal_scope(rng: &mut Rng, shape: Shape) -> String {
    match rng.below(10) {
        0 if rng.chance(30) => "principal".into(),
        0..=4 => format!("principal == {}", user(rng.below(shape.users))),
        5 | 6 => format!(r#"principal in Role::"r{}""#, rng.below(shape.roles)),
        7 => format!(r#"principal in Team::"t{}""#, rng.below(shape.teams)),
        8 => "principal is User".into(),
        _ => format!(
            r#"principal is User in Team::"t{}""#,
            rng.below(shape.teams)
        ),
    }
}

fn user_scope(rng: &mut Rng, shape: Shape) -> String {
    format!("principal == {}", user(rng.below(shape.users)))
}

fn doc_scope(rng: &mut Rng, shape: Shape) -> String {
    format!(r#"resource == Doc::"d{}""#, rng.below(shape.docs))
}

fn action_scope(rng: &mut Rng) -> String {
    match rng.below(5) {
        0 => "action".into(),
        1 | 2 => format!(r#"action == Action::"{}""#, ACTIONS[rng.below(4) as usize]),
        3 => format!(
            r#"action in [Action::"{}", Action::"{}"]"#,
            ACTIONS[rng.below(4) as usize],
            ACTIONS[rng.below(4) as usize]
        ),
        _ => r#"action in Action::"all""#.into(),
    }
}

fn resource_scope(rng: &mut Rng, shape: Shape) -> String {
    match rng.below(8) {
        0 => "resource".into(),
        1 => format!(r#"resource in Folder::"f{}""#, rng.below(shape.folders)),
        2 | 3 => format!(r#"resource == Doc::"d{}""#, rng.below(shape.docs)),
        4 => format!(r#"resource in Folder::"f{}""#, rng.below(shape.folders)),
        5 => "resource is Doc".into(),
        6 => format!(
            r#"resource is Doc in Folder::"f{}""#,
            rng.below(shape.folders)
        ),
        _ => r#"resource == Application::"app""#.into(),
    }
}

/// A `when`/`unless` clause. Clauses that can fail at run time (reading a
/// user's `level`, which token-only users lack, or overflowing) go only on
/// policies naming one user, so errors stay rare enough to leave allows.
fn condition(rng: &mut Rng, names_one_user: bool) -> String {
    match rng.below(10) {
        0..=4 => String::new(),
        5 | 6 => format!(" when {{ context.n > {} }}", rng.below(10)),
        7 if names_one_user => format!(" when {{ principal.level >= {} }}", rng.below(5)),
        // Overflows (an evaluation error) for levels of 2 and more.
        8 if names_one_user => " when { principal.level * 4611686018427387904 > 0 }".into(),
        7 | 8 => format!(" unless {{ context.n == {} }}", rng.below(10)),
        _ => " unless { resource is Doc && resource.classification > 2 }".into(),
    }
}

/// Writes a policy folder with about `policies` policies (static ones and
/// per-user template links, in about equal numbers) to `dir`.
pub fn write_folder(dir: &Path, policies: u64, seed: u64) -> Shape {
    let users = (policies / 2).max(4);
    let shape = Shape {
        users,
        roles: (policies / 50).clamp(3, 200),
        teams: (policies / 100).clamp(2, 100),
        folders: (policies / 20).clamp(3, 500),
        docs: (policies / 5).clamp(5, 5000),
    };
    let mut rng = Rng(seed | 1);
    let mut text = String::new();
    // Two templates: per-user access and per-user lock-out.
    text.push_str("@id(\"user-folder\")\npermit(principal == ?principal, action in [Action::\"read\", Action::\"list\"], resource in ?resource);\n");
    text.push_str("@id(\"user-lockout\")\nforbid(principal == ?principal, action, resource) when { context.n > 7 };\n");
    let statics = policies - policies / 2;
    // Real sets grow by per-user and per-document policies; the broad ones
    // (roles, teams, `is User`, wildcards) stay a few hundred at most.
    let broad = (statics / 3).min(300);
    for i in 0..statics {
        let (principal, resource) = if i < broad {
            (
                principal_scope(&mut rng, shape),
                resource_scope(&mut rng, shape),
            )
        } else if rng.chance(75) {
            (user_scope(&mut rng, shape), resource_scope(&mut rng, shape))
        } else {
            ("principal".to_owned(), doc_scope(&mut rng, shape))
        };
        let names_one_user = principal.starts_with("principal ==");
        // Forbids are narrow (one user or one document), as in real sets; a
        // broad one would deny nearly everything in a large set.
        let narrow = names_one_user || resource.starts_with("resource == Doc");
        let effect = if narrow && rng.chance(35) {
            "forbid"
        } else {
            "permit"
        };
        // Broad grants carry a threshold on the context, so a request with a
        // low `n` meets only the narrow ones and can be denied for want of a
        // permit even in a large set.
        let threshold = if names_one_user {
            String::new()
        } else {
            format!(" when {{ context.n > {} }}", rng.below(9))
        };
        text.push_str(&format!(
            "@id(\"p{i}\")\n{effect}({principal}, {}, {resource}){threshold}{};\n",
            action_scope(&mut rng),
            condition(&mut rng, names_one_user),
        ));
    }
    std::fs::write(dir.join("policies.cedar"), text).unwrap();
    std::fs::write(dir.join("schema.cedarschema"), SCHEMA).unwrap();

    let links: Vec<serde_json::Value> = (0..policies / 2)
        .map(|i| {
            let u = rng.below(users);
            if rng.chance(85) {
                serde_json::json!({
                    "id": format!("link{i}"),
                    "template": "user-folder",
                    "values": {
                        "?principal": {"type": "User", "id": format!("u{u}")},
                        "?resource": {"type": "Folder", "id": format!("f{}", rng.below(shape.folders))},
                    }
                })
            } else {
                serde_json::json!({
                    "id": format!("link{i}"),
                    "template": "user-lockout",
                    "values": {"?principal": {"type": "User", "id": format!("u{u}")}}
                })
            }
        })
        .collect();
    std::fs::write(
        dir.join("links.json"),
        serde_json::to_string(&links).unwrap(),
    )
    .unwrap();

    let mut entities = Vec::new();
    for r in 0..shape.roles {
        // Roles nest in chains: r5 in r2 in r0 ...
        let parents: Vec<_> = (r > 0 && r % 3 != 0)
            .then(|| serde_json::json!({"type": "Role", "id": format!("r{}", r / 2)}))
            .into_iter()
            .collect();
        entities.push(serde_json::json!({"uid": {"type": "Role", "id": format!("r{r}")}, "attrs": {}, "parents": parents}));
    }
    for t in 0..shape.teams {
        entities.push(serde_json::json!({"uid": {"type": "Team", "id": format!("t{t}")}, "attrs": {}, "parents": []}));
    }
    // Three users in four are described in entities.json; the others exist only
    // through the request (as a token's subject does) and have no `level`.
    for u in (0..users).filter(|u| u % 4 != 3) {
        entities.push(serde_json::json!({
            "uid": {"type": "User", "id": format!("u{u}")},
            "attrs": {"level": rng.below(4)},
            "parents": [
                {"type": "Role", "id": format!("r{}", rng.below(shape.roles))},
                {"type": "Team", "id": format!("t{}", rng.below(shape.teams))},
            ],
        }));
    }
    for f in 0..shape.folders {
        let parents: Vec<_> = (f > 0)
            .then(|| serde_json::json!({"type": "Folder", "id": format!("f{}", f / 3)}))
            .into_iter()
            .collect();
        entities.push(serde_json::json!({"uid": {"type": "Folder", "id": format!("f{f}")}, "attrs": {}, "parents": parents}));
    }
    for d in 0..shape.docs {
        entities.push(serde_json::json!({
            "uid": {"type": "Doc", "id": format!("d{d}")},
            "attrs": {"classification": rng.below(4)},
            "parents": [{"type": "Folder", "id": format!("f{}", rng.below(shape.folders))}],
        }));
    }
    entities.push(serde_json::json!({"uid": {"type": "Application", "id": "app"}, "attrs": {}, "parents": []}));
    std::fs::write(
        dir.join("entities.json"),
        serde_json::to_string(&entities).unwrap(),
    )
    .unwrap();
    shape
}

/// A random request over `shape`, with the store's entities plus the request's
/// principal when entities.json does not describe it (given random roles, as a
/// token's roles claim would).
pub fn random_input(rng: &mut Rng, store: &PolicyStore, shape: Shape) -> CedarInput {
    let principal = EntityUid::from_str(&user(rng.below(shape.users))).unwrap();
    let action =
        EntityUid::from_str(&format!(r#"Action::"{}""#, ACTIONS[rng.below(4) as usize])).unwrap();
    let resource = match rng.below(10) {
        0..=5 => format!(r#"Doc::"d{}""#, rng.below(shape.docs)),
        6..=8 => format!(r#"Folder::"f{}""#, rng.below(shape.folders)),
        _ => r#"Application::"app""#.into(),
    };
    let resource = EntityUid::from_str(&resource).unwrap();
    // The request's entities: the principal, the resource, their ancestors
    // and the actions (all that the generated policies can read), taken from
    // the store rather than a copy of the whole store per request, so that
    // 100,000-policy benchmarks measure evaluation, not copying.
    let mut uids: Vec<EntityUid> = vec![resource.clone()];
    for uid in [&resource, &principal] {
        if let Some(ancestors) = store.entities.ancestors(uid) {
            uids.extend(ancestors.cloned());
        }
    }
    let mut subset: Vec<Entity> = Vec::new();
    match store.entities.get(&principal) {
        Some(known) => subset.push(known.clone()),
        None => {
            let roles: HashSet<EntityUid> = (0..rng.below(3))
                .map(|_| {
                    EntityUid::from_str(&format!(r#"Role::"r{}""#, rng.below(shape.roles))).unwrap()
                })
                .collect();
            for role in &roles {
                uids.push(role.clone());
                uids.extend(
                    store
                        .entities
                        .ancestors(role)
                        .into_iter()
                        .flatten()
                        .cloned(),
                );
            }
            subset.push(Entity::new_no_attrs(principal.clone(), roles));
        }
    }
    for name in ACTIONS.iter().chain(["all"].iter()) {
        uids.push(EntityUid::from_str(&format!(r#"Action::"{name}""#)).unwrap());
    }
    uids.sort_by_key(|u| u.to_string());
    uids.dedup();
    subset.extend(
        uids.iter()
            .filter_map(|uid| store.entities.get(uid).cloned()),
    );
    let entities = Entities::from_entities(subset, None).unwrap();
    let context = Context::from_pairs([(
        "n".to_owned(),
        RestrictedExpression::new_long(rng.below(10) as i64),
    )])
    .unwrap();
    let request = Request::new(
        principal.clone(),
        action.clone(),
        resource.clone(),
        context,
        None,
    )
    .unwrap();
    CedarInput {
        request,
        entities: entities.into(),
        principal,
        action,
        resource,
    }
}

/// Writes into `dir` the quickstart's policy files plus a template granting
/// its user read access to orders, linked once per id of `users` (the large
/// policy set of `benches/decision.rs` and `benches/load.rs`). Returns how many
/// links were written.
pub fn quickstart_with_user_links(dir: &Path, users: impl Iterator<Item = String>) -> usize {
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart/policies");
    fs::create_dir_all(dir).unwrap();
    for entry in fs::read_dir(&quickstart).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    fs::write(
        dir.join("per-user.cedar"),
        "@id(\"per-user-read\")\npermit(principal == ?principal, action in [Action::\"get /orders\", Action::\"get /orders/{id}\"], resource == Application::\"orders\")\nwhen { context.token.scopes.contains(\"orders:read\") };\n",
    )
    .unwrap();
    let links: Vec<serde_json::Value> = users
        .map(|user| {
            serde_json::json!({"id": format!("read-{user}"), "template": "per-user-read",
                   "values": {"?principal": {"type": "User", "id": user}}})
        })
        .collect();
    fs::write(
        dir.join("links.json"),
        serde_json::to_string(&links).unwrap(),
    )
    .unwrap();
    links.len()
}

/// Writes the folder of [`write_folder`] with its static policies spread over
/// `files` policy files (`policies-000.cedar`, ...; the two templates stay in
/// the first), as a team's set is kept: one file per service or owner. Returns
/// the shape and the names of the policy files.
pub fn write_folder_split(
    dir: &Path,
    policies: u64,
    seed: u64,
    files: usize,
) -> (Shape, Vec<String>) {
    let shape = write_folder(dir, policies, seed);
    let text = fs::read_to_string(dir.join("policies.cedar")).unwrap();
    fs::remove_file(dir.join("policies.cedar")).unwrap();
    // Every generated statement is two lines: its `@id` and its body.
    let lines: Vec<&str> = text.lines().collect();
    let statements: Vec<String> = lines.chunks(2).map(|s| s.join("\n") + "\n").collect();
    let files = files.max(1);
    let per_file = statements.len().div_ceil(files);
    let mut names = Vec::new();
    for (n, chunk) in statements.chunks(per_file.max(1)).enumerate() {
        let name = format!("policies-{n:03}.cedar");
        fs::write(dir.join(&name), chunk.concat()).unwrap();
        names.push(name);
    }
    (shape, names)
}
