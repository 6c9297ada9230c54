//! The fake API server's authentication and authorization reviews: `POST
//! /apis/authentication.k8s.io/v1/tokenreviews` and `POST
//! /apis/authorization.k8s.io/v1/subjectaccessreviews`, answered from what the
//! test configured: tokens (the user they stand for and the audiences they are
//! valid for) and grants (a user or group may use a verb on a non-resource path or
//! on a resource), as RBAC would answer.
//!
//! As a real API server:
//! - TokenReview: an unknown token is `authenticated: false` with an error; with
//!   `spec.audiences`, `status.audiences` is the part of them the token is valid
//!   for, and a token valid for none of them is not authenticated; without,
//!   the token must be valid for the server's own audience ([`API_AUDIENCE`]),
//!   which `status.audiences` then names;
//! - SubjectAccessReview: allowed when a grant matches the user or one of the
//!   groups, the verb (or `*`) and the non-resource path (exact, or a prefix
//!   ending in `*`, as RBAC's `nonResourceURLs`) or the resource attributes (a
//!   grant's empty name or namespace matches any, as a ClusterRole without
//!   `resourceNames` bound cluster-wide does); `reason` names the grant.
//!
//! Not modelled: token expiry, bound object references, webhooks, the
//! `denied` field (RBAC never sets it).
//!
//! No I/O here; `http.rs` routes the two paths to [`Reviews::review`].
use serde_json::{Value, json};

use super::store::ApiError;

/// The audience tokens are valid for when a TokenReview names none: a real API
/// server's default `--api-audiences` (its issuer).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// Who a token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub user: String,
    pub uid: String,
    pub groups: Vec<String>,
    /// `extra` of the user, passed on to SubjectAccessReview by a client.
    pub extra: Vec<(String, Vec<String>)>,
    /// Audiences it is valid for; empty means [`API_AUDIENCE`] only.
    pub audiences: Vec<String>,
}

impl TokenInfo {
    /// A service account's token (user `system:serviceaccount:NS:NAME`, the
    /// service-account groups), valid for `audiences` (empty: the API server).
    pub fn service_account(namespace: &str, name: &str, audiences: &[&str]) -> Self {
        Self {
            user: format!("system:serviceaccount:{namespace}:{name}"),
            uid: format!("uid-{namespace}-{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
            extra: vec![(
                "authentication.kubernetes.io/pod-name".into(),
                vec![format!("{name}-pod")],
            )],
            audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
        }
    }
}

/// Who a grant is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantSubject {
    User(String),
    Group(String),
}

/// What a grant allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantTarget {
    /// A non-resource URL: exact, or a prefix when it ends in `*`.
    NonResource { path: String },
    /// A resource; empty `namespace` or `name` match any.
    Resource {
        namespace: String,
        group: String,
        resource: String,
        subresource: String,
        name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub subject: GrantSubject,
    pub target: GrantTarget,
    /// A verb, or `*`.
    pub verb: String,
}

impl Grant {
    /// `verb` on the non-resource `path`, for a user or a group.
    pub fn non_resource(subject: GrantSubject, path: &str, verb: &str) -> Self {
        Self {
            subject,
            target: GrantTarget::NonResource { path: path.into() },
            verb: verb.into(),
        }
    }
}

impl Grant {
    /// `verb` on a resource (`subresource` empty for the resource itself) in
    /// `namespace` (empty: any), any name, for a user or a group: a Role bound in
    /// that namespace, or a ClusterRole bound cluster-wide.
    pub fn resource(
        subject: GrantSubject,
        namespace: &str,
        resource: &str,
        subresource: &str,
        verb: &str,
    ) -> Self {
        Self {
            subject,
            target: GrantTarget::Resource {
                namespace: namespace.into(),
                group: String::new(),
                resource: resource.into(),
                subresource: subresource.into(),
                name: String::new(),
            },
            verb: verb.into(),
        }
    }
}

/// Whether a grant's target covers what a SubjectAccessReview asks.
type TargetMatch = Box<dyn Fn(&GrantTarget) -> bool>;

/// One review as the server received and answered it.
#[derive(Debug, Clone, PartialEq)]
pub struct Review {
    /// `TokenReview` or `SubjectAccessReview`.
    pub kind: &'static str,
    pub request: Value,
    pub response: Value,
}

/// Tokens, grants and the reviews answered.
#[derive(Debug, Default)]
pub struct Reviews {
    pub tokens: Vec<(String, TokenInfo)>,
    pub grants: Vec<Grant>,
    /// Answer TokenReviews with the token's own audiences whatever was asked, as
    /// an authenticator that ignores `spec.audiences` would: the client must check.
    pub ignore_requested_audiences: bool,
    pub log: Vec<Review>,
}

impl Reviews {
    /// `None` when `path` is not a review path.
    pub fn kind_of(path: &str) -> Option<&'static str> {
        match path.trim_end_matches('/') {
            "/apis/authentication.k8s.io/v1/tokenreviews" => Some("TokenReview"),
            "/apis/authorization.k8s.io/v1/subjectaccessreviews" => Some("SubjectAccessReview"),
            _ => None,
        }
    }

    /// Whether a grant lets `who` (the user or one of its groups) use `verb` on a
    /// core-group resource: what the API server asks its authorizer about a request
    /// of its own (`exec`), not through a SubjectAccessReview.
    pub fn allows(
        &self,
        who: &TokenInfo,
        verb: &str,
        namespace: &str,
        resource: &str,
        subresource: &str,
        name: &str,
    ) -> bool {
        self.grants.iter().any(|g| {
            let subject = match &g.subject {
                GrantSubject::User(u) => *u == who.user,
                GrantSubject::Group(group) => who.groups.contains(group),
            };
            let target = match &g.target {
                GrantTarget::Resource {
                    namespace: n,
                    group,
                    resource: r,
                    subresource: s,
                    name: named,
                } => {
                    (n.is_empty() || n == namespace)
                        && group.is_empty()
                        && r == resource
                        && s == subresource
                        && (named.is_empty() || named == name)
                }
                GrantTarget::NonResource { .. } => false,
            };
            subject && (g.verb == "*" || g.verb == verb) && target
        })
    }

    /// Answers a POSTed review (HTTP 201 with the review and its status, as a
    /// real server), and logs it.
    pub fn review(&mut self, kind: &'static str, request: Value) -> Result<Value, ApiError> {
        let expected_api = match kind {
            "TokenReview" => "authentication.k8s.io/v1",
            _ => "authorization.k8s.io/v1",
        };
        if request["kind"] != kind || request["apiVersion"] != expected_api {
            return Err(ApiError::bad_request(format!(
                "expected a {expected_api} {kind}, got {} {}",
                request["apiVersion"], request["kind"]
            )));
        }
        let status = match kind {
            "TokenReview" => self.token_review(&request["spec"])?,
            _ => self.access_review(&request["spec"])?,
        };
        let mut response = request.clone();
        response["status"] = status;
        self.log.push(Review {
            kind,
            request,
            response: response.clone(),
        });
        Ok(response)
    }

    fn token_review(&self, spec: &Value) -> Result<Value, ApiError> {
        let token = spec["token"].as_str().unwrap_or("");
        if token.is_empty() {
            return Err(ApiError::bad_request("spec.token: Required value"));
        }
        let Some((_, info)) = self.tokens.iter().find(|(t, _)| t == token) else {
            return Ok(json!({"authenticated": false, "error": "invalid bearer token"}));
        };
        let valid_for: Vec<String> = if info.audiences.is_empty() {
            vec![API_AUDIENCE.to_owned()]
        } else {
            info.audiences.clone()
        };
        let requested: Vec<String> = spec["audiences"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        let audiences: Vec<String> = if self.ignore_requested_audiences {
            valid_for.clone()
        } else if requested.is_empty() {
            valid_for
                .iter()
                .filter(|a| *a == API_AUDIENCE)
                .cloned()
                .collect()
        } else {
            requested
                .iter()
                .filter(|a| valid_for.contains(a))
                .cloned()
                .collect()
        };
        if audiences.is_empty() {
            return Ok(json!({
                "authenticated": false,
                "error": format!("token audiences {valid_for:?} is invalid for the target audiences {requested:?}"),
            }));
        }
        let extra: serde_json::Map<String, Value> = info
            .extra
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        Ok(json!({
            "authenticated": true,
            "audiences": audiences,
            "user": {
                "username": info.user,
                "uid": info.uid,
                "groups": info.groups,
                "extra": extra,
            },
        }))
    }

    fn access_review(&self, spec: &Value) -> Result<Value, ApiError> {
        let user = spec["user"].as_str().unwrap_or("");
        let groups: Vec<&str> = spec["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if user.is_empty() && groups.is_empty() {
            return Err(ApiError::bad_request(
                "spec.user or spec.groups: at least one of user or group must be specified",
            ));
        }
        let non_resource = spec.get("nonResourceAttributes").filter(|v| !v.is_null());
        let resource = spec.get("resourceAttributes").filter(|v| !v.is_null());
        let (verb, matches): (&str, TargetMatch) = match (non_resource, resource) {
            (Some(n), None) => {
                let path = n["path"].as_str().unwrap_or("").to_owned();
                (
                    n["verb"].as_str().unwrap_or(""),
                    Box::new(move |t| match t {
                        GrantTarget::NonResource { path: p } => match p.strip_suffix('*') {
                            Some(prefix) => path.starts_with(prefix),
                            None => *p == path,
                        },
                        GrantTarget::Resource { .. } => false,
                    }),
                )
            }
            (None, Some(r)) => {
                let field = |k: &str| r[k].as_str().unwrap_or("").to_owned();
                let (ns, group, res, sub, name) = (
                    field("namespace"),
                    field("group"),
                    field("resource"),
                    field("subresource"),
                    field("name"),
                );
                (
                    r["verb"].as_str().unwrap_or(""),
                    Box::new(move |t| match t {
                        GrantTarget::Resource {
                            namespace,
                            group: g,
                            resource,
                            subresource,
                            name: n,
                        } => {
                            (namespace.is_empty() || *namespace == ns)
                                && *g == group
                                && *resource == res
                                && *subresource == sub
                                && (n.is_empty() || *n == name)
                        }
                        GrantTarget::NonResource { .. } => false,
                    }),
                )
            }
            _ => {
                return Err(ApiError::bad_request(
                    "exactly one of nonResourceAttributes and resourceAttributes must be specified",
                ));
            }
        };
        let granted = self.grants.iter().find(|g| {
            let subject = match &g.subject {
                GrantSubject::User(u) => u == user,
                GrantSubject::Group(group) => groups.contains(&group.as_str()),
            };
            subject && (g.verb == "*" || g.verb == verb) && matches(&g.target)
        });
        Ok(match granted {
            Some(g) => json!({"allowed": true, "reason": format!("granted by {g:?}")}),
            None => json!({"allowed": false}),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_review(token: &str, audiences: &[&str]) -> Value {
        let mut spec = json!({"token": token});
        if !audiences.is_empty() {
            spec["audiences"] = json!(audiences);
        }
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec})
    }

    fn sar(spec: Value) -> Value {
        json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec})
    }

    fn reviews() -> Reviews {
        Reviews {
            tokens: vec![
                (
                    "prom".into(),
                    TokenInfo::service_account("monitoring", "prometheus", &["rayfence"]),
                ),
                (
                    "api".into(),
                    TokenInfo::service_account("default", "app", &[]),
                ),
            ],
            grants: vec![
                Grant::non_resource(
                    GrantSubject::Group("system:serviceaccounts:monitoring".into()),
                    "/metrics",
                    "get",
                ),
                Grant::non_resource(GrantSubject::User("ops".into()), "/v1/*", "*"),
                Grant {
                    subject: GrantSubject::User("ops".into()),
                    target: GrantTarget::Resource {
                        namespace: "rayfence-system".into(),
                        group: "".into(),
                        resource: "services".into(),
                        subresource: "proxy".into(),
                        name: "".into(),
                    },
                    verb: "get".into(),
                },
            ],
            ..Reviews::default()
        }
    }

    #[test]
    fn token_review_authenticates_known_tokens_for_their_audiences_only() {
        let mut r = reviews();
        let ok = r
            .review("TokenReview", token_review("prom", &["rayfence", "other"]))
            .unwrap();
        assert_eq!(ok["status"]["authenticated"], true);
        assert_eq!(ok["status"]["audiences"], json!(["rayfence"]));
        assert_eq!(
            ok["status"]["user"]["username"],
            "system:serviceaccount:monitoring:prometheus"
        );
        // Another audience, the API server's (none asked), an unknown token.
        for (token, auds) in [("prom", &["other"][..]), ("prom", &[]), ("nope", &[])] {
            let no = r.review("TokenReview", token_review(token, auds)).unwrap();
            assert_eq!(no["status"]["authenticated"], false, "{token} {auds:?}");
            assert!(no["status"]["error"].is_string());
        }
        let api = r.review("TokenReview", token_review("api", &[])).unwrap();
        assert_eq!(api["status"]["audiences"], json!([API_AUDIENCE]));
        assert_eq!(r.log.len(), 5);
    }

    #[test]
    fn ignoring_requested_audiences_answers_with_the_tokens_own() {
        let mut r = reviews();
        r.ignore_requested_audiences = true;
        let a = r
            .review("TokenReview", token_review("api", &["rayfence"]))
            .unwrap();
        assert_eq!(a["status"]["authenticated"], true);
        assert_eq!(a["status"]["audiences"], json!([API_AUDIENCE]));
    }

    #[test]
    fn access_review_allows_what_a_grant_matches_by_user_or_group() {
        let mut r = reviews();
        let mut allowed = |spec: Value| {
            r.review("SubjectAccessReview", sar(spec)).unwrap()["status"]["allowed"]
                .as_bool()
                .unwrap()
        };
        let prom = json!([
            "system:serviceaccounts",
            "system:serviceaccounts:monitoring"
        ]);
        let path = |p: &str, v: &str| json!({"path": p, "verb": v});
        assert!(allowed(
            json!({"user": "p", "groups": prom, "nonResourceAttributes": path("/metrics", "get")})
        ));
        assert!(!allowed(
            json!({"user": "p", "groups": prom, "nonResourceAttributes": path("/metrics", "post")})
        ));
        assert!(!allowed(
            json!({"user": "p", "groups": prom, "nonResourceAttributes": path("/v1/flows", "get")})
        ));
        assert!(!allowed(
            json!({"user": "p", "groups": ["x"], "nonResourceAttributes": path("/metrics", "get")})
        ));
        assert!(allowed(
            json!({"user": "ops", "nonResourceAttributes": path("/v1/flows", "delete")})
        ));
        let svc = |ns: &str, sub: &str| {
            json!({"namespace": ns, "group": "", "resource": "services", "subresource": sub,
                   "name": "rayfence-agent", "verb": "get"})
        };
        assert!(allowed(
            json!({"user": "ops", "resourceAttributes": svc("rayfence-system", "proxy")})
        ));
        assert!(!allowed(
            json!({"user": "ops", "resourceAttributes": svc("default", "proxy")})
        ));
        assert!(!allowed(
            json!({"user": "ops", "resourceAttributes": svc("rayfence-system", "")})
        ));
    }

    #[test]
    fn malformed_reviews_are_bad_requests() {
        let mut r = reviews();
        assert!(r.review("TokenReview", token_review("", &[])).is_err());
        assert!(
            r.review(
                "SubjectAccessReview",
                sar(json!({"nonResourceAttributes": {"path": "/metrics", "verb": "get"}}))
            )
            .is_err_and(|e| e.code == 400)
        );
        assert!(
            r.review("SubjectAccessReview", sar(json!({"user": "u"})))
                .is_err_and(|e| e.code == 400)
        );
        assert!(
            r.review("SubjectAccessReview", token_review("prom", &[]))
                .is_err()
        );
        assert!(
            r.log.is_empty(),
            "refused reviews are not logged as answered"
        );
    }

    /// The typed k8s-openapi reviews through a real kube::Client, as the agent
    /// sends them: answered, logged, and recorded as requests.
    #[tokio::test]
    async fn reviews_round_trip_through_a_kube_client() -> anyhow::Result<()> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        use k8s_openapi::api::authorization::v1::{
            NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
        };
        use kube::api::{Api, PostParams};

        let server = super::super::FakeApiServer::start().await?;
        server.add_token(
            "prom",
            TokenInfo::service_account("monitoring", "prometheus", &["rayfence"]),
        );
        server.grant(Grant::non_resource(
            GrantSubject::User("system:serviceaccount:monitoring:prometheus".into()),
            "/metrics",
            "get",
        ));
        let client = server.client()?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: "prom".into(),
                audiences: Some(vec!["rayfence".into()]),
            },
            ..TokenReview::default()
        };
        let answer = Api::<TokenReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let status = answer.status.unwrap_or_default();
        assert_eq!(status.authenticated, Some(true));
        let user = status.user.unwrap_or_default();
        assert_eq!(
            user.username.as_deref(),
            Some("system:serviceaccount:monitoring:prometheus")
        );
        let sar = |path: &str| SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups.clone(),
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(path.into()),
                    verb: Some("get".into()),
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let api = Api::<SubjectAccessReview>::all(client);
        let yes = api.create(&PostParams::default(), &sar("/metrics")).await?;
        assert!(yes.status.is_some_and(|s| s.allowed));
        let no = api
            .create(&PostParams::default(), &sar("/v1/flows"))
            .await?;
        assert!(no.status.is_some_and(|s| !s.allowed));

        assert_eq!(server.review_count("TokenReview"), 1);
        assert_eq!(server.review_count("SubjectAccessReview"), 2);
        let posted: Vec<String> = server
            .requests()
            .iter()
            .filter(|r| r.method == "POST")
            .map(|r| r.path.clone())
            .collect();
        assert_eq!(
            posted,
            [
                "/apis/authentication.k8s.io/v1/tokenreviews",
                "/apis/authorization.k8s.io/v1/subjectaccessreviews",
                "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            ]
        );
        Ok(())
    }
}
