//! `portcullis routes from-openapi` on a large generated spec: the routes and
//! schema it writes validate, and a request through them is decided.

mod common;

use common::*;

/// An OpenAPI 3.1 document the size of a real API: 40 resources, collection and
/// item paths, nested sub-resources, five methods, parameters with dashes.
fn big_spec() -> (String, usize) {
    let mut paths = String::new();
    let mut operations = 0;
    for i in 0..40 {
        let r = format!("res{i}");
        paths.push_str(&format!(
            "  /{r}:\n    get: {{ operationId: list{i}, responses: {{ \"200\": {{ description: ok }} }} }}\n    post: {{ responses: {{ \"201\": {{ description: ok }} }} }}\n"
        ));
        paths.push_str(&format!(
            "  /{r}/{{{r}-id}}:\n    parameters: [{{ name: {r}-id, in: path, required: true, schema: {{ type: string }} }}]\n    get: {{ responses: {{ \"200\": {{ description: ok }} }} }}\n    put: {{ responses: {{ \"200\": {{ description: ok }} }} }}\n    patch: {{ responses: {{ \"200\": {{ description: ok }} }} }}\n    delete: {{ responses: {{ \"204\": {{ description: ok }} }} }}\n"
        ));
        paths.push_str(&format!(
            "  /{r}/{{{r}-id}}/items/{{itemId}}:\n    get: {{ responses: {{ \"200\": {{ description: ok }} }} }}\n"
        ));
        operations += 7;
    }
    (
        format!("openapi: 3.1.0\ninfo: {{ title: big, version: \"1\" }}\npaths:\n{paths}"),
        operations,
    )
}

#[test]
fn a_large_spec_imports_into_routes_and_a_schema_that_validate() {
    let fx = Fixture::new();
    let (spec, operations) = big_spec();
    std::fs::write(fx.path("openapi.yaml"), spec).unwrap();
    let policies = fx.path("api-policies");
    std::fs::create_dir(&policies).unwrap();
    let out = portcullis(&[
        "routes",
        "from-openapi",
        &path_arg(&fx.path("openapi.yaml")),
        "--routes-out",
        &path_arg(&fx.path("routes.toml")),
        "--schema-out",
        &path_arg(&policies.join("api.cedarschema")),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        policies.join("api.cedar"),
        "@id(\"api-scope\")\npermit (principal, action, resource) when { context.token.scopes.contains(\"api\") };\n\
         @id(\"items-owner\")\nforbid (principal, action == Action::\"get /res3/{res3-id}/items/{itemId}\", resource)\n\
         unless { context.path_params[\"res3-id\"] == principal.id || principal in Role::\"admin\" };\n"
            .replace("principal.id", "\"own\""),
    )
    .unwrap();

    // A configuration that uses only the generated routes.
    let quickstart = std::fs::read_to_string(fx.config_path()).unwrap();
    let head = quickstart
        .split("[[routes]]")
        .next()
        .unwrap()
        .replace("dir = \"policies\"", "dir = \"api-policies\"");
    let routes = std::fs::read_to_string(fx.path("routes.toml")).unwrap();
    std::fs::write(fx.path("api.toml"), format!("{head}\n{routes}")).unwrap();

    let out = portcullis(&["validate", "--config", &path_arg(&fx.path("api.toml"))]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("{operations} route(s) valid")),
        "{stdout}"
    );

    let token = fx.es256().token("alice", &["api"], &[]);
    let check = |method: &str, path: &str| {
        let out = portcullis(&[
            "check",
            "--config",
            &path_arg(&fx.path("api.toml")),
            "--token",
            &token,
            "--method",
            method,
            "--path",
            path,
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let patched = check("PATCH", "/res17/abc");
    assert!(patched.contains("decision:  allow"), "{patched}");
    assert!(
        patched.contains("Action::\"patch /res17/{res17-id}\""),
        "{patched}"
    );
    let nested = check("GET", "/res3/mine/items/9");
    assert!(
        nested.contains("decision:  deny") && nested.contains("items-owner"),
        "{nested}"
    );
    assert!(check("GET", "/res3/own/items/9").contains("decision:  allow"));
}
