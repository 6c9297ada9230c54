//! The RayCluster resource (`ray.io/v1`), reduced to what rayfence reads.
//!
//! Policy-bearing fields stay raw JSON so one malformed part is reported by the policy
//! engine instead of failing the whole object; every other field is ignored. Must not:
//! validate or interpret (that is `policy::raycluster`).
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// A KubeRay RayCluster.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RayCluster {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: RayClusterSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RayClusterSpec {
    /// KubeRay v1.7+: `{mode, head, worker, workerGroups}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<serde_json::Value>,
    /// KubeRay PR #4638 as merged: `{mode, head, worker}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_isolation: Option<serde_json::Value>,
    /// Only `rayStartParams` is read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_group_spec: Option<serde_json::Value>,
}

impl k8s_openapi::Resource for RayCluster {
    const API_VERSION: &'static str = "ray.io/v1";
    const GROUP: &'static str = "ray.io";
    const KIND: &'static str = "RayCluster";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "rayclusters";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for RayCluster {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}
