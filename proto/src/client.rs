//! How agents and tools reach the controller: one credentials directory, the same for the node
//! agent, `stackroute status` and the tests.
//!
//! ```text
//! DIR/ca.crt               the CA that signed the controller's serving certificate (required)
//! DIR/tls.crt, DIR/tls.key a client certificate naming the caller (standalone nodes, admins)
//! DIR/token                a bearer token (Kubernetes: the agent's projected service-account
//!                          token, audience `stackroute.dev/agent`; re-read on every call
//!                          because the kubelet rotates it)
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::v1alpha1::distribution_client::DistributionClient;
use crate::{MAX_REQUEST_BYTES, MAX_UPDATE_BYTES};

/// The CA certificate file.
pub const CA_FILE: &str = "ca.crt";
/// The client certificate file.
pub const CERT_FILE: &str = "tls.crt";
/// The client key file.
pub const KEY_FILE: &str = "tls.key";
/// The bearer token file.
pub const TOKEN_FILE: &str = "token";

/// How to reach the controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Security {
    /// TLS with the credentials in a directory (see the module documentation).
    Tls {
        /// The credentials directory.
        dir: PathBuf,
        /// The name the controller's certificate must carry, when it differs from the host
        /// of the address (an address given as a ClusterIP, for instance).
        server_name: Option<String>,
    },
    /// Plaintext without authentication: only for a controller started with
    /// `--insecure-plaintext`.
    Plaintext,
}

/// A controller client that sends the bearer token (when the directory has one) with every
/// call.
pub type Client = DistributionClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer …` from a token file, read at each call.
#[derive(Clone, Debug, Default)]
pub struct Bearer {
    token_file: Option<PathBuf>,
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(path) = &self.token_file else {
            return Ok(request);
        };
        let token = std::fs::read_to_string(path).map_err(|error| {
            tonic::Status::unauthenticated(format!("reading the token {}: {error}", path.display()))
        })?;
        let value = format!("Bearer {}", token.trim()).parse().map_err(|_| {
            tonic::Status::unauthenticated(format!("{} is not a token", path.display()))
        })?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

/// An error setting up the connection, naming the file or address at fault.
#[derive(Debug)]
pub struct SetupError(pub String);

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SetupError {}

fn read(dir: &Path, file: &str) -> Result<Vec<u8>, SetupError> {
    let path = dir.join(file);
    std::fs::read(&path).map_err(|error| SetupError(format!("reading {}: {error}", path.display())))
}

/// How much of a stream the controller may send before this client has read it. HTTP/2's
/// flow control is what bounds the controller's buffers: it queues a stream's messages up to
/// this window (at most 400 KiB, hyper's send buffer), so with 5,000 agents each byte here is
/// 5 KB of controller memory. 128 KiB a round trip is still 128 MB/s at 1 ms (hyper's default
/// is 2 MiB).
pub const STREAM_WINDOW_BYTES: u32 = 128 << 10;
/// The connection's window: the watch stream and a few small calls at once.
pub const CONNECTION_WINDOW_BYTES: u32 = 2 * STREAM_WINDOW_BYTES;

/// The endpoint for `address` (`HOST:PORT`, `http://…` or `https://…`) with `security`, and
/// the bearer interceptor to use with it.
pub fn endpoint(address: &str, security: &Security) -> Result<(Endpoint, Bearer), SetupError> {
    let bare = address
        .strip_prefix("https://")
        .or_else(|| address.strip_prefix("http://"))
        .unwrap_or(address);
    let scheme = match security {
        Security::Tls { .. } => "https",
        Security::Plaintext => "http",
    };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{bare}"))
        .map_err(|error| SetupError(format!("controller address {address:?}: {error}")))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES);
    let mut bearer = Bearer::default();
    if let Security::Tls { dir, server_name } = security {
        let mut tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(dir, CA_FILE)?));
        if dir.join(CERT_FILE).exists() || dir.join(KEY_FILE).exists() {
            tls = tls.identity(Identity::from_pem(
                read(dir, CERT_FILE)?,
                read(dir, KEY_FILE)?,
            ));
        }
        if let Some(name) = server_name {
            tls = tls.domain_name(name.clone());
        }
        let token = dir.join(TOKEN_FILE);
        if token.exists() {
            bearer.token_file = Some(token);
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|error| SetupError(format!("TLS settings from {}: {error}", dir.display())))?;
    }
    Ok((endpoint, bearer))
}

/// Connects to `address` with `security`: a client with the message limits of the contract.
pub async fn connect(address: &str, security: &Security) -> Result<Client, ConnectError> {
    let (endpoint, bearer) = endpoint(address, security).map_err(ConnectError::Setup)?;
    let channel = endpoint.connect().await.map_err(ConnectError::Transport)?;
    Ok(client(channel, bearer))
}

/// A client over an open channel.
pub fn client(channel: Channel, bearer: Bearer) -> Client {
    DistributionClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(MAX_UPDATE_BYTES)
        .max_encoding_message_size(MAX_REQUEST_BYTES)
}

/// Why [`connect`] failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The credentials or the address are unusable.
    Setup(SetupError),
    /// The connection (or the TLS handshake) failed.
    Transport(tonic::transport::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Setup(error) => error.fmt(f),
            Self::Transport(error) => {
                // tonic's top-level message is "transport error"; the cause says which.
                write!(f, "{error}")?;
                let mut source = std::error::Error::source(error);
                while let Some(cause) = source {
                    write!(f, ": {cause}")?;
                    source = cause.source();
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConnectError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_take_the_scheme_of_the_security() {
        let (plain, _) = endpoint("127.0.0.1:9", &Security::Plaintext).unwrap();
        assert_eq!(plain.uri().to_string(), "http://127.0.0.1:9/");
        let (plain, _) = endpoint("https://c.example:443", &Security::Plaintext).unwrap();
        assert_eq!(plain.uri().scheme_str(), Some("http"));
        assert!(endpoint("http://bad host", &Security::Plaintext).is_err());
    }

    #[test]
    fn missing_credentials_are_named() {
        let dir = std::env::temp_dir().join(format!("stackroute-no-creds-{}", std::process::id()));
        let error = endpoint(
            "127.0.0.1:9",
            &Security::Tls {
                dir: dir.clone(),
                server_name: None,
            },
        )
        .unwrap_err();
        assert!(
            error
                .0
                .starts_with(&format!("reading {}", dir.join(CA_FILE).display())),
            "{error}"
        );
    }
}
