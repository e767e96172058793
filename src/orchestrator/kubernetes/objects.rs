//! Pure rendering of a server's Kubernetes objects: Deployment, Secret, Service.
//!
//! Nothing here talks to the API; [`render`] is tested on its own, and the reconcile
//! loop applies what it returns with server-side apply.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, KeyToPath,
    PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile, Secret,
    SecretKeySelector, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::policy::PodPolicy;
use crate::orchestrator::spec::{
    EnvValue, ResolvedServer, SECRET_FILES_DIR, STORED_SECRET_FILES_DIR, SpecError, labels,
    values_secret_name,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;

/// Name of the server's container in its pod.
pub const CONTAINER: &str = "server";
/// Annotation on objects naming the server they belong to (survives label edits).
pub const SERVER_ANNOTATION: &str = "gatehouse.dev/server";
/// The user id a pod runs as when the image does not say (any non-root id).
pub const DEFAULT_UID: i64 = 65532;

/// The objects of one server.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// One replica running the server.
    pub deployment: Deployment,
    /// Secret values, when the server has any.
    pub secret: Option<Secret>,
    /// For streamable-http servers.
    pub service: Option<Service>,
    /// The server's egress policy, when it has one (its own or the operator's default).
    pub network_policy: Option<NetworkPolicy>,
    /// Its host rules, where the cluster runs Cilium.
    pub cilium_policy: Option<super::cilium::CiliumNetworkPolicy>,
}

/// Labels on every object of `server` (the selector labels plus the user's).
pub fn object_labels(server: &ResolvedServer) -> BTreeMap<String, String> {
    let mut l = server.spec.labels.clone();
    l.extend(selector_labels(&server.name));
    l.insert(labels::NAME.into(), "mcp-server".into());
    l.insert(labels::MANAGED_BY.into(), labels::MANAGER.into());
    l
}

/// Labels that select the server's pods.
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::SERVER.to_string(), name.to_string()),
        (labels::INSTANCE.to_string(), name.to_string()),
    ])
}

/// Label selector string for the server's pods.
pub fn pod_selector(name: &str) -> String {
    format!("{}={name}", labels::SERVER)
}

fn meta(server: &ResolvedServer, namespace: &str, owner: Option<&OwnerReference>) -> ObjectMeta {
    ObjectMeta {
        name: Some(server.object_name()),
        namespace: Some(namespace.to_string()),
        labels: Some(object_labels(server)),
        annotations: Some(BTreeMap::from([(
            SERVER_ANNOTATION.to_string(),
            server.name.clone(),
        )])),
        owner_references: owner.map(|o| vec![o.clone()]),
        ..ObjectMeta::default()
    }
}

fn quantities(map: &BTreeMap<String, String>) -> Option<BTreeMap<String, Quantity>> {
    (!map.is_empty()).then(|| {
        map.iter()
            .map(|(k, v)| (k.clone(), Quantity(v.clone())))
            .collect()
    })
}

/// Renders the server's objects. `owner` is the `McpServer` resource (for every object)
/// or, for servers from the config file, the Deployment (for the Secret and Service only).
///
/// The pod's security context, volumes and host settings are fixed here: no definition
/// field reaches them. The service account and token come from `policy`, which refuses a
/// definition asking for more than the operator allows.
pub fn render(
    server: &ResolvedServer,
    namespace: &str,
    owner: Option<&OwnerReference>,
    deployment_owner: Option<&OwnerReference>,
    policy: &PodPolicy,
) -> Result<Rendered, SpecError> {
    let name = server.object_name();
    let spec = &server.spec;
    let account = policy.admit(server)?;
    let (requests, limits) = policy.resources(server);
    let stored = values_secret_name(&server.name);
    let secret_ref = |secret: &str, key: &str| EnvVarSource {
        secret_key_ref: Some(SecretKeySelector {
            name: secret.to_owned(),
            key: key.to_owned(),
            optional: Some(false),
        }),
        ..EnvVarSource::default()
    };
    let env: Vec<EnvVar> = server
        .env
        .iter()
        .map(|(k, v)| match v {
            EnvValue::Plain(value) => EnvVar {
                name: k.clone(),
                value: Some(value.clone()),
                value_from: None,
            },
            EnvValue::Secret(_) => EnvVar {
                name: k.clone(),
                value: None,
                value_from: Some(secret_ref(&name, k)),
            },
            EnvValue::SecretFile(_) => EnvVar {
                name: k.clone(),
                value: Some(format!("{SECRET_FILES_DIR}/{k}")),
                value_from: None,
            },
            EnvValue::Stored { file: false } => EnvVar {
                name: k.clone(),
                value: None,
                value_from: Some(secret_ref(&stored, k)),
            },
            EnvValue::Stored { file: true } => EnvVar {
                name: k.clone(),
                value: Some(format!("{STORED_SECRET_FILES_DIR}/{k}")),
                value_from: None,
            },
        })
        .collect();
    let mut mounts = vec![VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..VolumeMount::default()
    }];
    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: None,
            size_limit: Some(Quantity(policy.tmp_size_limit.clone())),
        }),
        ..Volume::default()
    }];
    // Secrets delivered as files: those keys of the server's Secret (and of its values
    // Secret), mounted read-only, readable by the pod's group only.
    fn secret_file(v: &EnvValue) -> bool {
        matches!(v, EnvValue::SecretFile(_))
    }
    fn stored_file(v: &EnvValue) -> bool {
        matches!(v, EnvValue::Stored { file: true })
    }
    /// A volume of secret files: its name, where it is mounted, its Secret, which variables.
    type Files<'a> = (&'a str, &'a str, &'a String, fn(&EnvValue) -> bool);
    let files: [Files<'_>; 2] = [
        ("secret-files", SECRET_FILES_DIR, &name, secret_file),
        (
            "stored-secret-files",
            STORED_SECRET_FILES_DIR,
            &stored,
            stored_file,
        ),
    ];
    for (volume, dir, secret, is_file) in files {
        let items: Vec<KeyToPath> = server
            .env
            .iter()
            .filter(|(_, v)| is_file(v))
            .map(|(k, _)| KeyToPath {
                key: k.clone(),
                path: k.clone(),
                mode: None,
            })
            .collect();
        if items.is_empty() {
            continue;
        }
        mounts.push(VolumeMount {
            name: volume.into(),
            mount_path: dir.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: volume.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                items: Some(items),
                default_mode: Some(0o440),
                optional: Some(false),
            }),
            ..Volume::default()
        });
    }
    let http = server.http_port_path();
    let container = Container {
        name: CONTAINER.into(),
        image: spec.image.clone(),
        image_pull_policy: Some("IfNotPresent".into()),
        command: spec.command.as_ref().map(|c| vec![c.clone()]),
        args: (!spec.args.is_empty()).then(|| spec.args.clone()),
        env: (!env.is_empty()).then_some(env),
        ports: http.map(|(port, _)| {
            vec![ContainerPort {
                name: Some("mcp".into()),
                container_port: i32::from(port),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            }]
        }),
        readiness_probe: http.map(|_| k8s_openapi::api::core::v1::Probe {
            tcp_socket: Some(k8s_openapi::api::core::v1::TCPSocketAction {
                port: IntOrString::String("mcp".into()),
                host: None,
            }),
            period_seconds: Some(5),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: quantities(&requests),
            limits: quantities(&limits),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }),
        // stdio servers: the gateway attaches to the container's stdin/stdout.
        stdin: server.is_stdio().then_some(true),
        stdin_once: server.is_stdio().then_some(false),
        tty: Some(false),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let pod_spec = PodSpec {
        containers: vec![container],
        automount_service_account_token: Some(spec.automount_service_account_token),
        service_account_name: Some(account),
        host_network: Some(false),
        host_pid: Some(false),
        host_ipc: Some(false),
        enable_service_links: Some(false),
        restart_policy: Some("Always".into()),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(DEFAULT_UID),
            run_as_group: Some(DEFAULT_UID),
            fs_group: Some(DEFAULT_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..PodSecurityContext::default()
        }),
        volumes: Some(volumes),
        ..PodSpec::default()
    };
    let mut template_labels = object_labels(server);
    template_labels.extend(selector_labels(&server.name));
    let deployment = Deployment {
        metadata: meta(server, namespace, owner),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&server.name)),
                match_expressions: None,
            },
            // One pod at a time: a stdio server's state lives in its single process.
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                rolling_update: None,
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(template_labels),
                    annotations: Some(BTreeMap::from([(
                        SERVER_ANNOTATION.to_string(),
                        server.name.clone(),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    };
    let child_owner = owner.or(deployment_owner);
    let secret_data = server.secret_data();
    let secret = (!secret_data.is_empty()).then(|| Secret {
        metadata: meta(server, namespace, child_owner),
        type_: Some("Opaque".into()),
        data: Some(
            secret_data
                .into_iter()
                .map(|(k, v)| (k, ByteString(v.into_bytes())))
                .collect(),
        ),
        immutable: Some(false),
        ..Secret::default()
    });
    let service = http.map(|(port, _)| Service {
        metadata: meta(server, namespace, child_owner),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(&server.name)),
            ports: Some(vec![ServicePort {
                name: Some("mcp".into()),
                port: i32::from(port),
                target_port: Some(IntOrString::String("mcp".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    });
    let egress = policy.egress(server);
    let network_policy = egress.as_ref().map(|egress| {
        super::network_policy::render(
            selector_labels(&server.name),
            egress,
            meta(server, namespace, child_owner),
            policy,
        )
    });
    let cilium_policy = egress
        .as_ref()
        .filter(|_| policy.cilium)
        .and_then(|egress| {
            super::cilium::render(
                selector_labels(&server.name),
                egress,
                meta(server, namespace, child_owner),
                &policy.egress_except,
            )
        });
    Ok(Rendered {
        deployment,
        secret,
        service,
        network_policy,
        cilium_policy,
    })
}

/// URL of a streamable-http server behind its Service.
pub fn service_url(server: &ResolvedServer, namespace: &str) -> Option<String> {
    server.http_port_path().map(|(port, path)| {
        format!(
            "http://{}.{namespace}.svc:{port}{path}",
            server.object_name()
        )
    })
}

/// Controller owner reference to an object.
///
/// `blockOwnerDeletion` stays unset: setting it needs `update` on the owner's
/// `finalizers` subresource where the OwnerReferencesPermissionEnforcement admission
/// plugin runs, and background deletion does not need it.
pub fn owner_ref(api_version: &str, kind: &str, name: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: api_version.into(),
        kind: kind.into(),
        name: name.into(),
        uid: uid.into(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

/// Whether every field set in `desired` has the same value in `observed`.
///
/// Objects may carry more fields than we set (defaults, status, metadata the API
/// server adds); lists must have the same length, element by element.
pub fn is_subset(desired: &serde_json::Value, observed: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (desired, observed) {
        (Value::Object(d), Value::Object(o)) => d.iter().all(|(k, dv)| match o.get(k) {
            Some(ov) => is_subset(dv, ov),
            None => dv.is_null() || dv.as_object().is_some_and(|m| m.is_empty()),
        }),
        (Value::Array(d), Value::Array(o)) => {
            d.len() == o.len() && d.iter().zip(o).all(|(dv, ov)| is_subset(dv, ov))
        }
        (Value::Null, _) => true,
        (d, o) => d == o,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orchestrator::spec::ServerDef;

    fn server(yaml: &str) -> ResolvedServer {
        serde_saphyr::from_str::<ServerDef>(yaml)
            .unwrap()
            .resolve_with(|_| Some("s3cret".into()))
            .unwrap()
    }

    #[test]
    fn secrets_as_files_are_mounted_read_only_and_the_variable_names_the_path() {
        let s = server(
            "name: gh\nimage: ghcr.io/x/gh:1\nenv: [{name: TOKEN_FILE, secretFromEnv: T, asFile: true}, {name: B, secretFromEnv: T}]",
        );
        let r = render(&s, "ns", None, None, &PodPolicy::default()).unwrap();
        let pod = serde_json::to_value(&r.deployment).unwrap()["spec"]["template"]["spec"].take();
        let c = &pod["containers"][0];
        assert_eq!(
            c["env"][0],
            serde_json::json!({"name": "TOKEN_FILE", "value": "/var/run/gatehouse/secrets/TOKEN_FILE"})
        );
        assert_eq!(c["env"][1]["valueFrom"]["secretKeyRef"]["key"], "B");
        assert_eq!(
            c["volumeMounts"][1],
            serde_json::json!({"name": "secret-files", "mountPath": "/var/run/gatehouse/secrets", "readOnly": true})
        );
        assert_eq!(
            pod["volumes"][1],
            serde_json::json!({"name": "secret-files", "secret": {"secretName": "mcp-gh",
                "items": [{"key": "TOKEN_FILE", "path": "TOKEN_FILE"}], "defaultMode": 0o440, "optional": false}})
        );
        assert_eq!(r.secret.unwrap().data.unwrap()["TOKEN_FILE"].0, b"s3cret");
        assert!(
            !serde_json::to_string(&r.deployment)
                .unwrap()
                .contains("s3cret")
        );
    }

    #[test]
    fn stored_secrets_are_read_from_the_values_secret_as_variables_or_files() {
        let s = server(
            "name: gh\nimage: ghcr.io/x/gh:1\nenv: [{name: KEY, storedSecret: true}, {name: CERT, storedSecret: true, asFile: true}]",
        );
        let r = render(&s, "ns", None, None, &PodPolicy::default()).unwrap();
        let pod = serde_json::to_value(&r.deployment).unwrap()["spec"]["template"]["spec"].take();
        let c = &pod["containers"][0];
        assert_eq!(
            c["env"][0]["valueFrom"]["secretKeyRef"],
            serde_json::json!({"name": "mcp-gh.values", "key": "KEY", "optional": false})
        );
        assert_eq!(
            c["env"][1],
            serde_json::json!({"name": "CERT", "value": "/var/run/gatehouse/stored-secrets/CERT"})
        );
        assert_eq!(
            c["volumeMounts"][1],
            serde_json::json!({"name": "stored-secret-files", "mountPath": "/var/run/gatehouse/stored-secrets", "readOnly": true})
        );
        assert_eq!(
            pod["volumes"][1]["secret"],
            serde_json::json!({"secretName": "mcp-gh.values",
                "items": [{"key": "CERT", "path": "CERT"}], "defaultMode": 0o440, "optional": false})
        );
        // The gateway holds no value of them: the server's own Secret has none.
        assert!(r.secret.is_none());
    }

    #[test]
    fn stdio_pod_is_hardened_and_references_secrets() {
        let s = server(
            "name: gh\nimage: ghcr.io/x/gh:1\nargs: [--stdio]\nenv: [{name: A, value: b}, {name: TOKEN, secretFromEnv: T}]\nlabels: {team: x}",
        );
        let r = render(&s, "ns", None, None, &PodPolicy::default()).unwrap();
        let pod = r
            .deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop,
            Some(vec!["ALL".to_string()])
        );
        assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(
            (c.stdin, c.stdin_once, c.tty),
            (Some(true), Some(false), Some(false))
        );
        let json = serde_json::to_string(&r.deployment).unwrap();
        assert!(!json.contains("s3cret"), "secret values never inlined");
        let token = &c.env.as_ref().unwrap()[1];
        let key = token
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!((key.name.as_str(), key.key.as_str()), ("mcp-gh", "TOKEN"));
        let secret = r.secret.unwrap();
        assert_eq!(secret.data.unwrap()["TOKEN"].0, b"s3cret");
        assert!(r.service.is_none());
        assert_eq!(r.deployment.metadata.labels.as_ref().unwrap()["team"], "x");
    }

    #[test]
    fn pod_security_resources_and_account_are_fixed_by_the_operator() {
        let s = server("name: gh\nimage: x\nserviceAccountName: ci-bot");
        assert_eq!(
            render(&s, "ns", None, None, &PodPolicy::default())
                .unwrap_err()
                .field,
            "serviceAccountName"
        );
        let policy = PodPolicy {
            allowed_accounts: ["ci-bot".to_string()].into(),
            ..PodPolicy::default()
        };
        let r = render(&s, "ns", None, None, &policy).unwrap();
        let pod = serde_json::to_value(r.deployment.spec.unwrap().template.spec.unwrap()).unwrap();
        let expected = serde_json::json!({
            "automountServiceAccountToken": false,
            "serviceAccountName": "ci-bot",
            "hostNetwork": false, "hostPID": false, "hostIPC": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": DEFAULT_UID},
            "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
            "containers": [{
                "resources": {"requests": {"cpu": "50m", "memory": "64Mi"},
                              "limits": {"cpu": "1", "memory": "512Mi"}},
                "securityContext": {"privileged": false, "allowPrivilegeEscalation": false,
                                    "runAsNonRoot": true, "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            }],
        });
        assert!(is_subset(&expected, &pod), "{pod:#}");
        assert!(pod["containers"][0]["securityContext"]["capabilities"]["add"].is_null());
        assert!(pod.get("hostPath").is_none() && pod["volumes"].as_array().unwrap().len() == 1);
    }

    #[test]
    fn http_server_gets_a_service() {
        let s =
            server("name: web\nimage: x\ntransport: {type: streamable-http, port: 8080, path: /m}");
        let owner = owner_ref("apps/v1", "Deployment", "mcp-web", "uid-1");
        let r = render(&s, "ns", None, Some(&owner), &PodPolicy::default()).unwrap();
        let svc = r.service.unwrap();
        assert_eq!(svc.metadata.owner_references.unwrap()[0].uid, "uid-1");
        assert!(r.deployment.metadata.owner_references.is_none());
        assert_eq!(
            service_url(&s, "ns").unwrap(),
            "http://mcp-web.ns.svc:8080/m"
        );
        let c = &r.deployment.spec.unwrap().template.spec.unwrap().containers[0];
        assert_eq!(c.stdin, None);
    }

    #[test]
    fn subset_ignores_extra_fields_but_not_changes() {
        let d = serde_json::json!({"a": {"b": 1, "c": [ {"x": 1} ]}});
        let o = serde_json::json!({"a": {"b": 1, "c": [ {"x": 1, "y": 2} ], "z": 3}, "status": {}});
        assert!(is_subset(&d, &o));
        let changed = serde_json::json!({"a": {"b": 2, "c": [ {"x": 1} ]}});
        assert!(!is_subset(&changed, &o));
        assert!(!is_subset(&serde_json::json!({"a": {"c": []}}), &o));
    }
}
