//! Who is calling the `Distribution` service, and what they may do.
//!
//! A caller proves an identity with a client certificate (a URI SAN from
//! [`stackroute_proto::identity`], signed by the controller's client CA: standalone nodes and
//! administrators) or, in Kubernetes, with a bearer token: the agent's projected
//! service-account token for the audience [`AGENT_AUDIENCE`], checked with a TokenReview, whose
//! pod is looked up to learn the node it runs on (the node authoriser's rule: a node may only
//! speak for itself). Every refusal is counted by method and reason.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use stackroute_proto::identity::{AGENT_AUDIENCE, Caller};
use tonic::{Request, Status};

use crate::metrics::Metrics;

/// How long a reviewed token is trusted before it is reviewed again.
const TOKEN_CACHE_TTL: Duration = Duration::from_secs(60);
/// Most tokens remembered at once (each agent has one).
const TOKEN_CACHE_ENTRIES: usize = 16_384;

/// The pod-name claim of a bound service-account token, as the API server reports it.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// The pod-UID claim.
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// How the service authenticates its callers.
pub struct Authenticator {
    secure: bool,
    tokens: Option<TokenReviewer>,
    metrics: Arc<Metrics>,
}

impl Authenticator {
    /// Plaintext: nobody is authenticated and everyone may do everything
    /// (`--insecure-plaintext`, for development only).
    pub fn insecure(metrics: Arc<Metrics>) -> Self {
        Self {
            secure: false,
            tokens: None,
            metrics,
        }
    }

    /// TLS: client certificates, and agents' tokens when `tokens` is given.
    pub fn secure(tokens: Option<TokenReviewer>, metrics: Arc<Metrics>) -> Self {
        Self {
            secure: true,
            tokens,
            metrics,
        }
    }

    /// The caller of `request`, `None` in insecure mode. Refuses a request that proves no
    /// identity, or a wrong one, with `UNAUTHENTICATED` naming what was missing or wrong.
    pub async fn caller<T>(
        &self,
        method: &str,
        request: &Request<T>,
    ) -> Result<Option<Caller>, Status> {
        if !self.secure {
            return Ok(None);
        }
        let result = match bearer(request) {
            Some(token) => match &self.tokens {
                Some(reviewer) => reviewer.review(token).await,
                None => Err(Status::unauthenticated(
                    "bearer tokens are not accepted by this controller (standalone): use a client certificate",
                )),
            },
            None => match request.peer_certs() {
                Some(chain) => match chain.first() {
                    Some(leaf) => caller_from_certificate(leaf.as_ref()),
                    None => Err(no_credential()),
                },
                None => Err(no_credential()),
            },
        };
        match result {
            Ok(caller) => Ok(Some(caller)),
            Err(status) => {
                self.metrics.denied(method, "unauthenticated");
                tracing::warn!(
                    method,
                    message = status.message(),
                    "refused an unauthenticated call"
                );
                Err(status)
            }
        }
    }

    /// Allows `caller` to act for `node` (watch, ack, report, register): only that node's own
    /// agent may.
    pub fn for_node(
        &self,
        method: &str,
        caller: Option<&Caller>,
        node: &str,
    ) -> Result<(), Status> {
        match caller {
            None => Ok(()),
            Some(Caller::Node(own)) if own == node => Ok(()),
            Some(other) => {
                self.metrics.denied(method, "other-node");
                tracing::warn!(method, caller = %other, node, "refused a call for another node");
                Err(Status::permission_denied(format!(
                    "{other} may not act for node {node}: a node's agent may only speak for itself"
                )))
            }
        }
    }
}

fn no_credential() -> Status {
    Status::unauthenticated(
        "no client certificate and no bearer token: the controller needs the caller's credentials \
         (agent: --credentials DIR with tls.crt/tls.key or token)",
    )
}

fn bearer<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// The caller a client certificate names in its URI SANs (the chain was verified by the TLS
/// handshake against the client CA).
pub fn caller_from_certificate(der: &[u8]) -> Result<Caller, Status> {
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|_| Status::unauthenticated("the client certificate cannot be parsed"))?;
    let names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| san.value.general_names.clone())
        .unwrap_or_default();
    names
        .iter()
        .find_map(|name| match name {
            GeneralName::URI(uri) => Caller::from_uri(uri),
            _ => None,
        })
        .ok_or_else(|| {
            Status::unauthenticated(
                "the client certificate names no stackroute identity (a URI SAN \
                 spiffe://stackroute.dev/node/NAME or spiffe://stackroute.dev/admin)",
            )
        })
}

/// Checks agents' tokens with the API server.
pub struct TokenReviewer {
    client: kube::Client,
    /// `namespace:name` of the agents' service account.
    service_account: String,
    cache: Mutex<HashMap<String, (Caller, Instant)>>,
}

impl TokenReviewer {
    /// Accepts tokens of service account `namespace:name` (the agent DaemonSet's).
    pub fn new(client: kube::Client, service_account: String) -> Self {
        Self {
            client,
            service_account,
            cache: Mutex::default(),
        }
    }

    async fn review(&self, token: &str) -> Result<Caller, Status> {
        if let Some((caller, at)) = self.cache.lock().expect("token cache").get(token)
            && at.elapsed() < TOKEN_CACHE_TTL
        {
            return Ok(caller.clone());
        }
        let caller = self.review_uncached(token).await?;
        let mut cache = self.cache.lock().expect("token cache");
        if cache.len() >= TOKEN_CACHE_ENTRIES {
            cache.retain(|_, (_, at)| at.elapsed() < TOKEN_CACHE_TTL);
            if cache.len() >= TOKEN_CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(token.to_string(), (caller.clone(), Instant::now()));
        Ok(caller)
    }

    async fn review_uncached(&self, token: &str) -> Result<Caller, Status> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![AGENT_AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|error| Status::unavailable(format!("TokenReview failed: {error}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Status::unauthenticated(format!(
                "the bearer token is not valid for audience {AGENT_AUDIENCE}: {}",
                status.error.unwrap_or_else(|| "not authenticated".into())
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let (namespace, account) = self
            .service_account
            .split_once(':')
            .unwrap_or(("", &self.service_account));
        if username != format!("system:serviceaccount:{namespace}:{account}") {
            return Err(Status::permission_denied(format!(
                "{username} is not the agents' service account {namespace}/{account}"
            )));
        }
        let extra = user.extra.unwrap_or_default();
        let claim = |key: &str| extra.get(key).and_then(|values| values.first()).cloned();
        let (Some(pod_name), Some(pod_uid)) = (claim(POD_NAME_EXTRA), claim(POD_UID_EXTRA)) else {
            return Err(Status::unauthenticated(
                "the token is not bound to a pod (use a projected service-account token)",
            ));
        };
        let pod = Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get_opt(&pod_name)
            .await
            .map_err(|error| {
                Status::unavailable(format!("reading pod {namespace}/{pod_name}: {error}"))
            })?
            .ok_or_else(|| {
                Status::unauthenticated(format!(
                    "the token's pod {namespace}/{pod_name} no longer exists"
                ))
            })?;
        if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
            return Err(Status::unauthenticated(format!(
                "the token's pod {namespace}/{pod_name} was replaced (uid differs)"
            )));
        }
        let node = pod.spec.and_then(|spec| spec.node_name).ok_or_else(|| {
            Status::unauthenticated(format!("pod {namespace}/{pod_name} is not scheduled"))
        })?;
        Ok(Caller::Node(node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    use rustls::pki_types::pem::PemObject as _;

    #[test]
    fn certificates_name_their_caller() {
        let now = SystemTime::now();
        let ca = crate::certs::new_ca(now).unwrap();
        for caller in [Caller::Node("node-a1".into()), Caller::Admin] {
            let leaf = crate::certs::issue_client(&ca, &caller, now).unwrap();
            let der = rustls::pki_types::CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes())
                .unwrap();
            assert_eq!(caller_from_certificate(der.as_ref()).unwrap(), caller);
        }
        // A serving certificate names no caller.
        let serving = crate::certs::issue_serving(
            &ca,
            &["localhost".into()],
            now,
            crate::certs::SERVING_VALIDITY,
        )
        .unwrap();
        let der =
            rustls::pki_types::CertificateDer::from_pem_slice(serving.cert_pem.as_bytes()).unwrap();
        let error = caller_from_certificate(der.as_ref()).unwrap_err();
        assert_eq!(error.code(), tonic::Code::Unauthenticated);
        assert!(
            error.message().contains("names no stackroute identity"),
            "{}",
            error.message()
        );
    }
}
