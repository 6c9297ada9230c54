//! `--metrics-auth`: every request to the HTTP endpoints (except the kubelet's
//! probes, which carry no token) must bring a bearer token that the API server
//! authenticates (TokenReview, with the configured audiences) and authorises
//! (SubjectAccessReview), the way kube-rbac-proxy protects controller metrics.
//!
//! - no or a malformed `Authorization: Bearer` header, a token the API server does
//!   not authenticate, or one not valid for any configured audience: 401 with
//!   `WWW-Authenticate: Bearer`;
//! - authenticated but not allowed: 403;
//! - the API server unreachable, slow or answering an error: 503. Never allowed:
//!   this module fails closed.
//!
//! What SubjectAccessReview asks, by default, is kube-rbac-proxy's default: the
//! non-resource URL = the request path, verb = the lowercased HTTP method (bind a
//! ClusterRole with `nonResourceURLs: ["/metrics"]`, `verbs: ["get"]`). Configured
//! resource attributes (`--metrics-auth-resource-attributes`) ask for a resource
//! instead, verb from the method as the API server names it (GET -> get, POST ->
//! create, ...).
//!
//! Decisions are cached briefly in a bounded map keyed by SHA-256 of the token and
//! the attributes asked (the raw token is never stored nor logged): allowed for
//! [`AuthConfig::allowed_ttl`], refused (401/403) for [`AuthConfig::denied_ttl`];
//! a failed review (503) is never cached.
//!
//! Refusals are logged (never the token) at most 100 lines per 10 s; the next line
//! says how many were left out.
//!
//! Must not: allow a request it could not check, change anything in the cluster
//! (it only creates reviews, which the API server does not store), or put a token,
//! an IP or a request path into a metric label.
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, WWW_AUTHENTICATE};
use hyper::{Method, Response, StatusCode};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes as K8sResourceAttributes, SubjectAccessReview,
    SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

/// A request path is cut to this many bytes in logs (it comes from the client).
const LOG_PATH_MAX: usize = 128;

/// Refusal log lines per [`REFUSAL_WINDOW`]; the rest are counted and the count
/// goes with the next line logged, so a client hammering the listener cannot
/// flood the log (10 lines a second at most), while a misconfigured scraper or an
/// operator trying tokens by hand sees every refusal.
const REFUSAL_LINES: u32 = 100;
const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

/// What is left of the refusal lines' budget in the current window.
struct LogBudget {
    start: Instant,
    used: u32,
    suppressed: u64,
}

impl LogBudget {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            used: 0,
            suppressed: 0,
        }
    }

    /// `Some(lines suppressed since the last one)` when a line may be logged.
    fn take(&mut self, now: Instant) -> Option<u64> {
        if now.duration_since(self.start) >= REFUSAL_WINDOW {
            self.start = now;
            self.used = 0;
        }
        if self.used >= REFUSAL_LINES {
            self.suppressed += 1;
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The resource a SubjectAccessReview asks about instead of the request path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceAttributes {
    pub namespace: String,
    /// API group; empty for the core group.
    pub group: String,
    pub version: String,
    pub resource: String,
    pub subresource: String,
    pub name: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttributesError {
    #[error("{pair:?}: expected key=value")]
    NotAPair { pair: String },
    #[error("unknown key {key:?} (known: namespace, group, version, resource, subresource, name)")]
    UnknownKey { key: String },
    #[error("key {key:?} given twice")]
    Duplicate { key: String },
    #[error("{key}={value:?}: must not contain '/' or whitespace")]
    BadValue { key: String, value: String },
    #[error("resource=... is required")]
    NoResource,
}

impl ResourceAttributes {
    /// Parses `namespace=rayfence-system,resource=services,subresource=proxy,name=x`
    /// (group and version default to empty: the core group, any version).
    pub fn parse(text: &str) -> Result<Self, AttributesError> {
        let mut out = Self::default();
        let mut seen = Vec::new();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(AttributesError::NotAPair { pair: pair.into() });
            };
            let (key, value) = (key.trim(), value.trim());
            if value.contains('/') || value.contains(char::is_whitespace) {
                return Err(AttributesError::BadValue {
                    key: key.into(),
                    value: value.into(),
                });
            }
            let slot = match key {
                "namespace" => &mut out.namespace,
                "group" => &mut out.group,
                "version" => &mut out.version,
                "resource" => &mut out.resource,
                "subresource" => &mut out.subresource,
                "name" => &mut out.name,
                _ => return Err(AttributesError::UnknownKey { key: key.into() }),
            };
            if seen.contains(&key) {
                return Err(AttributesError::Duplicate { key: key.into() });
            }
            seen.push(key);
            *slot = value.to_owned();
        }
        if out.resource.is_empty() {
            return Err(AttributesError::NoResource);
        }
        Ok(out)
    }
}

/// The flag's own form, `namespace=..,resource=..` (empty keys left out), as logs
/// show it.
impl std::fmt::Display for ResourceAttributes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pairs = [
            ("namespace", &self.namespace),
            ("group", &self.group),
            ("version", &self.version),
            ("resource", &self.resource),
            ("subresource", &self.subresource),
            ("name", &self.name),
        ];
        let mut first = true;
        for (key, value) in pairs.into_iter().filter(|(_, v)| !v.is_empty()) {
            write!(f, "{}{key}={value}", if first { "" } else { "," })?;
            first = false;
        }
        Ok(())
    }
}

/// What to ask the API server.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// TokenReview `spec.audiences`; the token must be valid for at least one.
    /// Empty: the API server's own audiences (any token it accepts).
    pub audiences: Vec<String>,
    /// `None`: the non-resource URL (the request path), kube-rbac-proxy's default.
    pub resource: Option<ResourceAttributes>,
    /// How long an allowed decision is reused.
    pub allowed_ttl: Duration,
    /// How long a refusal (401, 403) is reused.
    pub denied_ttl: Duration,
    /// At most this many cached decisions.
    pub cache_entries: usize,
    /// Each review call gives up (503) after this long.
    pub timeout: Duration,
    /// Reviews waiting on the API server at once; a request that needs one more
    /// is refused (503) at once. The API client is the sources' too: a flood of
    /// unknown tokens must not queue work on it.
    pub max_reviews: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            audiences: Vec::new(),
            resource: None,
            // A scrape every 15-30 s costs two API calls a minute or less; a
            // revoked grant stops working within a minute.
            allowed_ttl: Duration::from_secs(60),
            denied_ttl: Duration::from_secs(10),
            cache_entries: 1024,
            timeout: Duration::from_secs(5),
            // Cached decisions need none: a few scrapers' first requests a minute.
            max_reviews: 4,
        }
    }
}

/// Who the API server says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub user: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// Why a request was refused. Carries no token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// 401: no credentials, malformed ones, or the API server did not accept them.
    #[error("unauthenticated: {reason}")]
    Unauthenticated { reason: &'static str },
    /// 403: authenticated, not allowed.
    #[error("{user} may not {verb} {what}")]
    Forbidden {
        user: String,
        verb: String,
        what: String,
    },
    /// 503: the check could not be made (the request is not allowed).
    #[error("cannot check the credentials: {reason}")]
    Unavailable { reason: String },
    /// 503: [`AuthConfig::max_reviews`] checks already wait on the API server;
    /// the request is refused at once rather than queued.
    #[error("too many credential checks in flight")]
    Busy,
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            Refusal::Forbidden { .. } => StatusCode::FORBIDDEN,
            Refusal::Unavailable { .. } | Refusal::Busy => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The answer to the client: the status, a one-line reason, and
    /// `WWW-Authenticate: Bearer` on a 401.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let body = match self {
            Refusal::Unauthenticated { .. } => "Unauthorized\n".to_owned(),
            Refusal::Forbidden { .. } => format!("Forbidden: {self}\n"),
            Refusal::Unavailable { .. } | Refusal::Busy => {
                "cannot check the credentials now\n".to_owned()
            }
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        if matches!(self, Refusal::Unauthenticated { .. }) {
            headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Checks requests against the API server; see the module docs.
pub struct Authorizer {
    client: kube::Client,
    config: AuthConfig,
    cache: Mutex<Cache>,
    reviews: tokio::sync::Semaphore,
    log_budget: Mutex<LogBudget>,
}

impl Authorizer {
    pub fn new(client: kube::Client, config: AuthConfig) -> Self {
        let cache = Cache::new(config.cache_entries);
        let reviews = tokio::sync::Semaphore::new(config.max_reviews);
        Self {
            client,
            config,
            cache: Mutex::new(cache),
            reviews,
            log_budget: Mutex::new(LogBudget::new()),
        }
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// Allowed (`Ok`, with who asked) or refused, for a request with `method` on
    /// `path` carrying `headers`.
    pub async fn check(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<Subject, Refusal> {
        let result = self.decide(method, path, headers).await;
        if let Err(refusal) = &result {
            let path = truncate(path, LOG_PATH_MAX);
            // Counted (rayfence_http_requests_shed_total); never a line each.
            if matches!(refusal, Refusal::Busy) {
                tracing::debug!(%method, path, "refused: too many checks in flight");
                return result;
            }
            let budget = self
                .log_budget
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(Instant::now());
            let Some(suppressed) = budget else {
                return result;
            };
            match refusal {
                Refusal::Unauthenticated { reason } => {
                    tracing::info!(%method, path, reason, suppressed, "refused: not authenticated")
                }
                Refusal::Forbidden { user, .. } => {
                    tracing::info!(%method, path, user, reason = "not allowed", suppressed, "refused: forbidden")
                }
                Refusal::Unavailable { reason } => {
                    tracing::warn!(%method, path, reason, suppressed, "refused: the credentials could not be checked")
                }
                Refusal::Busy => {}
            }
        }
        result
    }

    async fn decide(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<Subject, Refusal> {
        let token = bearer_token(headers)?;
        let ask = self.attributes(method, path);
        let key = cache_key(token, &ask);
        if let Some(decision) = self.cache().get(&key, Instant::now()) {
            return decision;
        }
        let Ok(_slot) = self.reviews.try_acquire() else {
            return Err(Refusal::Busy);
        };
        let decision = self.review(token, &ask).await;
        let ttl = match &decision {
            Ok(_) => Some(self.config.allowed_ttl),
            Err(Refusal::Unauthenticated { .. } | Refusal::Forbidden { .. }) => {
                Some(self.config.denied_ttl)
            }
            Err(Refusal::Unavailable { .. } | Refusal::Busy) => None,
        };
        if let Some(ttl) = ttl {
            self.cache()
                .insert(key, decision.clone(), Instant::now() + ttl);
        }
        decision
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        // The cache holds no invariant a panic could break half-way.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn attributes(&self, method: &Method, path: &str) -> Ask {
        match &self.config.resource {
            None => Ask::NonResource {
                path: path.to_owned(),
                verb: method.as_str().to_ascii_lowercase(),
            },
            Some(resource) => Ask::Resource {
                attributes: resource.clone(),
                verb: resource_verb(method),
            },
        }
    }

    /// TokenReview, then SubjectAccessReview.
    async fn review(&self, token: &str, ask: &Ask) -> Result<Subject, Refusal> {
        let subject = self.authenticate(token).await?;
        let allowed = self.authorize(&subject, ask).await?;
        if allowed {
            Ok(subject)
        } else {
            let (verb, what) = ask.describe();
            Err(Refusal::Forbidden {
                user: subject.user,
                verb,
                what,
            })
        }
    }

    async fn authenticate(&self, token: &str) -> Result<Subject, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: (!self.config.audiences.is_empty())
                    .then(|| self.config.audiences.clone()),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = self
            .call("TokenReview", api.create(&PostParams::default(), &review))
            .await?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Refusal::Unauthenticated {
                reason: "the API server did not authenticate the token",
            });
        }
        // The API server answers with the subset of the requested audiences the
        // token is valid for; an authenticator that ignores spec.audiences must not
        // make a token for another audience count (as the API server's own
        // webhook token authenticator checks).
        if !self.config.audiences.is_empty() {
            let valid = status.audiences.unwrap_or_default();
            if !valid.iter().any(|a| self.config.audiences.contains(a)) {
                return Err(Refusal::Unauthenticated {
                    reason: "the token is not valid for any of the configured audiences",
                });
            }
        }
        let user = status.user.unwrap_or_default();
        let name = user.username.unwrap_or_default();
        if name.is_empty() {
            return Err(Refusal::Unauthenticated {
                reason: "the API server authenticated the token but named no user",
            });
        }
        Ok(Subject {
            user: name,
            uid: user.uid.unwrap_or_default(),
            groups: user.groups.unwrap_or_default(),
            extra: user.extra.unwrap_or_default(),
        })
    }

    async fn authorize(&self, subject: &Subject, ask: &Ask) -> Result<bool, Refusal> {
        let mut spec = SubjectAccessReviewSpec {
            user: Some(subject.user.clone()),
            uid: (!subject.uid.is_empty()).then(|| subject.uid.clone()),
            groups: Some(subject.groups.clone()),
            extra: (!subject.extra.is_empty()).then(|| subject.extra.clone()),
            ..SubjectAccessReviewSpec::default()
        };
        match ask {
            Ask::NonResource { path, verb } => {
                spec.non_resource_attributes = Some(NonResourceAttributes {
                    path: Some(path.clone()),
                    verb: Some(verb.clone()),
                });
            }
            Ask::Resource {
                attributes: a,
                verb,
            } => {
                let opt = |s: &String| (!s.is_empty()).then(|| s.clone());
                spec.resource_attributes = Some(K8sResourceAttributes {
                    namespace: opt(&a.namespace),
                    group: Some(a.group.clone()),
                    version: opt(&a.version),
                    resource: Some(a.resource.clone()),
                    subresource: opt(&a.subresource),
                    name: opt(&a.name),
                    verb: Some(verb.clone()),
                    ..K8sResourceAttributes::default()
                });
            }
        }
        let review = SubjectAccessReview {
            spec,
            ..SubjectAccessReview::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let answer = self
            .call(
                "SubjectAccessReview",
                api.create(&PostParams::default(), &review),
            )
            .await?;
        let status = answer.status.unwrap_or_default();
        // `denied` implies not allowed; an evaluation error with allowed=false is
        // a refusal too (the authorizer could not say yes).
        Ok(status.allowed && status.denied != Some(true))
    }

    /// One review call, bounded by the configured timeout; every failure is 503.
    async fn call<T>(
        &self,
        kind: &'static str,
        request: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, Refusal> {
        match tokio::time::timeout(self.config.timeout, request).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(error)) => {
                let hint = match &error {
                    kube::Error::Api(s) if s.code == 403 => {
                        " (the agent's ClusterRole needs create on tokenreviews and subjectaccessreviews)"
                    }
                    _ => "",
                };
                Err(Refusal::Unavailable {
                    reason: format!("{kind}: {error}{hint}"),
                })
            }
            Err(_) => Err(Refusal::Unavailable {
                reason: format!("{kind}: no answer within {:?}", self.config.timeout),
            }),
        }
    }
}

/// The token of the one `Authorization: Bearer <token>` header (scheme
/// case-insensitive, as RFC 7235 has it).
fn bearer_token(headers: &HeaderMap) -> Result<&str, Refusal> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(Refusal::Unauthenticated {
            reason: if headers.contains_key(AUTHORIZATION) {
                "more than one Authorization header"
            } else {
                "no Authorization header"
            },
        });
    };
    let malformed = Refusal::Unauthenticated {
        reason: "malformed Authorization header (expected \"Bearer <token>\")",
    };
    let value = value.to_str().map_err(|_| malformed.clone())?;
    let Some((scheme, token)) = value.split_once(' ') else {
        return Err(malformed);
    };
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer")
        || token.is_empty()
        || token.contains(char::is_whitespace)
    {
        return Err(malformed);
    }
    Ok(token)
}

/// The API server's verb for a request on a resource (kube-rbac-proxy's mapping).
fn resource_verb(method: &Method) -> String {
    match *method {
        Method::GET | Method::HEAD => "get".into(),
        Method::POST => "create".into(),
        Method::PUT => "update".into(),
        Method::PATCH => "patch".into(),
        Method::DELETE => "delete".into(),
        ref other => other.as_str().to_ascii_lowercase(),
    }
}

/// What a SubjectAccessReview asks.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ask {
    NonResource {
        path: String,
        verb: String,
    },
    Resource {
        attributes: ResourceAttributes,
        verb: String,
    },
}

impl Ask {
    /// (verb, what) for messages.
    fn describe(&self) -> (String, String) {
        match self {
            Ask::NonResource { path, verb } => (verb.clone(), truncate(path, LOG_PATH_MAX).into()),
            Ask::Resource {
                attributes: a,
                verb,
            } => {
                let mut what = a.resource.clone();
                if !a.group.is_empty() {
                    what = format!("{what}.{}", a.group);
                }
                if !a.subresource.is_empty() {
                    what = format!("{what}/{}", a.subresource);
                }
                if !a.name.is_empty() {
                    what = format!("{what} {}", a.name);
                }
                if !a.namespace.is_empty() {
                    what = format!("{what} in {}", a.namespace);
                }
                (verb.clone(), what)
            }
        }
    }

    /// An unambiguous encoding for the cache key (fields separated by NUL, which
    /// no path, verb or attribute holds).
    fn encode(&self) -> String {
        match self {
            Ask::NonResource { path, verb } => format!("n\0{verb}\0{path}"),
            Ask::Resource {
                attributes: a,
                verb,
            } => format!(
                "r\0{verb}\0{}\0{}\0{}\0{}\0{}\0{}",
                a.namespace, a.group, a.version, a.resource, a.subresource, a.name
            ),
        }
    }
}

type Key = [u8; 32];

/// SHA-256 of the token and the attributes: the cache never holds a token.
fn cache_key(token: &str, ask: &Ask) -> Key {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(token.as_bytes());
    ctx.update(b"\0");
    ctx.update(ask.encode().as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Bounded decisions with expiry times. When full, expired entries go first, then
/// the one that would expire soonest.
struct Cache {
    capacity: usize,
    entries: HashMap<Key, (Result<Subject, Refusal>, Instant)>,
}

impl Cache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: HashMap::new(),
        }
    }

    fn get(&mut self, key: &Key, now: Instant) -> Option<Result<Subject, Refusal>> {
        match self.entries.get(key) {
            Some((decision, expires)) if *expires > now => Some(decision.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, key: Key, decision: Result<Subject, Refusal>, expires: Instant) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            let now = Instant::now();
            self.entries.retain(|_, (_, e)| *e > now);
            if self.entries.len() >= self.capacity
                && let Some(soonest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, e))| *e)
                    .map(|(k, _)| *k)
            {
                self.entries.remove(&soonest);
            }
        }
        self.entries.insert(key, (decision, expires));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn subject(user: &str) -> Subject {
        Subject {
            user: user.into(),
            uid: String::new(),
            groups: Vec::new(),
            extra: BTreeMap::new(),
        }
    }

    fn ask(path: &str) -> Ask {
        Ask::NonResource {
            path: path.into(),
            verb: "get".into(),
        }
    }

    #[test]
    fn bearer_token_is_taken_from_one_well_formed_header_only() {
        assert_eq!(bearer_token(&headers(&["Bearer abc.def"])), Ok("abc.def"));
        assert_eq!(bearer_token(&headers(&["bearer abc"])), Ok("abc"));
        for bad in [
            &[][..],
            &["Basic dXNlcjpwYXNz"],
            &["Bearer"],
            &["Bearer "],
            &["Bearer a b"],
            &["abc"],
            &["Bearer a", "Bearer b"],
        ] {
            let refusal = bearer_token(&headers(bad)).unwrap_err();
            assert_eq!(refusal.status(), StatusCode::UNAUTHORIZED, "{bad:?}");
        }
    }

    #[test]
    fn a_401_says_bearer_and_never_echoes_the_token() {
        let r = Refusal::Unauthenticated { reason: "x" }.response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()[WWW_AUTHENTICATE], "Bearer");
        let r = Refusal::Forbidden {
            user: "u".into(),
            verb: "get".into(),
            what: "/metrics".into(),
        }
        .response();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(r.headers().get(WWW_AUTHENTICATE).is_none());
        let r = Refusal::Unavailable { reason: "x".into() }.response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn resource_attributes_parse_and_bad_ones_name_the_problem() {
        let a = ResourceAttributes::parse(
            "namespace=rayfence-system, resource=services,subresource=proxy,name=rayfence-agent",
        )
        .unwrap();
        assert_eq!(a.namespace, "rayfence-system");
        assert_eq!(a.resource, "services");
        assert_eq!(a.subresource, "proxy");
        assert_eq!(a.name, "rayfence-agent");
        assert_eq!(a.group, "");
        assert_eq!(
            ResourceAttributes::parse("namespace=x"),
            Err(AttributesError::NoResource)
        );
        assert_eq!(
            ResourceAttributes::parse("resource=pods,kind=Pod"),
            Err(AttributesError::UnknownKey { key: "kind".into() })
        );
        assert_eq!(
            ResourceAttributes::parse("resource=pods,resource=nodes"),
            Err(AttributesError::Duplicate {
                key: "resource".into()
            })
        );
        assert!(matches!(
            ResourceAttributes::parse("resource=pods/log"),
            Err(AttributesError::BadValue { .. })
        ));
        assert!(matches!(
            ResourceAttributes::parse("resource"),
            Err(AttributesError::NotAPair { .. })
        ));
    }

    #[test]
    fn resource_verbs_follow_the_api_servers_names() {
        assert_eq!(resource_verb(&Method::GET), "get");
        assert_eq!(resource_verb(&Method::POST), "create");
        assert_eq!(resource_verb(&Method::PUT), "update");
        assert_eq!(resource_verb(&Method::DELETE), "delete");
    }

    #[test]
    fn cache_key_depends_on_token_and_attributes_and_holds_no_token() {
        let k = cache_key("secret-token", &ask("/metrics"));
        assert_ne!(k, cache_key("secret-token2", &ask("/metrics")));
        assert_ne!(k, cache_key("secret-token", &ask("/v1/flows")));
        assert_ne!(
            k,
            cache_key(
                "secret-token",
                &Ask::NonResource {
                    path: "/metrics".into(),
                    verb: "post".into()
                }
            )
        );
        assert!(!k.windows(6).any(|w| w == b"secret"));
    }

    #[test]
    fn refusal_lines_are_limited_per_window_and_the_rest_counted() {
        let mut budget = LogBudget::new();
        let t0 = budget.start;
        for _ in 0..REFUSAL_LINES {
            assert_eq!(budget.take(t0), Some(0));
        }
        assert_eq!(budget.take(t0), None);
        assert_eq!(budget.take(t0 + Duration::from_secs(1)), None);
        // A new window: the next line carries what was left out.
        assert_eq!(budget.take(t0 + REFUSAL_WINDOW), Some(2));
        assert_eq!(budget.take(t0 + REFUSAL_WINDOW), Some(0));
    }

    #[test]
    fn cached_decisions_expire() {
        let mut c = Cache::new(4);
        let t0 = Instant::now();
        let key = cache_key("t", &ask("/metrics"));
        c.insert(key, Ok(subject("u")), t0 + Duration::from_secs(1));
        assert_eq!(c.get(&key, t0), Some(Ok(subject("u"))));
        assert_eq!(c.get(&key, t0 + Duration::from_secs(2)), None);
        assert_eq!(c.len(), 0, "an expired entry is dropped when seen");
    }

    #[test]
    fn cache_stays_bounded_and_evicts_the_soonest_to_expire() {
        let mut c = Cache::new(3);
        let t0 = Instant::now() + Duration::from_secs(100);
        let keys: Vec<Key> = (0..5)
            .map(|i| cache_key(&format!("t{i}"), &ask("/metrics")))
            .collect();
        for (i, key) in keys.iter().enumerate() {
            // t0 is in the future: nothing has expired yet.
            c.insert(
                *key,
                Ok(subject("u")),
                t0 + Duration::from_secs(10 - i as u64),
            );
            assert!(c.len() <= 3);
        }
        // Later inserts expire sooner here, so each evicted the previous one.
        assert!(c.get(&keys[4], t0).is_some());
        assert!(c.get(&keys[0], t0).is_some());
        assert!(c.get(&keys[1], t0).is_some());
        assert!(c.get(&keys[3], t0).is_none());
    }
}
