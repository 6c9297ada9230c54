//! Finding the agents: the agent pods (by the DaemonSet's labels, in the agent's
//! namespace) with their node and readiness, and the node a pod of the flow runs
//! on, from the API server as the user sees it.
//!
//! Must not: run anything in a pod (that is `exec`), or guess a node: a pod the
//! API server does not place is an error naming it.
use std::net::IpAddr;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;

use super::ClusterArgs;

/// One agent pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentPod {
    pub name: String,
    /// `spec.nodeName`; empty while unscheduled.
    pub node: String,
    /// The pod's Ready condition.
    pub ready: bool,
    /// `status.phase`.
    pub phase: String,
    /// The agent container's image.
    pub image: String,
}

/// The API server refused the user (RBAC): the same for every agent pod, so a
/// command stops at it rather than reporting each agent as unreachable.
#[derive(Debug, thiserror::Error)]
#[error(
    "{what}: forbidden by the API server (RBAC): {message} (the user needs the rayfence-viewer Role of deploy/ in the agents' namespace)"
)]
pub struct Forbidden {
    pub what: String,
    pub message: String,
}

/// Says what an API error means for this plugin's user (who is refused what).
pub fn api_error(error: kube::Error, what: &str) -> anyhow::Error {
    match &error {
        kube::Error::Api(status) if status.code == 403 => Forbidden {
            what: what.to_owned(),
            message: status.message.clone(),
        }
        .into(),
        kube::Error::Api(status) if status.code == 401 => anyhow::anyhow!(
            "{what}: the API server did not accept the kubeconfig's credentials: {}",
            status.message
        ),
        _ => anyhow::Error::new(error).context(what.to_owned()),
    }
}

/// Every agent pod, by node name.
pub async fn agent_pods(
    client: &kube::Client,
    cluster: &ClusterArgs,
) -> anyhow::Result<Vec<AgentPod>> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &cluster.namespace);
    let list = api
        .list(&ListParams::default().labels(&cluster.selector))
        .await
        .map_err(|e| {
            api_error(
                e,
                &format!(
                    "listing the agent pods in namespace {} (-n) with labels {} (-l)",
                    cluster.namespace, cluster.selector
                ),
            )
        })?;
    let mut pods: Vec<AgentPod> = list
        .items
        .iter()
        .map(|pod| describe(pod, &cluster.container))
        .collect();
    if pods.is_empty() {
        bail!(
            "no agent pods in namespace {} (-n) with labels {} (-l): is rayfence installed there?",
            cluster.namespace,
            cluster.selector
        );
    }
    pods.sort_by(|a, b| (&a.node, &a.name).cmp(&(&b.node, &b.name)));
    Ok(pods)
}

fn describe(pod: &Pod, container: &str) -> AgentPod {
    let status = pod.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let spec = pod.spec.as_ref();
    let image = spec
        .into_iter()
        .flat_map(|s| &s.containers)
        .find(|c| c.name == container)
        .and_then(|c| c.image.clone())
        .unwrap_or_default();
    AgentPod {
        name: pod.metadata.name.clone().unwrap_or_default(),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        ready,
        phase: status.and_then(|s| s.phase.clone()).unwrap_or_default(),
        image,
    }
}

/// The agent pod on `node`.
pub fn on_node<'a>(agents: &'a [AgentPod], node: &str) -> anyhow::Result<&'a AgentPod> {
    agents.iter().find(|a| a.node == node).with_context(|| {
        format!("no agent pod runs on node {node} (is the DaemonSet scheduled there?)")
    })
}

/// The node a flow's end runs on: `ns/pod` by its pod, an IP by the pod that has
/// it (`None`: no pod has that address, e.g. a node or an outside address).
pub async fn node_of_end(
    client: &kube::Client,
    flag: &str,
    end: &crate::operator::explain::NamedEnd,
) -> anyhow::Result<Option<String>> {
    use crate::operator::explain::NamedEnd;
    match end {
        NamedEnd::Pod { namespace, name } => {
            node_of_pod(client, flag, namespace, name).await.map(Some)
        }
        NamedEnd::Address(ip) => node_of_address(client, flag, *ip).await,
    }
}

/// The node `namespace/name` is scheduled on.
pub async fn node_of_pod(
    client: &kube::Client,
    flag: &str,
    namespace: &str,
    name: &str,
) -> anyhow::Result<String> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let what = format!("{flag}: getting pod {namespace}/{name}");
    let pod = api
        .get_opt(name)
        .await
        .map_err(|e| api_error(e, &what))?
        .with_context(|| format!("{flag}: pod {namespace}/{name} does not exist"))?;
    pod.spec
        .and_then(|s| s.node_name)
        .filter(|n| !n.is_empty())
        .with_context(|| format!("{flag}: pod {namespace}/{name} is not scheduled on a node yet"))
}

/// The node of the (running) pod whose IP is `ip`; hostNetwork pods share their
/// node's address and do not name it.
async fn node_of_address(
    client: &kube::Client,
    flag: &str,
    ip: IpAddr,
) -> anyhow::Result<Option<String>> {
    let api: Api<Pod> = Api::all(client.clone());
    let what = format!("{flag}: finding the pod with IP {ip} (list pods in all namespaces)");
    let list = api
        .list(&ListParams::default().fields(&format!("status.podIP={ip}")))
        .await
        .map_err(|e| api_error(e, &what))?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| {
            !p.spec
                .as_ref()
                .is_some_and(|s| s.host_network == Some(true))
        })
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .find_map(|p| p.spec.and_then(|s| s.node_name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_pod_is_described_by_its_node_readiness_and_image() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "rayfence-agent-x"},
            "spec": {"nodeName": "n1", "containers": [
                {"name": "init", "image": "busybox"},
                {"name": "agent", "image": "ghcr.io/rayfence/rayfence:0.1.0"},
            ]},
            "status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": "False"},
            ]},
        }))
        .expect("a pod");
        let agent = describe(&pod, "agent");
        assert_eq!(agent.node, "n1");
        assert!(!agent.ready);
        assert_eq!(agent.image, "ghcr.io/rayfence/rayfence:0.1.0");
        assert!(on_node(std::slice::from_ref(&agent), "n1").is_ok());
        let missing = on_node(&[agent], "n2").expect_err("none on n2");
        assert!(missing.to_string().contains("node n2"), "{missing}");
    }
}
