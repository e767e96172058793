//! The `McpServer` CRD in deploy/ is generated from the Rust types and must not drift.
//!
//! Regenerate after changing `src/orchestrator/spec.rs`:
//! `GATEHOUSE_UPDATE_CRD=1 cargo test --test orchestrator_crd`

use gatehouse::orchestrator::McpServer;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

const HEADER: &str = "# Generated from src/orchestrator/spec.rs by tests/orchestrator_crd.rs: do not edit.\n# Regenerate with: GATEHOUSE_UPDATE_CRD=1 cargo test --test orchestrator_crd\n";

fn generated() -> String {
    let yaml = serde_saphyr::to_string(&McpServer::crd()).expect("CRD serializes to YAML");
    format!("{HEADER}{yaml}")
}

#[test]
fn deploy_crd_matches_the_rust_types() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/base/crd-mcpserver.yaml");
    let want = generated();
    if std::env::var_os("GATEHOUSE_UPDATE_CRD").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "{} is out of date: regenerate with GATEHOUSE_UPDATE_CRD=1 cargo test --test orchestrator_crd",
        path.display()
    );
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
