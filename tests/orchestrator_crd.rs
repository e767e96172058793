//! The `McpServer` and `McpRegistryEntry` CRDs in deploy/ are generated from the Rust types
//! and must not drift.
//!
//! Regenerate after changing `src/orchestrator/spec.rs` or `src/registry/cluster.rs`:
//! `GATEHOUSE_UPDATE_CRD=1 cargo test --test orchestrator_crd`

use gatehouse::orchestrator::McpServer;
use gatehouse::registry::cluster::McpRegistryEntry;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

fn generated_from(crd: &CustomResourceDefinition, source: &str) -> String {
    let yaml = serde_saphyr::to_string(crd).expect("CRD serializes to YAML");
    format!(
        "# Generated from {source} by tests/orchestrator_crd.rs: do not edit.\n# Regenerate with: GATEHOUSE_UPDATE_CRD=1 cargo test --test orchestrator_crd\n{yaml}"
    )
}

fn generated() -> String {
    generated_from(&McpServer::crd(), "src/orchestrator/spec.rs")
}

fn matches_the_file(want: &str, file: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    if std::env::var_os("GATEHOUSE_UPDATE_CRD").is_some() {
        std::fs::write(&path, want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "{} is out of date: regenerate with GATEHOUSE_UPDATE_CRD=1 cargo test --test orchestrator_crd",
        path.display()
    );
}

#[test]
fn deploy_crd_matches_the_rust_types() {
    matches_the_file(&generated(), "deploy/base/crd-mcpserver.yaml");
    matches_the_file(
        &generated_from(&McpRegistryEntry::crd(), "src/registry/cluster.rs"),
        "deploy/base/crd-mcpregistryentry.yaml",
    );
}

#[test]
fn the_registry_crd_keeps_documents_whole_and_checks_the_rest() {
    let crd = McpRegistryEntry::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("mcpregistryentries.gatehouse.dev")
    );
    assert_eq!(crd.spec.scope, "Namespaced");
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
    let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
    // A server.json has its own schema, checked by the gateway one resource at a time: the
    // API server keeps it as text (no shape or depth of it can make a list unreadable).
    assert_eq!(spec["properties"]["document"]["type"], "string");
    assert!(!schema.to_string().contains("preserve-unknown-fields"));
    let status: Vec<_> = spec["properties"]["status"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(status, ["active", "deprecated", "deleted"]);
    let required: Vec<_> = spec["required"].as_array().unwrap().iter().collect();
    for field in ["name", "version", "document", "status", "publishedAt"] {
        assert!(required.iter().any(|r| *r == field), "{field} required");
    }
    assert!(
        spec["properties"].get("resourceVersion").is_none(),
        "the resourceVersion is the object's, not the spec's"
    );
    assert!(!schema.to_string().contains("\"$ref\""));
}

#[test]
fn crd_is_structural_and_namespaced() {
    let crd = McpServer::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("mcpservers.gatehouse.dev")
    );
    assert_eq!(crd.spec.scope, "Namespaced");
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    assert!(
        version.subresources.as_ref().unwrap().status.is_some(),
        "status subresource"
    );
    // Round-trips through YAML as a CustomResourceDefinition.
    let text = generated();
    let back: CustomResourceDefinition = serde_saphyr::from_str(&text).unwrap();
    assert_eq!(back.spec.names.kind, "McpServer");
    assert_eq!(back.spec.names.short_names, Some(vec!["mcps".to_string()]));
    let schema = serde_json::to_value(&version.schema).unwrap();
    let spec = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"];
    for field in [
        "image",
        "command",
        "args",
        "transport",
        "env",
        "resources",
        "labels",
    ] {
        assert!(spec.get(field).is_some(), "spec.{field} in the schema");
    }
    assert!(
        !schema.to_string().contains("\"$ref\""),
        "structural schemas have no $ref"
    );
}

#[test]
fn deploy_examples_are_valid_mcpservers() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let obj: McpServer =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let def = gatehouse::orchestrator::ServerDef {
            name: obj.metadata.name.clone().unwrap(),
            spec: obj.spec.clone(),
        };
        def.resolve_with(|_| Some("from-env".into()))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        seen += 1;
    }
    assert!(seen >= 2, "examples found: {seen}");
}
